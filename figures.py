"""Figures shared by the stages, analyze.py and the study: image grids, MAE reconstructions, attention maps, and
analyze.py's CKA and attention plots."""
import math
import os
import textwrap

import torch

import augment
from model import patchify, unpatchify

MIN_SIDE = 112  # pixels on screen per image, at least: a 28-px digit is drawn 4x


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def to_pixels(x):
    """ImageNet-normalised (B, 3, H, W) -> [0, 1] pixels."""
    mean = torch.tensor(augment.IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def canvas(rows, pad=2):
    """rows of (B, 3, H, W) in [0, 1] -> ((H', W', 3) image, cell size); each image upscaled by an integer factor to
    at least MIN_SIDE, by nearest neighbour so each patch stays a visible square."""
    n_rows, (n_cols, _, h, w) = len(rows), rows[0].shape
    k = max(1, math.ceil(MIN_SIDE / min(h, w)))
    cell_h, cell_w = h * k + pad, w * k + pad
    out = torch.ones(n_rows * cell_h + pad, n_cols * cell_w + pad, 3)
    for r, batch in enumerate(rows):
        big = batch.float().cpu().repeat_interleave(k, -2).repeat_interleave(k, -1)
        for c in range(n_cols):
            y, x = pad + r * cell_h, pad + c * cell_w
            out[y:y + h * k, x:x + w * k] = big[c].permute(1, 2, 0)
    return out, (cell_h, cell_w)


def image_grid(rows, row_labels, title, path, col_labels=None, note=""):
    """Labelled image grid with a title and an optional note."""
    pyplot = plt()
    img, (ch, cw) = canvas(rows)
    dpi = 100
    w_in, h_in = img.shape[1] / dpi, img.shape[0] / dpi  # inches of image; margins for labels and title
    fig = pyplot.figure(figsize=(w_in + 1.6, h_in + 0.9), dpi=dpi)
    ax = fig.add_axes((1.5 / (w_in + 1.6), 0.15 / (h_in + 0.9), w_in / (w_in + 1.6), h_in / (h_in + 0.9)))
    ax.imshow(img.numpy(), interpolation="nearest")
    ax.set_yticks([2 + ch * (r + 0.5) for r in range(len(rows))], row_labels, fontsize=8)
    ax.set_xticks([2 + cw * (c + 0.5) for c in range(rows[0].shape[0])] if col_labels else [],
                  col_labels or [], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    title = "\n".join(textwrap.fill(line, max(60, int(w_in * 14))) for line in title.split("\n"))
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / (h_in + 0.9), va="top")
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, va="bottom", wrap=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot.close(fig)


def attention_panels(images, maps, title, path, row_labels=None, shared_scale=True, note=""):
    """Attention maps over their images: images (n, 3, S, S) in [0, 1], maps (n, P, g, g) (heads, then their mean).
    shared_scale: one scale from 0 for the figure, so near-uniform attention looks flat; else each map is stretched
    to its own max (shows structure, hides level). Maps lie over the grey image: a heat map reads best on grey."""
    pyplot = plt()
    n, panels, g = maps.shape[0], maps.shape[1], maps.shape[-1]
    grey = images.float().mean(1).cpu()
    size = max(1.3, MIN_SIDE / 80)
    fig, axes = pyplot.subplots(n, panels + 1, figsize=(size * (panels + 1) + 0.8, size * n + 0.7), squeeze=False)
    top = maps.max().item()
    for i in range(n):
        axes[i, 0].imshow(images[i].float().cpu().permute(1, 2, 0).clamp(0, 1), interpolation="nearest")
        axes[i, 0].set_ylabel((row_labels or [f"image {j + 1}" for j in range(n)])[i], fontsize=8)
        for p in range(panels):
            m = maps[i, p]
            vmax = top if shared_scale else m.max().item()
            axes[i, p + 1].imshow(grey[i], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
            im = axes[i, p + 1].imshow(m, cmap="inferno", alpha=0.65, vmin=0, vmax=vmax, interpolation="nearest",
                                       extent=(-0.5, grey.shape[-1] - 0.5, grey.shape[-2] - 0.5, -0.5))
    axes[0, 0].set_title("input", fontsize=8)
    for p in range(panels):
        axes[0, p + 1].set_title(f"head {p + 1}" if p < panels - 1 else "mean of heads", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    if shared_scale:
        bar = fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01)
        bar.ax.axhline(1 / g ** 2, color="cyan", lw=1.5)
        bar.set_label(f"attention weight (cyan: uniform, 1/{g * g})", fontsize=7)
    scale = "one colour scale for every map" if shared_scale else "each map scaled to its own maximum"
    note = f"\n{note}" if note else ""
    fig.suptitle(f"{title}\nlast layer, cls-to-patch attention ({scale}; bright = most attended){note}", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot.close(fig)


@torch.no_grad()
def reconstruction_rows(mae, imgs, seed=0):
    """(row label, images in [0, 1]): original, masked input, reconstruction with the visible patches pasted in; with
    norm-pix also prediction and target in patch units (what the loss compares; +-2 std black to white; visible
    patches, not scored, teal)."""
    p, grid = mae.cfg.patch_size, mae.encoder.grid
    g = torch.Generator(device=imgs.device).manual_seed(seed)  # same masks every epoch, training RNG untouched
    pred, mask, *_ = mae.encode_decode(imgs, generator=g)
    target, m = patchify(imgs, p), mask[..., None]  # m: (B, L, 1), 1 = removed
    mean, std = target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    pixels = pred * std + mean if mae.cfg.norm_pix_loss else pred  # de-normalised with the TRUE patch's mean, std
    rows = [("original", imgs), ("masked input\n(grey: removed)", unpatchify(target * (1 - m), p, grid)),
            ("reconstruction", unpatchify(target * (1 - m) + pixels * m, p, grid))]
    rows = [(label, to_pixels(x)) for label, x in rows]
    if mae.cfg.norm_pix_loss:
        teal = torch.tensor([0.0, 0.5, 0.5], device=imgs.device).repeat(p * p)  # (p*p*C): pixels (row, col, channel)
        units = lambda x: unpatchify((0.5 + x / 4).clamp(0, 1) * m + teal * (1 - m), p, grid)  # noqa: E731
        rows += [("prediction\n(patch units;\nteal: visible)", units(pred)),
                 ("target\n(patch units;\nteal: visible)", units((target - mean) / std))]
    return rows


def save_reconstructions(mae, imgs, title, path, seed=0):
    rows = reconstruction_rows(mae, imgs, seed)
    how = ("each predicted patch drawn with the true patch's mean and std (norm-pix): judge the prediction by the "
           "patch-unit rows" if mae.cfg.norm_pix_loss else "predicted pixels as they are (no norm-pix)")
    title = f"{title}\nmask ratio {mae.cfg.mask_ratio:g}, fixed masks (seed {seed}); reconstruction: {how}"
    if len(imgs) == 1:  # one image: its rows side by side
        image_grid([torch.cat([x for _, x in rows])], [""], title, path, [label for label, _ in rows])
    else:
        image_grid([x for _, x in rows], [label for label, _ in rows], title, path)


def analysis_plots(result, out_dir, grid, patch_size):
    """analyze.py's result as cka.png, attn_distance.png and attn_entropy.png (uniform attention dashed)."""
    pyplot = plt()
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
