r"""DINO's weighted k-NN on frozen features: no training, so every pre-training run can get one. A test image's k
most cosine-similar training images vote, weighted exp(similarity / T). `--ckpt=random` scores a random backbone: the
floor to report beside a result.

    python knn.py --ckpt=out/mae/ckpt.pt                 # MAE features on the embedded data (6,000 train / 1,000 test)
    python knn.py --ckpt=random                          # the floor
    python knn.py --ckpt=out/mae/ckpt.pt --data=mnist    # another domain
    python knn.py --ckpt=mae_tiny_400e.pth.tar --model=tiny --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --batch_size=512          # ImageNet (DINO: k 20, T 0.07)
"""
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import augment
from checkpoint import config_of, load_ckpt, write_text
from common import autocast_ctx, print0
from data import Loader, build_dataset
from flags import check, check_config, cli
from model import create_vit
from weights import pretrained_vit


@dataclass
class Config:
    ckpt: str = "out/mae/ckpt.pt"  # a checkpoint of any stage, a timm / MAE / MAE-Lite file, or "random" (the floor)
    key: str = "model"  # which weights in ckpt (teacher: DINO's EMA teacher)
    # for "random" and checkpoints without a config
    model: str = ""  # ViT size: micro | mini | cpu | tiny | small | base; "" = the checkpoint's (random: cpu)
    num_heads: int = 0  # attention heads; 0 = the size's default
    img_size: int = 32  # input side in pixels
    patch_size: int = 4  # patch side in pixels
    # data
    data: str = "embedded"  # its train split is the memory bank, its test split is evaluated
    data_root: str = ""  # folder of the data; unused for the embedded slices
    subset: int = 0  # a seeded, class-balanced subset of N training images in the bank (0 = all)
    classes: str = ""  # imagefolder: keep only the class folders listed in this file (imagenet100: CMC's); "" = all
    # k-NN
    k: int = 20  # neighbours (DINO: 20)
    temperature: float = 0.07  # vote weight exp(similarity / T) (DINO: 0.07)
    pool: str = "cls"  # cls (the cls token after the final norm, DINO) | mean (mean of the patch tokens)
    batch_size: int = 256  # images per feature batch
    num_workers: int = 2  # loader processes (file data only)
    seed: int = 0  # initialisation of the random backbone
    out: str = ""  # also write the result to this JSON file

    def __post_init__(self):
        check_config(self, k=">0", temperature=">0")
        check(self.pool in ("cls", "mean"), f"pool must be cls or mean, got {self.pool!r}")


@torch.no_grad()
def features(vit, loader, pool, device):
    """L2-normalised features and labels of the loader's images."""
    feats, labels = [], []
    for crops, y in loader:
        with autocast_ctx(device):
            x, _, _ = vit.forward_features(augment.normalize(crops[0]))
        feats.append(F.normalize((x[:, 0] if pool == "cls" else x[:, 1:].mean(1)).float(), dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, k, temperature, num_classes, chunk=1024):
    """Class scores (N_test, C) from the k-NN votes."""
    scores = []
    for q in test_f.split(chunk):
        sim, idx = (q @ train_f.T).topk(min(k, len(train_f)), dim=1)  # (n, k)
        votes = F.one_hot(train_y[idx], num_classes).float() * (sim / temperature).exp()[..., None]
        scores.append(votes.sum(1))
    return torch.cat(scores)


def main(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # --- model ---
    if cfg.ckpt == "random":
        torch.manual_seed(cfg.seed)
        vit = create_vit(cfg.model or "cpu", cfg.num_heads, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         num_classes=0)
    else:  # the checkpoint's shape and, where recorded, input size
        ckpt = load_ckpt(cfg.ckpt)
        vit, _ = pretrained_vit(cfg.ckpt, cfg.key, cfg.model, cfg.num_heads, ckpt=ckpt, num_classes=0,
                                img_size=config_of(ckpt).get("img_size", cfg.img_size))
    vit = vit.to(device).eval()
    img_size = vit.patch_embed.img_size

    # --- data ---
    train, num_classes = build_dataset(cfg.data, cfg.data_root, True, cfg.subset, cfg.classes)
    test, _ = build_dataset(cfg.data, cfg.data_root, False, classes=cfg.classes)

    # --- eval ---
    train_f, train_y, test_f, test_y = (t for split in (train, test) for t in features(
        vit, Loader(split, cfg.batch_size, False, cfg.num_workers, device, [(img_size, "center")]), cfg.pool, device))
    scores = knn_classify(train_f, train_y, test_f, cfg.k, cfg.temperature, num_classes)
    top = scores.topk(min(5, num_classes), 1).indices
    hits = top == test_y[:, None]
    result = dict(ckpt=cfg.ckpt, data=cfg.data, k=cfg.k, temperature=cfg.temperature, pool=cfg.pool,
                  train_images=len(train_f), test_images=len(test_f),
                  top1=100 * hits[:, 0].float().mean().item(), top5=100 * hits.any(1).float().mean().item())
    print0(f"k-NN ({cfg.k}, T {cfg.temperature}, {cfg.pool}) of {cfg.ckpt} on {cfg.data}: top-1 {result['top1']:.2f} "
           f"top-5 {result['top5']:.2f} ({len(train_f)} train / {len(test_f)} test images)")
    if cfg.out:
        write_text(cfg.out, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli(main, Config)
