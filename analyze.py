r"""Look inside pre-trained ViTs (PAPER §5): layer similarity by CKA, attention distance and entropy, MAE reconstructions.

- CKA: minibatch linear CKA with the unbiased HSIC estimator (Nguyen et al. 2021) between every layer of one model
  and every layer of another (or itself). A layer's representation is what its block's norm1 sees (plus the final
  norm output), cls token removed, each image's tokens flattened into one vector.
- Attention: per layer and head, the cls row/column is dropped and the softmax re-taken over patches; the mean
  attention distance (pixels: patch-grid distance x patch size) and entropy (nats) are averaged over queries/images.
- Reconstructions: when the checkpoint has an MAE decoder, a grid of original / masked / reconstructed images.
- Attention maps: the last layer's cls-to-patch attention, one panel per head, over the first test images.
Writes analysis.json and cka.png, attn_distance.png, attn_entropy.png, recon.png, attn_maps.png (attn_maps2.png for
ckpt2) into out_dir.

    python analyze.py                                     # analyse out/mae/ckpt.pt on the embedded test images
    python analyze.py --ckpt=out/mae/ckpt.pt --ckpt2=out/scratch/best.pt    # CKA between MAE and supervised layers
    python analyze.py --ckpt=mae_tiny.pth --model=tiny --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --num_images=1024           # the paper's setting (ImageNet val, 1024 images)
"""
import json
import os
from dataclasses import dataclass, fields

import torch
from torchvision.utils import save_image

import augment
import pretrain_mae
from common import check, check_ranges, cli, load_ckpt, print0
from data import Loader, build_dataset, first_images
from model import VIT_SIZES, checkpoint_heads, create_vit, load_backbone, read_state_dict, vit_heads


@dataclass
class Config:
    ckpt: str = "out/mae/ckpt.pt"  # model to analyse: a checkpoint of any stage, or a timm/MAE ViT state dict
    ckpt2: str = ""  # a second model for CKA and attention comparison; empty = the first model with itself
    key: str = "model"  # which weights in ckpt (teacher: DINO's EMA teacher)
    key2: str = "model"  # which weights in ckpt2
    # used only when a checkpoint carries no config of its own
    model: str = "cpu"  # ViT size: cpu | tiny | small | base
    num_heads: int = 0  # attention heads; 0 = the size's default (timm/DeiT vit_tiny: 3, vit_small: 6)
    img_size: int = 32  # input side in pixels
    patch_size: int = 4  # patch side in pixels
    # data
    data: str = "embedded"  # images to analyse (the test/val split): embedded | imagefolder | ...
    data_root: str = ""  # folder of the data; unused for embedded
    num_images: int = 512  # images for the averages (the paper: 1024)
    batch_size: int = 128  # CKA minibatch (the paper: 128); at least 4 for the unbiased estimator
    num_map_images: int = 4  # test images in the per-head attention-map figure
    out_dir: str = "out/analyze"  # analysis.json and PNG figures

    def __post_init__(self):
        check_ranges(self, num_heads=">=0", img_size=">0", patch_size=">0", num_images=">0", num_map_images=">0")
        check(self.img_size % self.patch_size == 0, f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        check(self.batch_size >= 4, f"batch_size must be at least 4 for unbiased HSIC, got {self.batch_size}")
        check(self.model in VIT_SIZES, f"model must be one of {sorted(VIT_SIZES)}, got {self.model!r}")
        vit_heads(self.model, self.num_heads)
        check(self.num_images >= self.batch_size, "num_images must be at least one batch")


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
    """CKA from HSIC values averaged over minibatches: mean HSIC(K,L) / sqrt(mean HSIC(K,K) * mean HSIC(L,L))."""
    return hsic_xy / (hsic_xx[:, None] * hsic_yy[None, :]).sqrt()


# --- attention ---
def patch_distances(grid, patch_size):
    """(L, L) Euclidean distances between patch centres in pixels (the official code used x14 for 16-pixel patches)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float() * patch_size
    return torch.cdist(pos, pos)


def attention_distance(probs, dist):
    """probs (B, H, L, L) over patches -> (H,) mean attention distance, averaged over queries and images."""
    return (probs * dist).sum(-1).mean(dim=(0, 2))


def attention_entropy(probs):
    """probs (B, H, L, L) -> (H,) mean entropy in nats; entr() takes 0 log 0 = 0."""
    return torch.special.entr(probs).sum(-1).mean(dim=(0, 2))


def load_model(path, key, cfg, device):
    """A headless ViT built from the checkpoint's own config (or the flags), with its weights; and that config."""
    ckpt = load_ckpt(path)
    ccfg = ckpt.get("config", {}) if isinstance(ckpt.get("config"), dict) else {}
    sd = read_state_dict(ckpt, key)
    size = ccfg.get("model", cfg.model)
    vit = create_vit(size, checkpoint_heads(ckpt, path, size, cfg.num_heads), img_size=ccfg.get("img_size", cfg.img_size),
                     patch_size=ccfg.get("patch_size", cfg.patch_size), num_classes=0,
                     global_pool=any(k.startswith("fc_norm.") for k in sd))  # fine-tuned models end in fc_norm
    load_backbone(vit, sd, verbose=False)
    return vit.to(device).eval(), ccfg, ckpt


def save_plots(result, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(torch.tensor(result["cka"]).T.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    ax.set_xlabel(f"layer ({result['names'][0]})")
    ax.set_ylabel(f"layer ({result['names'][-1]})")
    ax.set_title("linear CKA (0 = embedding, last = final norm)")
    fig.colorbar(im)
    fig.savefig(os.path.join(out_dir, "cka.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    for metric, unit in (("attn_distance", "pixels"), ("attn_entropy", "nats")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, color, per_layer in zip(result["names"], ("C0", "C1"), result[metric]):
            v = torch.tensor(per_layer)  # (depth, H)
            layers = torch.arange(1, len(v) + 1)[:, None].expand_as(v)
            ax.scatter(layers.flatten().numpy(), v.flatten().numpy(), s=8, color=color, alpha=0.5)
            ax.plot(layers[:, 0].numpy(), v.mean(1).numpy(), color=color, label=f"{name} (mean over heads)")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{metric.replace('_', ' ')} ({unit})")
        ax.legend()
        fig.savefig(os.path.join(out_dir, f"{metric}.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)


@torch.no_grad()
def save_attention_maps(vit, images, title, path):
    """The last layer's cls-to-patch attention, one panel per head, over a few images (rows): each head's map (softmax
    over all tokens, cls row, each map scaled to its own maximum) laid over the grey input, both upscaled with
    nearest neighbour so every patch stays a visible square."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crops = augment.center_crop(images, vit.patch_embed.img_size)  # uint8 (B, 3, S, S)
    _, attns, _ = vit.forward_features(augment.normalize(crops), return_attn=True)
    maps = attns[-1].float().softmax(-1)[:, :, 0, 1:]  # (B, H, L): where the cls token looks, per head
    maps = (maps / maps.amax(-1, keepdim=True)).unflatten(-1, (vit.grid, vit.grid)).cpu()
    grey = crops.float().mean(1).cpu()
    n, heads = maps.shape[:2]
    fig, axes = plt.subplots(n, heads + 1, figsize=(1.3 * (heads + 1), 1.3 * n + 0.6), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(grey[i], cmap="gray", interpolation="nearest")
        axes[i, 0].set_ylabel(f"image {i + 1}", fontsize=8)
        for h in range(heads):
            ax = axes[i, h + 1]
            ax.imshow(grey[i], cmap="gray", interpolation="nearest")
            ax.imshow(maps[i, h], cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest",
                      extent=(-0.5, grey.shape[-1] - 0.5, grey.shape[-2] - 0.5, -0.5))
            if i == 0:
                ax.set_title(f"head {h + 1}", fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}: last layer, cls-to-patch attention per head (bright = most attended)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def main(cfg):
    # --- setup ---
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(cfg.out_dir, exist_ok=True)
    paths = [(cfg.ckpt, cfg.key)] + ([(cfg.ckpt2, cfg.key2)] if cfg.ckpt2 else [])
    models = [load_model(p, k, cfg, device) for p, k in paths]
    names = [p for p, _ in paths]

    # --- data --- (the first model's input size; a second model resizes its position embedding on the fly)
    img_size = models[0][0].patch_embed.img_size
    dataset, _ = build_dataset(cfg.data, cfg.data_root, False, cfg.num_images)
    loader = Loader(dataset, cfg.batch_size, False, 0, device, drop_last=True)  # equal minibatches for HSIC
    check(len(loader) > 0, f"{len(dataset)} images is fewer than one batch of {cfg.batch_size}")

    # --- measure ---
    sums = dict(xy=0.0, xx=0.0, yy=0.0)
    dist_sum = [0.0 for _ in models]
    ent_sum = [0.0 for _ in models]
    for imgs, _ in loader:
        imgs = augment.normalize(augment.center_crop(imgs, img_size))
        per_model = [vit.forward_features(imgs, return_attn=True, return_hidden=True) for vit, *_ in models]
        grams_a = [gram(h[:, 1:]) for h in per_model[0][2]]  # [:, 1:] drops the cls token
        grams_b = [gram(h[:, 1:]) for h in per_model[-1][2]]
        sums["xy"] += torch.tensor([[hsic_unbiased(K, L) for L in grams_b] for K in grams_a])
        sums["xx"] += torch.tensor([hsic_unbiased(K, K) for K in grams_a])
        sums["yy"] += torch.tensor([hsic_unbiased(L, L) for L in grams_b])
        for m, ((vit, *_), (_, attns, _)) in enumerate(zip(models, per_model)):
            d = patch_distances(vit.grid, vit.patch_embed.patch_size).to(device)
            probs = [s[:, :, 1:, 1:].softmax(-1) for s in attns]  # cls row/col out, softmax over patches only
            dist_sum[m] += torch.stack([attention_distance(p, d) for p in probs]).cpu()  # (depth, H)
            ent_sum[m] += torch.stack([attention_entropy(p) for p in probs]).cpu()
    n = len(loader)
    result = dict(names=names, num_images=n * cfg.batch_size,
                  cka=cka(sums["xy"] / n, sums["xx"] / n, sums["yy"] / n).tolist(),
                  attn_distance=[(s / n).tolist() for s in dist_sum], attn_entropy=[(s / n).tolist() for s in ent_sum])

    # --- reconstructions --- (checkpoints of pretrain_mae.py / distill.py carry the decoder)
    vit, ccfg, ckpt = models[0]
    if any(k.startswith("decoder.") for k in ckpt.get(cfg.key, {})):
        mae_cfg = pretrain_mae.Config(**{**{f.name: ccfg[f.name] for f in fields(pretrain_mae.Config) if f.name in ccfg},
                                         "num_heads": vit.num_heads})
        mae = pretrain_mae.MAE(mae_cfg).to(device).eval()
        mae.load_state_dict({k: v for k, v in ckpt[cfg.key].items() if k.startswith(("encoder.", "decoder."))})
        view = augment.normalize(augment.center_crop(first_images(dataset, 8, device), img_size))
        save_image(pretrain_mae.reconstruction_grid(mae, view), os.path.join(cfg.out_dir, "recon.png"), nrow=6, padding=1)

    # --- per-head attention maps of each model on the first test images ---
    for i, ((vit, *_), name) in enumerate(zip(models, names)):
        save_attention_maps(vit, first_images(dataset, cfg.num_map_images, device), name,
                            os.path.join(cfg.out_dir, f"attn_maps{i + 1 if i else ''}.png"))

    # --- save ---
    with open(os.path.join(cfg.out_dir, "analysis.json"), "w") as f:
        json.dump(result, f)
    save_plots(result, cfg.out_dir)
    for name, dists, ents in zip(names, result["attn_distance"], result["attn_entropy"]):
        print0(f"{name}: attention distance per layer (px) "
               + " ".join(f"{sum(d) / len(d):.1f}" for d in dists)
               + " | entropy (nats) " + " ".join(f"{sum(e) / len(e):.2f}" for e in ents))
    print0("CKA diagonal: " + " ".join(f"{result['cka'][i][i]:.2f}" for i in range(min(len(result['cka']),
                                                                                     len(result['cka'][0])))))
    print0(f"wrote {cfg.out_dir}/analysis.json, cka.png, attn_distance.png, attn_entropy.png, attn_maps*.png")
    return result


if __name__ == "__main__":
    cli(main, Config)
