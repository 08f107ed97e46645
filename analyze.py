r"""Look inside pre-trained ViTs (PAPER §5): layer similarity (CKA), attention distance and entropy, attention maps,
reconstructions.

- CKA: minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021), every layer of one model against every layer of
  another (or itself). A layer is what its block's norm1 sees (plus the final norm output), cls token removed.
- Attention: per layer and head, cls row/column dropped and the softmax re-taken over patches; mean distance
  (pixels) and entropy (nats) over queries and images.
- Figures: the last layer's cls-to-patch attention per head; reconstructions if the checkpoint has an MAE decoder.
Layers: block k = 1..depth; CKA's representations are "after block k", 0 = embedding. Writes analysis.json and
PNG figures into out_dir; with --image (repeatable), only one figure per image file; with --runs, only the runs'
curves overlaid.

    python analyze.py                                     # analyse out/mae/ckpt.pt on the embedded test images
    python analyze.py --ckpt=out/mae/ckpt.pt --ckpt2=out/scratch/best.pt    # CKA between MAE and supervised layers
    python analyze.py --image=data/grace_hopper.jpg       # attention and reconstruction of your own image
    python analyze.py --runs=out/mae,out/distill          # two runs' training curves overlaid: out/analyze/curves.png
    python analyze.py --ckpt=mae_tiny.pth --model=tiny --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --num_images=1024           # the paper's setting (ImageNet val, 1024 images)
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch

import augment
import figures
import pretrain_mae
from checkpoint import config_of, load_ckpt, read_log, stage_of, write_text
from common import print0
from data import Loader, build_dataset, eval_view, figure_images
from flags import check, check_config, cli
from weights import pretrained_vit, read_state_dict


@dataclass
class Config:
    ckpt: str = "out/mae/ckpt.pt"  # model to analyse: a checkpoint of any stage, or a timm/MAE ViT state dict
    ckpt2: str = ""  # a second model for CKA and attention comparison; empty = the first model with itself
    key: str = "model"  # which weights in ckpt (teacher: DINO's EMA teacher)
    key2: str = "model"  # which weights in ckpt2
    # only for checkpoints without a config
    model: str = ""  # ViT size: micro | mini | cpu | tiny | small | base; "" = read off the weights
    num_heads: int = 0  # attention heads; 0 = the size's default (timm/DeiT vit_tiny: 3, vit_small: 6)
    img_size: int = 32  # input side in pixels
    patch_size: int = 4  # patch side in pixels
    # data
    data: str = "embedded"  # images to analyse (the test/val split): embedded | imagefolder | ...
    data_root: str = ""  # folder of the data; unused for embedded
    classes: str = ""  # imagefolder: keep only the class folders listed in this file (imagenet100: CMC's); "" = all
    num_images: int = 512  # images for the averages (the paper: 1024)
    batch_size: int = 128  # CKA minibatch (the paper: 128); at least 4 for the unbiased estimator
    num_map_images: int = 4  # test images in the per-head attention-map figure (class-balanced)
    shared_scale: bool = True  # one colour scale for every attention map of a figure; false: each to its own max
    image: list = None  # an image file of your own (repeat the flag for more): its figure alone, no dataset
    mask_seed: int = 0  # the masks of the reconstruction figures
    runs: str = ""  # run folders, comma-separated, of one kind of stage: their curves overlaid, nothing else
    out_dir: str = "out/analyze"  # analysis.json and PNG figures

    def __post_init__(self):
        check_config(self, num_images=">0", num_map_images=">0")
        check(self.batch_size >= 4, f"batch_size must be at least 4 for unbiased HSIC, got {self.batch_size}")
        self.image = self.image or []
        check(self.num_images >= self.batch_size, f"--num_images {self.num_images} is fewer than one CKA batch of "
              f"{self.batch_size}: pass --batch_size={max(4, self.num_images // 2)} (at least 4), or more images")


# --- CKA ---
def hsic_unbiased(K, L):
    """Unbiased HSIC of two n x n Gram matrices (Song et al. 2012; needs n >= 4)."""
    n = K.shape[0]
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    term = (K * L).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * (K.sum(0) @ L.sum(1)) / (n - 2)
    return term / (n * (n - 3))


def gram(x):
    x = x.flatten(1).double()  # (B, N*D): one vector per image; float64 keeps the HSIC sums exact enough
    return x @ x.T


def cka(hsic_xy, hsic_xx, hsic_yy):
    """CKA of every layer pair from minibatch-mean HSICs: HSIC(K,L) / sqrt(HSIC(K,K) * HSIC(L,L))."""
    return hsic_xy / (hsic_xx[:, None] * hsic_yy[None, :]).sqrt()


# --- attention ---
def patch_distances(grid, patch_size):
    """(L, L) distances between patch centres in pixels (the official code used x14 for 16-pixel patches)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float() * patch_size
    return torch.cdist(pos, pos)


def attention_distance(probs, dist):
    """probs (B, H, L, L) -> (H,) mean attention distance over queries and images."""
    return (probs * dist).sum(-1).mean(dim=(0, 2))


def attention_entropy(probs):
    """probs (B, H, L, L) -> (H,) mean entropy in nats; entr() takes 0 log 0 = 0."""
    return torch.special.entr(probs).sum(-1).mean(dim=(0, 2))


def load_model(path, key, cfg, device):
    """(headless ViT, checkpoint config, checkpoint); the ViT's shape from that config, else the weights, else the
    flags."""
    ckpt = load_ckpt(path)
    ccfg = config_of(ckpt)
    fine_tuned = any(k.startswith("fc_norm.") for k in read_state_dict(ckpt, key, path))  # ends in fc_norm
    vit, _ = pretrained_vit(path, key, cfg.model, cfg.num_heads, ckpt=ckpt, img_size=ccfg.get("img_size", cfg.img_size),
                            num_classes=0, global_pool=fine_tuned)
    return vit.to(device).eval(), ccfg, ckpt


def mae_of(vit, ccfg, ckpt, key, device):
    """The MAE of a checkpoint with a decoder (pretrain_mae.py, distill.py), else None."""
    if not any(k.startswith("decoder.") for k in ckpt.get(key, {})):
        return None
    names = {f.name for f in fields(pretrain_mae.Config)}
    mae = pretrain_mae.MAE(pretrain_mae.Config(**{**{k: v for k, v in ccfg.items() if k in names},
                                                  "num_heads": vit.num_heads})).to(device).eval()
    mae.load_state_dict({k: v for k, v in ckpt[key].items() if k.startswith(("encoder.", "decoder."))})
    return mae


@torch.no_grad()
def last_layer_maps(vit, crops):
    """crops in [0, 1] -> (B, H + 1, g, g): last-layer cls-to-patch attention per head (softmax over all tokens),
    then the head mean."""
    _, attns, _ = vit.forward_features(augment.normalize(crops), return_attn=True)
    maps = attns[-1].float().softmax(-1)[:, :, 0, 1:]  # (B, H, L): where the cls token looks
    maps = torch.cat([maps, maps.mean(1, keepdim=True)], 1)
    return maps.unflatten(-1, (vit.grid, vit.grid)).cpu()


def uniform_values(grid, patch_size):
    """Distance (px) and entropy (nats) of uniform attention: the 'looks everywhere' line."""
    return patch_distances(grid, patch_size).mean().item(), math.log(grid * grid)


def what_it_reads(vit):
    """The attention figures' note on a global-pool (fine-tuned) model."""
    return ("its classifier reads the mean of the patch tokens, never cls: these maps show where cls looks, not "
            "what decides the class" if vit.global_pool else "")


def figure_stems(paths):
    """A figure name per image file: its stem, or where stems clash its path below the common folder
    (val/a/000.jpg, val/b/000.jpg -> a_000_jpg, b_000_jpg)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "_").replace(".", "_") for p in paths]


def image_figures(cfg, vit, ccfg, ckpt, device):
    """--image: per file, its attention maps and (with a decoder) its reconstruction."""
    mae, written = mae_of(vit, ccfg, ckpt, cfg.key, device), []
    for path, name in zip(cfg.image, figure_stems(cfg.image)):
        crop = eval_view(path, vit.patch_embed.img_size)[None].to(device).float() / 255
        stem = os.path.join(cfg.out_dir, name)
        figures.attention_panels(crop, last_layer_maps(vit, crop),
                                 f"{os.path.basename(path)} through {cfg.ckpt}", f"{stem}_attention.png",
                                 [os.path.basename(path)], cfg.shared_scale, what_it_reads(vit))
        written.append(f"{stem}_attention.png")
        if mae is not None:
            figures.save_reconstructions(mae, augment.normalize(crop), f"{os.path.basename(path)}"
                                              f" through {cfg.ckpt}", f"{stem}_recon.png", cfg.mask_seed)
            written.append(f"{stem}_recon.png")
    print0("wrote " + ", ".join(written))
    return written


# --- several runs' curves ---
KINDS = {"pretrain_mae": "MAE pre-training", "distill": "MAE pre-training", "finetune": "fine-tuning",
         "pretrain_contrastive": "contrastive pre-training"}  # D-MAE's loss is MAE's plus its distillation parts


def overlay_runs(cfg):
    """--runs: the log rows of each folder drawn together, labelled by folder, differing settings and metric."""
    runs, kinds = [], {}
    for folder in [f for f in cfg.runs.split(",") if f]:
        check(os.path.exists(os.path.join(folder, "log.jsonl")), f"--runs: {folder} has no log.jsonl (not a run "
              "folder, or no epoch has ended yet); pass folders a stage has trained in")
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        kinds[folder] = KINDS.get(stage_of(load_ckpt(os.path.join(folder, "ckpt.pt")) if os.path.exists(
            os.path.join(folder, "ckpt.pt")) else {"config": config}), "unknown")
        runs.append((folder, read_log(folder), config))
    # each run named by its folder and the settings in which it differs from the others (paths aside)
    differ = sorted(k for k in set().union(*(c for _, _, c in runs)) if k not in ("out_dir", "num_workers")
                    and len({json.dumps(c.get(k)) for _, _, c in runs}) > 1)
    runs = [(folder + (" (" + ", ".join(f"{k}={c.get(k)}" for k in differ[:3]) + (", ..." if len(differ) > 3 else "")
                       + ")" if differ else ""), rows, c) for folder, rows, c in runs]
    check(len(set(kinds.values())) == 1, "--runs: these runs are of different stages (" + ", ".join(
        f"{k}: {v}" for k, v in kinds.items()) + "); overlay runs of one kind, e.g. two pretrain_mae.py runs")
    path = os.path.join(cfg.out_dir, "curves.png")
    figures.curves(runs, path, f"{next(iter(kinds.values()))} runs: " + ", ".join(kinds))
    print0(f"wrote {path}: " + "; ".join(label for label, _, _ in runs))
    return path


@torch.no_grad()
def main(cfg):
    # --- setup ---
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.runs:
        return overlay_runs(cfg)
    paths = [(cfg.ckpt, cfg.key)] + ([(cfg.ckpt2, cfg.key2)] if cfg.ckpt2 else [])
    models = [load_model(p, k, cfg, device) for p, k in paths]
    names = [p for p, _ in paths]
    if cfg.image:
        return image_figures(cfg, *models[0], device)

    # --- data --- (the first model's input size; a second one resizes its pos_embed)
    vit = models[0][0]
    grid, patch_size, img_size = vit.grid, vit.patch_embed.patch_size, vit.patch_embed.img_size
    dataset, _ = build_dataset(cfg.data, cfg.data_root, False, cfg.num_images, cfg.classes)
    # HSIC wants equal minibatches
    loader = Loader(dataset, cfg.batch_size, False, 0, device, [(img_size, "center")], drop_last=True)
    check(len(loader) > 0, f"the test split has {len(dataset)} images, fewer than one CKA batch of {cfg.batch_size}: "
                           f"pass --batch_size={max(4, len(dataset) // 2)} (at least 4)")

    # --- measure ---
    sums = dict(xy=0.0, xx=0.0, yy=0.0)
    dist_sum, ent_sum = [0.0] * len(models), [0.0] * len(models)
    for crops, _ in loader:
        imgs = augment.normalize(crops[0])
        per_model = [m.forward_features(imgs, return_attn=True, return_hidden=True) for m, *_ in models]
        grams_a = [gram(h[:, 1:]) for h in per_model[0][2]]  # [:, 1:] drops the cls token
        grams_b = [gram(h[:, 1:]) for h in per_model[-1][2]]
        sums["xy"] += torch.tensor([[hsic_unbiased(K, L) for L in grams_b] for K in grams_a])
        sums["xx"] += torch.tensor([hsic_unbiased(K, K) for K in grams_a])
        sums["yy"] += torch.tensor([hsic_unbiased(L, L) for L in grams_b])
        for i, ((m, *_), (_, attns, _)) in enumerate(zip(models, per_model)):
            d = patch_distances(m.grid, m.patch_embed.patch_size).to(device)
            probs = [s[:, :, 1:, 1:].softmax(-1) for s in attns]  # cls row/col out, softmax over patches only
            dist_sum[i] += torch.stack([attention_distance(p, d) for p in probs]).cpu()  # (depth, H)
            ent_sum[i] += torch.stack([attention_entropy(p) for p in probs]).cpu()
    n = len(loader)
    result = dict(names=names, num_images=n * cfg.batch_size,
                  cka=cka(sums["xy"] / n, sums["xx"] / n, sums["yy"] / n).tolist(),
                  attn_distance=[(s / n).tolist() for s in dist_sum], attn_entropy=[(s / n).tolist() for s in ent_sum],
                  uniform=dict(zip(("attn_distance", "attn_entropy"), uniform_values(grid, patch_size))))

    # --- figures ---
    written = ["analysis.json", "cka.png", "attn_distance.png", "attn_entropy.png"]
    mae = mae_of(*models[0], cfg.key, device)
    if mae is not None:
        method = "D-MAE" if stage_of(models[0][2]) == "distill" else "MAE"  # both are an MAE once loaded
        title = f"{method} reconstructions of 8 test images (centre crops), {cfg.ckpt}"
        figures.save_reconstructions(mae, augment.normalize(figure_images(dataset, 8, img_size, device)[0]), title,
                                     os.path.join(cfg.out_dir, "recon.png"), cfg.mask_seed)
        written.append("recon.png")
    for i, ((m, *_), name) in enumerate(zip(models, names)):
        crops, labels = figure_images(dataset, cfg.num_map_images, m.patch_embed.img_size, device)
        written.append(f"attn_maps{i + 1 if i else ''}.png")
        figures.attention_panels(crops, last_layer_maps(m, crops), name, os.path.join(cfg.out_dir, written[-1]),
                                 labels, cfg.shared_scale, what_it_reads(m))

    # --- save ---
    write_text(os.path.join(cfg.out_dir, "analysis.json"), json.dumps(result))
    figures.analysis_plots(result, cfg.out_dir, grid, patch_size)
    for name, dists, ents in zip(names, result["attn_distance"], result["attn_entropy"]):
        print0(f"{name}: attention distance per layer (px) " + " ".join(f"{sum(d) / len(d):.1f}" for d in dists)
               + " | entropy (nats) " + " ".join(f"{sum(e) / len(e):.2f}" for e in ents))
    if cfg.ckpt2:
        print0("CKA diagonal: " + " ".join(f"{row[i]:.2f}" for i, row in enumerate(result["cka"]) if i < len(row)))
    else:  # a model against itself: the diagonal is 1 by construction, no finding
        print0("CKA: one model compared with itself (its diagonal is 1 by construction); --ckpt2=another model's "
               "checkpoint compares two")
    print0(f"wrote {cfg.out_dir}/" + ", ".join(written))
    return result


if __name__ == "__main__":
    cli(main, Config)
