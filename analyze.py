r"""Look inside pre-trained ViTs (PAPER §5): layer similarity (CKA), attention distance and entropy, reconstructions.

- CKA: minibatch linear CKA with the unbiased HSIC estimator (Nguyen et al. 2021) between every layer of one model
  and every layer of another (or itself). A layer's representation is what its block's norm1 sees (plus the final
  norm output), cls token removed, each image's tokens flattened into one vector.
- Attention: per layer and head, the cls row/column is dropped and the softmax re-taken over patches; the mean
  attention distance (pixels: patch-grid distance x patch size) and entropy (nats) are averaged over queries/images.
- Reconstructions: when the checkpoint has an MAE decoder, a grid of original / masked / reconstructed images.
- Attention maps: the last layer's cls-to-patch attention, one panel per head and their mean, over test images
  drawn class-balanced (one per class first); one colour scale for every map unless --shared_scale=false.
Layers are numbered alike everywhere: block k = 1..depth; CKA's representations are "after block k", 0 = embedding.
Writes analysis.json and cka.png, attn_distance.png, attn_entropy.png, recon.png, attn_maps.png (attn_maps2.png for
ckpt2) into out_dir. With --image (repeatable): one figure per image file, nothing else.

    python analyze.py                                     # analyse out/mae/ckpt.pt on the embedded test images
    python analyze.py --ckpt=out/mae/ckpt.pt --ckpt2=out/scratch/best.pt    # CKA between MAE and supervised layers
    python analyze.py --image=data/grace_hopper.jpg       # attention and reconstruction of your own image
    python analyze.py --ckpt=mae_tiny.pth --model=tiny --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --num_images=1024           # the paper's setting (ImageNet val, 1024 images)
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torchvision.transforms.functional as TF

import augment
import figures
import pretrain_mae
from checkpoint import config_of, load_ckpt
from common import check, check_config, cli, print0
from data import Loader, build_dataset, figure_images, figure_indices, label_names, load_rgb
from weights import pretrained_vit, read_state_dict


@dataclass
class Config:
    ckpt: str = "out/mae/ckpt.pt"  # model to analyse: a checkpoint of any stage, or a timm/MAE ViT state dict
    ckpt2: str = ""  # a second model for CKA and attention comparison; empty = the first model with itself
    key: str = "model"  # which weights in ckpt (teacher: DINO's EMA teacher)
    key2: str = "model"  # which weights in ckpt2
    # used only when a checkpoint carries no config of its own
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
    out_dir: str = "out/analyze"  # analysis.json and PNG figures

    def __post_init__(self):
        check_config(self, num_images=">0", num_map_images=">0")
        check(self.batch_size >= 4, f"batch_size must be at least 4 for unbiased HSIC, got {self.batch_size}")
        self.image = self.image or []
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
    """A headless ViT that fits the checkpoint (size, heads, input and patch size from its config, else its
    weights, else the flags), with its weights; and the checkpoint's config and the checkpoint."""
    ckpt = load_ckpt(path)
    ccfg = config_of(ckpt)
    fine_tuned = any(k.startswith("fc_norm.") for k in read_state_dict(ckpt, key, path))  # ends in fc_norm
    vit, _ = pretrained_vit(path, key, cfg.model, cfg.num_heads, ckpt=ckpt, img_size=ccfg.get("img_size", cfg.img_size),
                            num_classes=0, global_pool=fine_tuned)
    return vit.to(device).eval(), ccfg, ckpt


def mae_of(vit, ccfg, ckpt, key, device):
    """The MAE (encoder + decoder) of a pretrain_mae.py / distill.py checkpoint; None for other checkpoints."""
    if not any(k.startswith("decoder.") for k in ckpt.get(key, {})):
        return None
    names = {f.name for f in fields(pretrain_mae.Config)}
    mae = pretrain_mae.MAE(pretrain_mae.Config(**{**{k: v for k, v in ccfg.items() if k in names},
                                                  "num_heads": vit.num_heads})).to(device).eval()
    mae.load_state_dict({k: v for k, v in ckpt[key].items() if k.startswith(("encoder.", "decoder."))})
    return mae


@torch.no_grad()
def last_layer_maps(vit, crops):
    """crops in [0, 1] -> (B, H + 1, g, g): the last layer's cls-to-patch attention per head (softmax over every token,
    the cls row), then the mean over heads."""
    _, attns, _ = vit.forward_features(augment.normalize(crops), return_attn=True)
    maps = attns[-1].float().softmax(-1)[:, :, 0, 1:]  # (B, H, L): where the cls token looks
    maps = torch.cat([maps, maps.mean(1, keepdim=True)], 1)
    return maps.unflatten(-1, (vit.grid, vit.grid)).cpu()


def uniform_values(grid, patch_size):
    """Attention distance (px) and entropy (nats) of uniform attention over the grid: the 'looks everywhere' line."""
    return patch_distances(grid, patch_size).mean().item(), math.log(grid * grid)


def save_plots(result, out_dir, grid, patch_size):
    pyplot = figures.plt()
    names = [os.path.basename(os.path.dirname(n)) + "/" + os.path.basename(n) for n in result["names"]]
    cka_vals = torch.tensor(result["cka"]).T
    lo = math.floor(cka_vals.min().item() * 20) / 20  # fitted to the data: a 0-1 scale hides 0.84 vs 1.0
    fig, ax = pyplot.subplots(figsize=(5, 4))
    im = ax.imshow(cka_vals.numpy(), origin="lower", cmap="magma", vmin=lo, vmax=1)
    ax.set_xlabel(f"after block k ({names[0]}; 0 = embedding)")
    ax.set_ylabel(f"after block k ({names[-1]})")
    pair = ("of the model with itself (no --ckpt2: the diagonal is 1 by construction)" if len(result["names"]) == 1
            else "between two models' layers")
    ax.set_title(f"Linear CKA {pair}, {result['num_images']} test images", fontsize=9)
    fig.colorbar(im, label=f"CKA (colour scale {lo:.2f} to 1)")
    fig.savefig(os.path.join(out_dir, "cka.png"), dpi=120, bbox_inches="tight")
    pyplot.close(fig)
    uniform = result["uniform"]
    for metric, unit, top in (("attn_distance", "pixels", None), ("attn_entropy", "nats", uniform["attn_entropy"])):
        fig, ax = pyplot.subplots(figsize=(6, 4))
        for name, color, per_layer in zip(names, ("C0", "C1"), result[metric]):
            v = torch.tensor(per_layer)  # (depth, H)
            layers = torch.arange(1, len(v) + 1)[:, None].expand_as(v)
            ax.scatter(layers.flatten().numpy(), v.flatten().numpy(), s=8, color=color, alpha=0.5)
            ax.plot(layers[:, 0].numpy(), v.mean(1).numpy(), color=color, label=f"{name} (mean over heads)")
        ax.axhline(uniform[metric], color="k", ls="--", lw=1, label=f"uniform attention ({uniform[metric]:.2f})")
        ax.set_ylim(0, max(top or 0, ax.get_ylim()[1]))  # from 0: a zoomed axis makes 1 px look dramatic
        ax.set_xticks(range(1, len(result[metric][0]) + 1))
        ax.set_xlabel("block")
        ax.set_ylabel(f"{metric.replace('_', ' ')} ({unit})")
        ax.set_title(f"{metric.replace('attn_', 'Attention ')} per head and block, over patches "
                     f"({grid}x{grid} grid of {patch_size}-px patches)", fontsize=9)
        ax.legend(fontsize=7)
        fig.savefig(os.path.join(out_dir, f"{metric}.png"), dpi=120, bbox_inches="tight")
        pyplot.close(fig)


def what_it_reads(vit):
    """What the attention figures say about the classifier: a fine-tuned model never reads the cls token."""
    return ("its classifier reads the mean of the patch tokens, never cls: these maps show where cls looks, not "
            "what decides the class" if vit.global_pool else "")


def figure_stems(paths):
    """A name per image file for its figures: its own (000), or, where two files share one, its path below their
    common folder (val/a/000.jpg, val/b/000.jpg -> a_000_jpg, b_000_jpg)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root).replace(os.sep, "_").replace(".", "_") for p in paths]


def image_figures(cfg, vit, ccfg, ckpt, device):
    """--image: per file, its attention maps and (with a decoder) its masked input and reconstruction."""
    mae, written = mae_of(vit, ccfg, ckpt, cfg.key, device), []
    for path, name in zip(cfg.image, figure_stems(cfg.image)):
        img = TF.pil_to_tensor(load_rgb(path)).to(device)
        crop = augment.center_crop(img[None], vit.patch_embed.img_size)  # the eval view: resize, centre crop
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


@torch.no_grad()
def main(cfg):
    # --- setup ---
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(cfg.out_dir, exist_ok=True)
    paths = [(cfg.ckpt, cfg.key)] + ([(cfg.ckpt2, cfg.key2)] if cfg.ckpt2 else [])
    models = [load_model(p, k, cfg, device) for p, k in paths]
    names = [p for p, _ in paths]
    if cfg.image:
        return image_figures(cfg, *models[0], device)

    # --- data --- (the first model's input size; a second model resizes its position embedding on the fly)
    img_size = models[0][0].patch_embed.img_size
    dataset, _ = build_dataset(cfg.data, cfg.data_root, False, cfg.num_images, cfg.classes)
    loader = Loader(dataset, cfg.batch_size, False, 0, device, [(img_size, "center")], drop_last=True)  # HSIC: equal
    # minibatches
    check(len(loader) > 0, f"{len(dataset)} images is fewer than one batch of {cfg.batch_size}")

    # --- measure ---
    sums = dict(xy=0.0, xx=0.0, yy=0.0)
    dist_sum = [0.0 for _ in models]
    ent_sum = [0.0 for _ in models]
    for crops, _ in loader:
        imgs = augment.normalize(crops[0])
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
                  attn_distance=[(s / n).tolist() for s in dist_sum], attn_entropy=[(s / n).tolist() for s in ent_sum],
                  uniform=dict(zip(("attn_distance", "attn_entropy"), uniform_values(models[0][0].grid,
                                                                                     models[0][0].patch_embed.patch_size))))

    # --- reconstructions --- (checkpoints of pretrain_mae.py / distill.py carry the decoder)
    written = ["analysis.json", "cka.png", "attn_distance.png", "attn_entropy.png"]
    mae = mae_of(*models[0], cfg.key, device)
    if mae is not None:
        view = augment.normalize(figure_images(dataset, 8, img_size, device))
        figures.save_reconstructions(mae, view, f"{type(mae).__name__} reconstructions of {cfg.ckpt}",
                                          os.path.join(cfg.out_dir, "recon.png"), cfg.mask_seed)
        written.append("recon.png")

    # --- per-head attention maps of each model on test images, one per class first ---
    labels = label_names(dataset, cfg.data, figure_indices(dataset.labels, cfg.num_map_images))
    for i, ((vit, *_), name) in enumerate(zip(models, names)):
        crops = figure_images(dataset, cfg.num_map_images, vit.patch_embed.img_size, device)
        figures.attention_panels(crops, last_layer_maps(vit, crops), name,
                                 os.path.join(cfg.out_dir, f"attn_maps{i + 1 if i else ''}.png"), labels,
                                 cfg.shared_scale, what_it_reads(vit))
        written.append(f"attn_maps{i + 1 if i else ''}.png")

    # --- save ---
    with open(os.path.join(cfg.out_dir, "analysis.json"), "w") as f:
        json.dump(result, f)
    save_plots(result, cfg.out_dir, models[0][0].grid, models[0][0].patch_embed.patch_size)
    for name, dists, ents in zip(names, result["attn_distance"], result["attn_entropy"]):
        print0(f"{name}: attention distance per layer (px) "
               + " ".join(f"{sum(d) / len(d):.1f}" for d in dists)
               + " | entropy (nats) " + " ".join(f"{sum(e) / len(e):.2f}" for e in ents))
    print0("CKA diagonal: " + " ".join(f"{result['cka'][i][i]:.2f}" for i in range(min(len(result['cka']),
                                                                                     len(result['cka'][0])))))
    print0(f"wrote {cfg.out_dir}/" + ", ".join(written))
    return result


if __name__ == "__main__":
    cli(main, Config)
