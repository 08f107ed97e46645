"""Figures shared by the stages, analyze.py and the study: image grids, MAE reconstructions, attention maps, and
analyze.py's CKA and attention plots."""
import json
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
        axes[i, 0].imshow(images[i].float().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[i, 0].set_ylabel((row_labels or [f"image {j + 1}" for j in range(n)])[i], fontsize=8)
        for p in range(panels):
            m = maps[i, p].float().cpu().numpy()  # arrays: matplotlib's copy of a tensor warns under numpy 2
            vmax = top if shared_scale else m.max().item()
            axes[i, p + 1].imshow(grey[i].numpy(), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
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
    # a grey set stays grey in every row: norm-pix normalises each patch over its three channels after ImageNet's
    # per-channel normalisation, so a grey image's prediction and patch units differ by channel (drawn as they are,
    # grey comes out blue); for a grey set those rows show the channels' mean
    originals = to_pixels(imgs)
    grey = bool((originals.amax(1) - originals.amin(1)).max() < 1e-2)
    in_grey = (lambda v: v.unflatten(-1, (-1, 3)).mean(-1, keepdim=True).expand(-1, -1, -1, 3).flatten(2)
               ) if grey else (lambda v: v)  # (B, L, p*p*C) -> each pixel's channel mean in all three
    mean_of = ",\nmean of channels" if grey else ""
    pasted = to_pixels(unpatchify(target * (1 - m) + pixels * m, p, grid))  # the visible patches pasted back
    removed = f"{int(mask[0].sum())} of\n{mask.shape[1]} removed"  # the count, not the ratio: 0.9 of 16 hides 15
    rows = [("original", originals),
            (f"masked input\n(grey: {removed})", unpatchify(patchify(originals, p) * (1 - m) + 0.5 * m, p, grid)),
            (f"reconstruction{mean_of}", unpatchify(in_grey(patchify(pasted, p)), p, grid))]
    if mae.cfg.norm_pix_loss:
        teal = torch.tensor([0.0, 0.5, 0.5], device=imgs.device).repeat(p * p)  # (p*p*C): pixels (row, col, channel)
        units = lambda x: unpatchify(in_grey((0.5 + x / 4).clamp(0, 1)) * m + teal * (1 - m), p, grid)  # noqa: E731
        rows += [(f"prediction\n(patch units{mean_of};\nteal: visible)", units(pred)),
                 (f"target\n(patch units{mean_of};\nteal: visible)", units((target - mean) / std))]
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
    ax.set_xticks(range(cka_vals.shape[1]))  # whole layers, not the pixel edges at k - 0.5
    ax.set_yticks(range(cka_vals.shape[0]))
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
        ax.set_ylim(0, 1.08 * max(top or 0, ax.get_ylim()[1]))  # from 0: a zoomed axis makes 1 px look dramatic;
        # a margin above, so that the uniform line is not drawn on the frame
        ax.set_xticks(range(1, len(result[metric][0]) + 1))
        ax.set_xlabel("block")
        ax.set_ylabel(f"{metric.replace('_', ' ')} ({unit})")
        ax.set_title(f"{metric.replace('attn_', 'Attention ')} per head and block, over patches "
                     f"({grid}x{grid} grid of {patch_size}-px patches)", fontsize=9)
        ax.legend(fontsize=7, framealpha=0.5)  # see-through: the points under it still show
        fig.savefig(os.path.join(out_dir, f"{metric}.png"), dpi=120, bbox_inches="tight")
        pyplot.close(fig)


# --- training curves: every run's curves.png, analyze.py --runs' overlay, the main job's dashed reference ---
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reference")
REFERENCES = {"pretrain_mae": "mae", "finetune": "finetune"}  # stage -> results/reference/<name>.jsonl
# flags that never shape a curve: where files go and how they are read; every other flag must equal the reference's
NOT_SHAPING = ("out_dir", "resume", "num_workers", "compile", "data_root")
PANELS = (("loss", "loss (epoch mean)"), ("lr", "learning rate (epoch's last step)"), ("accuracy", "accuracy (%)"),
          ("entropy", "teacher entropy (nats)"))


def reference_of(stage, config):
    """The main job's log rows when this run has its settings (same stage, every flag but NOT_SHAPING equal to the
    config stored beside the log), else None."""
    name = REFERENCES.get(stage)
    path = os.path.join(REFERENCE_DIR, f"{name}.jsonl")
    if name is None or not os.path.exists(path):
        return None
    with open(os.path.join(REFERENCE_DIR, f"{name}.config.json")) as f:
        ref_config = json.load(f)
    if any(config.get(k) != v for k, v in ref_config.items() if k not in NOT_SHAPING):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_series(rows, config):
    """{panel: [(metric, epochs, values)]}: what a log's rows hold, each metric in its panel."""
    series = {}
    for key in rows[0]:
        if key in ("epoch", "step", "imgs_per_s", "best_top1", "code", "momentum") or not isinstance(rows[0][key],
                                                                                                      (int, float)):
            continue
        panel = ("lr" if key == "lr" else "accuracy" if key in ("top1", "top5") else
                 "entropy" if key == "teacher_entropy" else "loss")
        pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        series.setdefault(panel, []).append((key, [e for e, _ in pts], [v for _, v in pts]))
    return series


def curves(runs, path, title, reference=None):
    """runs: [(label, log rows, config)] -> one panel per quantity (loss and the method's parts, lr, top-1/top-5,
    DINO's teacher entropy against ln K), x in epochs; reference: the main job's rows, dashed. Small and Agg: an
    epoch's redraw costs a fraction of a second."""
    pyplot = plt()
    per_run = [(label, curve_series(rows, config), config) for label, rows, config in runs if rows]
    ref = curve_series(reference, {}) if reference else {}
    panels = [(p, unit) for p, unit in PANELS if any(p in s for _, s, _ in per_run)]
    fig, axes = pyplot.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.9), squeeze=False)
    for ax, (panel, unit) in zip(axes[0], panels):
        for i, (label, series, config) in enumerate(per_run):
            for j, (metric, epochs, values) in enumerate(series.get(panel, [])):
                name = metric if len(per_run) == 1 else f"{label}: {metric}"
                ax.plot(epochs, values, color=f"C{(i * 3 + j) % 10}", marker="." if len(epochs) < 30 else None,
                        label=name)
            if panel == "entropy" and config.get("head_out_dim"):  # DINO: ln K = uniform over the K prototypes
                ax.axhline(math.log(config["head_out_dim"]), color=f"C{i * 3}", ls=":", lw=1,
                           label=f"ln K = ln {config['head_out_dim']} (uniform; 0 = collapse)")
        for metric, epochs, values in ref.get(panel, []):
            ax.plot(epochs, values, color="k", ls="--", lw=1, alpha=0.6, label=f"main job's reference: {metric}")
        if panel == "entropy":
            ax.set_ylim(0, None)  # from 0 = collapse up to ln K = uniform
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.legend(fontsize=7, framealpha=0.5)  # see-through: where no corner is free, the curve shows under it
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot.close(fig)


def run_curves(stage, out_dir, rows, config, path):
    """A run's own curves.png, with the main job's reference when it has the main job's settings."""
    reference = reference_of(stage, config)
    note = "; dashed: the main job's reference log" if reference else ""
    curves([(out_dir, rows, config)], path, f"{stage}.py run {out_dir}: epoch {rows[-1]['epoch']} of "
           f"{config.get('epochs', '?')}{note}", reference)
