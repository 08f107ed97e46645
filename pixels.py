r"""The raw-pixel floors: what a logistic-regression classifier and DINO's k-NN get from the pixels themselves, on
exactly the images and labels an evaluation uses (the eval view: the centre crop at img_size). A pre-trained
model's accuracy says something about pre-training only above these floors.

    python pixels.py                              # the embedded data (6,000 train / 1,000 test images)
    python pixels.py --data=mnist --subset=100    # 10 labels a class: the floor of the transfer task at that size
    python pixels.py --data=imagefolder --data_root=/imagenet --classes=imagenet100   # ImageNet-100, 32-px views
"""
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from checkpoint import write_text
from common import print0
from data import Loader, build_dataset, class_by_class
from flags import check, check_config, cli
from knn import knn_classify


@dataclass
class Config:
    # data: the same flags as the evaluation the floor sits beside
    data: str = "embedded"  # its train split is fitted (and the k-NN's bank), its test split is evaluated
    data_root: str = ""  # folder of the data; unused for the embedded slices
    subset: int = 0  # a seeded, class-balanced subset of N training images (0 = all): the same as --subset elsewhere
    classes: str = ""  # imagefolder: keep only the class folders listed in this file (imagenet100: CMC's); "" = all
    img_size: int = 32  # side of the eval view whose pixels are the features (the stages' default: 32)
    # the classifiers
    l2: str = "1e-4,1e-3,1e-2,1e-1,1"  # L2 strengths for logistic regression; the best on a held-out fifth of train
    max_iter: int = 300  # L-BFGS iterations per fit
    k: int = 20  # k-NN neighbours (DINO: 20), as knn.py
    temperature: float = 0.07  # k-NN vote weight exp(similarity / T), as knn.py
    batch_size: int = 256  # images per loader batch
    num_workers: int = 2  # loader processes (file data only)
    out: str = ""  # also write the result to this JSON file

    def __post_init__(self):
        check_config(self, img_size=">0", max_iter=">0", k=">0", temperature=">0")
        try:
            self.strengths = [float(v) for v in self.l2.split(",")]
        except ValueError:
            self.strengths = []
        check(self.strengths and all(v >= 0 for v in self.strengths),
              f"l2 must be a comma-separated list of numbers >= 0, got {self.l2!r}")


def pixels(dataset, cfg):
    """(N, C * img_size^2) float pixels in [0, 1] of the eval view (C = 1 for grey sets, else 3), and the labels."""
    loader = Loader(dataset, cfg.batch_size, False, cfg.num_workers, torch.device("cpu"), [(cfg.img_size, "center")])
    xs, ys = zip(*((crops[0], y) for crops, y in loader))
    x = torch.cat(xs)  # (N, 3, S, S)
    if (x == x[:, :1]).all():  # grey images: the three channels are one
        x = x[:, :1]
    return x.flatten(1), torch.cat(ys)


def fit_logistic(x, y, num_classes, l2, max_iter):
    """Multinomial logistic regression (softmax cross-entropy + l2/2 |W|^2, bias not decayed), full batch, L-BFGS
    from zeros: deterministic, and convex, so the optimum does not depend on a learning rate."""
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 / 2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda q: (q @ w + b).detach()


def choose_l2(x, y, num_classes, cfg):
    """The L2 strength with the best accuracy on a class-balanced fifth of the training images, fitted on the other
    four fifths (never on the test split). Returns it and each strength's held-out accuracy."""
    held = torch.tensor(class_by_class(y.tolist(), len(y) // 5), device=y.device)
    keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
    keep[held] = False
    scores = [(fit_logistic(x[keep], y[keep], num_classes, l2, cfg.max_iter)(x[held]).argmax(1) == y[held])
              .float().mean().item() for l2 in cfg.strengths]
    return cfg.strengths[max(range(len(scores)), key=scores.__getitem__)], scores


def main(cfg):
    train, num_classes = build_dataset(cfg.data, cfg.data_root, True, cfg.subset, cfg.classes)
    test, _ = build_dataset(cfg.data, cfg.data_root, False, classes=cfg.classes)
    train_x, train_y = pixels(train, cfg)
    test_x, test_y = pixels(test, cfg)
    # standardise each pixel with the training images' statistics (constant pixels, e.g. a border, stay 0)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the fits: ImageNet's pixels are many
    train_x, test_x = ((x - mean).div_(std).to(device) for x in (train_x, test_x))
    train_y, test_y = train_y.to(device), test_y.to(device)

    # --- logistic regression ---
    print0(f"fitting a logistic regression on {train_x.shape[1]} pixels of {len(train_y)} images: L2 strength "
           f"{cfg.l2} each scored on a held-out fifth, then the best on them all (L-BFGS, at most {cfg.max_iter} steps "
           "each)")
    l2, cv = choose_l2(train_x, train_y, num_classes, cfg)
    print0("held-out top-1 per L2 strength: " + ", ".join(f"{v:g}: {100 * a:.1f}" for v, a in zip(cfg.strengths, cv)))
    predict = fit_logistic(train_x, train_y, num_classes, l2, cfg.max_iter)
    linear = 100 * (predict(test_x).argmax(1) == test_y).float().mean().item()

    # --- k-NN: DINO's weighted vote on the L2-normalised standardised pixels ---
    scores = knn_classify(F.normalize(train_x, dim=1), train_y, F.normalize(test_x, dim=1), cfg.k, cfg.temperature,
                          num_classes)
    knn = 100 * (scores.argmax(1) == test_y).float().mean().item()

    result = dict(data=cfg.data, subset=cfg.subset, img_size=cfg.img_size, train_images=len(train_y),
                  test_images=len(test_y), linear_top1=linear, linear_l2=l2, knn_top1=knn, k=cfg.k,
                  temperature=cfg.temperature, heldout_top1={f"{v:g}": 100 * a for v, a in zip(cfg.strengths, cv)})
    print0(f"raw pixels of {cfg.data} ({len(train_y)} train / {len(test_y)} test images, {cfg.img_size} px): "
           f"logistic regression top-1 {linear:.2f} (l2 {l2:g}), k-NN ({cfg.k}, T {cfg.temperature}) top-1 {knn:.2f}")
    if cfg.out:
        write_text(cfg.out, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli(main, Config)
