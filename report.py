"""results/REPORT.md and its figures from the study's results (reproduce.py): one function per claim, each a table,
a verdict by a stated rule and a figure. Runs are chosen by their tags (method, seed, eval, shots, keep), never by
parsing their names."""
import functools
import json
import math
import os
import platform
import shutil

import figures
from analyze import uniform_values
from data import build_dataset
from model import VIT_SIZES

METHODS = {"mae": "MAE", "mocov3": "MoCo-v3", "dino": "DINO", "dmae": "D-MAE"}  # the pre-trainings compared
NAMES = dict(METHODS, scratch="supervised (scratch)", supervised="supervised (scratch)", random="random init")
PRETTY = {"embedded": "Fashion-MNIST slice", "mnist": "MNIST slice"}


def select(runs, results, key="top1", **tags):
    """The values of every finished run whose tags match, in seed order: what the report's tables are made of."""
    return [results[r.name][key] for r in runs if r.name in results and all(r.tags.get(k) == v for k, v in
                                                                              tags.items())]


@functools.lru_cache(maxsize=None)
def train_images(data, root, subset, classes):
    """The study's training-set size, counted as the stages count it."""
    return len(build_dataset(data, root, True, subset, classes)[0])


# --- statistics and verdicts ---
def stats(values):
    """(mean, sample std, n)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0, n


def fmt(values):
    if not values:
        return "-"
    m, s, n = stats(values)
    return f"{m:.1f} ± {s:.1f} (n={n})"


def compare(a, b):
    """'>' if mean(a) exceeds mean(b) by more than twice the standard error of the difference, '<' for the reverse,
    '≈' (within noise) otherwise; with one seed the standard error is unknown and any difference counts."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    se = (sa ** 2 / na + sb ** 2 / nb) ** 0.5
    return ">" if ma - mb > 2 * se else "<" if mb - ma > 2 * se else "≈"


def verdict(signs, wanted):
    """Every comparison as the paper has it: reproduced; none, some reversed: not reproduced; none, all within noise:
    not shown; otherwise mixed."""
    ok = sum(s == w for s, w in zip(signs, wanted))
    reversed_ = sum(s not in (w, "≈") for s, w in zip(signs, wanted))
    if ok == len(signs):
        return "**reproduced**"
    if ok == 0:
        return "**not reproduced**" if reversed_ else "**not shown** (within noise)"
    return "**mixed**"


def mean_curve(curves):
    """Mean over seeds, epoch by epoch."""
    return [sum(c[i] for c in curves) / len(curves) for i in range(min(len(c) for c in curves))] if curves else []


# --- plotting helpers ---
class Figures:
    def __init__(self, out_dir):
        self.dir, self.plt = os.path.join(out_dir, "figures"), figures.plt()
        os.makedirs(self.dir, exist_ok=True)

    def new(self, w=5.5, h=3.5):
        return self.plt.subplots(figsize=(w, h))

    def save(self, fig, name):
        fig.savefig(os.path.join(self.dir, name), dpi=120, bbox_inches="tight")
        self.plt.close(fig)
        return f"figures/{name}"


def mean_std_line(ax, xs, per_x, label):  # per_x: one list of seed values per x
    st = [stats(v) if v else (math.nan, 0.0, 0) for v in per_x]
    ax.errorbar(xs, [m for m, _, _ in st], yerr=[sd for _, sd, _ in st], marker="o", capsize=3, label=label)


# --- the report ---
def adopted_note(results):
    adopted = sorted(name for name, r in results.items() if r.get("adopted"))
    return (f"; not counted: {', '.join(adopted)}, run by their own commands (`reproduce.py --plan`) with these "
            "settings and adopted from their logs") if adopted else ""


def header(cfg, runs, results, wall):
    seeds, core_s = cfg.seed_list, sum(r["seconds"] for r in results.values())
    transfer = [r for r in runs if r.tags.get("eval") == "transfer" and r.tags.get("method") == "mae"
                and r.tags.get("seed") == seeds[0]]
    where = (f"GPUs {','.join(cfg.devices)}, {cfg.gpus_per_run} per long run" if cfg.devices else
             f"{os.cpu_count()} CPU cores ({platform.machine()}), {cfg.jobs} runs at a time, {cfg.threads} thread each")
    return [
        "# Reproduction study\n",
        f"Regenerate: `python reproduce.py{' --quick' if cfg.quick else ''}`{'' if cfg.quick else ' (the defaults)'}; "
        f"it skips runs whose result.json exists, so delete `{cfg.out_dir}/runs/` to start over (this report and "
        f"its figures are rewritten at the end). Seeds {cfg.seeds}; every "
        f"table cell is mean ± sample std over them (n = seeds). Hardware: {where}; {core_s / 60:.0f} run-minutes ("
        f"the sum of every run's own time{adopted_note(results)}), {wall / 60:.0f} min wall-clock in the invocation "
        "that wrote this report (finished runs are read back).\n",
        f"Setting: data `{cfg.data}`{f' (classes: {cfg.classes})' if cfg.classes else ''} "
        f"({train_images(cfg.data, cfg.data_root, cfg.subset, cfg.classes)} training images), ViT "
        f"`{cfg.model}` {VIT_SIZES[cfg.model]} at {cfg.img_size} px with {cfg.patch_size}-px patches; pre-training "
        + (f"{cfg.pretrain_epochs} epochs for MAE and D-MAE, {cfg.contrastive_epochs} for MoCo-v3 and DINO"
           if cfg.contrastive_epochs else f"{cfg.pretrain_epochs} epochs for every method")
        + (f" (D-MAE's teacher: `{cfg.teacher_ckpt}`); " if cfg.teacher_ckpt else
           f" (D-MAE's teacher: one `{cfg.teacher_model}` MAE, first seed, shared); ")
        + (f"fine-tuning {cfg.finetune_epochs} epochs and the from-scratch baseline {cfg.scratch_epochs}, linear "
           "probes " if cfg.scratch_epochs else
           f"fine-tuning and the from-scratch baseline {cfg.finetune_epochs} epochs, linear probes ") +
        f"{cfg.linear_epochs}, the layer study {cfg.layer_epochs}, all with the paper's fine-tuning recipe (AdamW, "
        "warm-up + cosine; MAE layer decay 0.85, MoCo-v3/DINO 0.75, none from scratch) at base lr "
        f"{cfg.finetune_lr:g}, mixup {cfg.finetune_mixup:g}, RandAugment magnitude {cfg.finetune_randaug} (the paper: "
        "1e-3, 0.2, 10; see README for why). Accuracy is the **last epoch's** top-1 on the test split (no choice by "
        f"test accuracy). Transfer: `{cfg.transfer_data}` with {cfg.transfer_shots or 'all'} labels per class (the "
        f"same class-balanced images for every seed), the paper's transfer recipe (SGD, lr {cfg.transfer_lr:g}, batch "
        f"{cfg.transfer_batch}, crop scale ({cfg.transfer_crop:g}, 1), flips, no mixup or RandAugment; "
        + ", ".join(f"{r.cfg.epochs} epochs at {r.cfg.subset or 'all'}" for r in transfer) + " images), the head "
        "re-initialised. A verdict `A > B` needs the mean difference to exceed twice its standard error.\n",
    ] + (["**--quick: micro sizes, one seed, one epoch. These numbers only show that every step runs.**\n"]
         if cfg.quick else [])


def claim1(cfg, runs, results, figs):
    get = lambda **t: select(runs, results, **t)
    seeds, dname = cfg.seed_list, PRETTY.get(cfg.data, cfg.data)
    out = ["## Claim 1: MAE pre-training beats training from scratch and MoCo-v3 after fine-tuning\n",
           "| pre-training | fine-tune top-1 | linear probe top-1 | k-NN top-1 (k 20, T 0.07) |", "|---|---|---|---|",
           f"| none: supervised from scratch | {fmt(get(method='scratch', eval='ft'))} | - | - |",
           f"| none: random-initialised backbone | - | - | {fmt(get(method='random', eval='knn'))} |"]
    for m, label in METHODS.items():
        out.append(f"| {label} | {fmt(get(method=m, eval='ft'))} | {fmt(get(method=m, eval='lin'))} | "
                   f"{fmt(get(method=m, eval='knn'))} |")
    mae, scr, moco = get(method="mae", eval="ft"), get(method="scratch", eval="ft"), get(method="mocov3", eval="ft")
    signs = [compare(mae, scr), compare(mae, moco)]
    out.append(f"\nMAE vs scratch: {signs[0]}; MAE vs MoCo-v3: {signs[1]} (fine-tuning). "
               f"Verdict: {verdict(signs, '>>')}.\n")
    curve = mean_curve(get(key="curve", method="scratch", eval="ft"))
    long = get(key="curve", method="scratch", eval="ft_long")
    fig, ax = figs.new(6.5, 4)
    for m, label in [("scratch", NAMES["scratch"])] + list(METHODS.items()):
        c = mean_curve(get(key="curve", method=m, eval="ft"))
        ax.plot(range(1, len(c) + 1), c, marker="." if len(c) < 5 else None, label=label)
    for c in long:
        ax.plot(range(1, len(c) + 1), c, "k:", label=f"scratch x2 (seed {seeds[0]})")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Fine-tuning on {dname}: test top-1 per epoch (mean of {len(seeds)} seeds)")
    ax.legend(fontsize=8)
    out.append(f"Is the baseline converged? From scratch, mean top-1 of the last five epochs: "
               f"{', '.join(f'{v:.1f}' for v in curve[-5:])}. "
               + (f"The same recipe for twice the epochs (seed {seeds[0]}): {long[0][-1]:.1f} (vs {scr[0]:.1f} at "
                  f"{cfg.scratch_epochs or cfg.finetune_epochs} epochs). " if long else
                  "(No run at twice the epochs: --long_baseline=false.) ")
               + f"![top-1 per epoch]({figs.save(fig, 'curves.png')})\n")
    out += dino(cfg, runs, results, figs)
    return out, signs


def dino(cfg, runs, results, figs):
    """DINO against the random floor, the sweep that found its settings, and its loss and teacher entropy against
    their collapse values (ln K: a uniform output; 0: a one-hot one)."""
    get = lambda **t: select(runs, results, **t)
    s0, floor, knn_ = cfg.seed_list[0], get(method="random", eval="knn"), get(method="dino", eval="knn")
    out = [f"DINO's k-NN against the random-initialised floor: {fmt(knn_)} vs {fmt(floor)} ({compare(knn_, floor)}, "
           f"{stats(knn_)[0] - stats(floor)[0]:+.1f} points)."]
    study_dino = [r for r in runs if r.kind == "pretrain" and r.tags.get("method") == "dino" and r.name in results]
    moco = [r for r in runs if r.kind == "pretrain" and r.tags.get("method") == "mocov3"]
    if study_dino and moco:  # equal epochs; a smaller batch is more steps, and the report says so
        n = train_images(cfg.data, cfg.data_root, cfg.subset, cfg.classes)
        batch = {r.tags["method"]: r.cfg.batch_size_per_gpu * r.cfg.accum_steps for r in (study_dino[0], moco[0])}
        steps = {r.tags["method"]: n // batch[r.tags["method"]] * r.cfg.epochs for r in (study_dino[0], moco[0])}
        out.append(f"DINO trains the same {study_dino[0].cfg.epochs} epochs as "
                   f"{'MoCo-v3' if cfg.contrastive_epochs else 'every method'}, at batch "
                   f"{batch['dino']} with {study_dino[0].cfg.head_out_dim} prototypes: "
                   f"{steps['dino']} optimizer steps against MoCo-v3's {steps['mocov3']} (the sweep below shows "
                   "what fewer steps give).")
    sweep = [r for r in runs if r.tags.get("sweep") and r.name in results]
    if sweep and study_dino:  # issue 18: what DINO needs to learn at this scale, every setting tried (seed 0)
        out += [f"\nDINO's sweep (seed {s0}; every other setting as the study's DINO, the same {cfg.pretrain_epochs} "
                f"epochs). The random floor of seed {s0}: {fmt(get(method='random', eval='knn', seed=s0))}.\n",
                "| setting | batch | prototypes K | teacher momentum | teacher temp. | base lr | k-NN top-1 | "
                "loss vs ln K | teacher entropy (end) |", "|---" * 9 + "|"]
        for r in study_dino[:1] + sweep:
            c, res = r.cfg, results[r.name]
            name = "**the study's DINO**" if r.tags["method"] == "dino" else r.tags["method"][5:]
            out.append(f"| {name} | {c.batch_size_per_gpu} | {c.head_out_dim} | {c.ema_momentum} | "
                       f"{c.warmup_teacher_temp} -> {c.teacher_temp} | {c.base_lr:g} | "
                       f"{fmt(get(method=r.tags['method'], eval='knn', seed=s0))} | "
                       f"{res['loss']:.2f} vs {math.log(c.head_out_dim):.2f} | "
                       f"{res.get('teacher_entropy', [math.nan])[-1]:.2f} |")
    pre = [r for r in runs if r.kind == "pretrain" and r.tags.get("method", "").startswith("dino") and r.name in
           results]
    out.append("DINO's loss against ln(prototypes), the loss of a collapsed (uniform) output: "
               + ", ".join(f"{r.name} {results[r.name]['loss']:.2f} vs {math.log(r.cfg.head_out_dim):.2f}" for r in pre)
               + ".")
    fig, axes = figs.plt.subplots(1, 2, figsize=(11, 3.5))
    methods = list(dict.fromkeys(r.tags["method"] for r in pre))  # the study's DINO, then the other settings
    labelled = set()
    for r in pre:
        m, res = r.tags["method"], results[r.name]
        color = f"C{methods.index(m)}"
        c = r.cfg  # a legend a person reads: what the setting is, not its name
        label = None if m in labelled else ("the study's: " if m == "dino" else "") + \
            f"batch {c.batch_size_per_gpu}, K {c.head_out_dim}, m {c.ema_momentum}" + \
            (f", T {c.teacher_temp}, lr {c.base_lr:g}" if c.teacher_temp == c.warmup_teacher_temp else "")
        labelled.add(m)
        for ax, key in zip(axes, ("losses", "teacher_entropy")):
            if key in res:  # the teacher's entropy is logged from issue 18 on
                ax.plot(range(1, len(res[key]) + 1), res[key], color=color, marker="o" if len(res[key]) < 5 else None,
                        label=label)
            ax.axhline(math.log(r.cfg.head_out_dim), color=color, ls=":", lw=1)
    axes[0].set_ylabel("DINO loss (nats)")
    axes[1].set_ylabel("teacher output entropy (nats)")
    axes[1].axhline(0, color="k", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("pre-training epoch")
        ax.legend(fontsize=8)
    fig.suptitle("DINO pre-training (K prototypes, m teacher momentum, T teacher temperature); dotted: ln K, a "
                 "uniform (collapsed) output, and 0, a one-hot collapse", fontsize=10)
    out.append(f"![DINO loss]({figs.save(fig, 'dino_loss.png')})\n")
    fig, ax = figs.new(6, 3.5)
    labels = list(METHODS.values())
    vals = [stats(get(method=m, eval="knn")) for m in METHODS]
    ax.bar(range(len(vals)), [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3, color="C0")
    ax.axhline(stats(floor)[0], color="k", ls="--", label="random-initialised backbone")
    ax.set_xticks(range(len(vals)), labels, fontsize=8, rotation=15)
    ax.set_ylabel("k-NN test top-1 (%)")
    ax.set_title(f"k-NN on frozen features after pre-training ({PRETTY.get(cfg.data, cfg.data)})")
    ax.legend(fontsize=8)
    out.insert(1, f"![k-NN]({figs.save(fig, 'knn.png')})\n")
    return out


def claim2(cfg, runs, results, figs):
    depth = VIT_SIZES[cfg.model]["depth"]
    ks = cfg.keep_list  # every K from 0 to depth, or --layer_keep's (0, depth // 2 and depth among them)
    layer = {m: {k: select(runs, results, method=m, eval="keep", keep=k) for k in ks} for m in ("mae", "mocov3")}
    out = ["## Claim 2: the lower layers matter more\n",
           f"Fine-tuning for {cfg.layer_epochs} epochs after keeping only the first K pre-trained blocks (the rest "
           f"re-initialised; K = {depth} keeps them all).\n",
           "| K | " + " | ".join(METHODS[m] for m in layer) + " |", "|---|---|---|"]
    out += [f"| {k} | {fmt(layer['mae'][k])} | {fmt(layer['mocov3'][k])} |" for k in ks]
    half, found, signs = depth // 2, [], []
    for m in layer:  # the claim needs a gain from the pre-trained blocks, most of it from the lower half
        lo, mid, hi = (stats(layer[m][k])[0] for k in (0, half, depth))
        gain = compare(layer[m][depth], layer[m][0])
        share = (mid - lo) / (hi - lo) if gain == ">" else 0.0
        signs += [gain, ">" if share > 0.5 else "<"]
        found.append(f"{METHODS[m]}: keeping all {depth} pre-trained blocks is {gain} re-initialising them all "
                     f"({hi:.1f} vs {lo:.1f}), so there is no gain to locate" if gain != ">" else
                     f"{METHODS[m]}: the lower {half} blocks give {100 * share:.0f}% of the gain of all {depth} "
                     f"({lo:.1f} -> {mid:.1f} -> {hi:.1f})")
    fig, ax = figs.new()
    for m in layer:
        mean_std_line(ax, ks, [layer[m][k] for k in ks], METHODS[m])
    ax.set_xlabel("pre-trained blocks kept (K), the rest re-initialised")
    ax.set_ylabel("fine-tuned test top-1 (%)")
    ax.set_title(f"Which pre-trained layers matter ({PRETTY.get(cfg.data, cfg.data)}, {cfg.layer_epochs} epochs, "
                 "mean ± std)")
    ax.legend(fontsize=8)
    out.append("\n" + "; ".join(found) + ". Verdict (K = depth above K = 0, and the lower half giving more than "
               f"half of that gain, for both): {verdict(signs, '>' * len(signs))}. "
               f"![layers]({figs.save(fig, 'layers.png')})\n")
    return out, signs


SOURCES = ("mae", "mocov3", "dmae", "supervised")


def claim3(cfg, runs, results, figs):
    td, shots = cfg.transfer_data, cfg.shot_list or [0]
    out = ["## Claim 3: on a data-poor task of another domain, MAE is worse than supervised and contrastive "
           "pre-training\n",
           f"Transfer to `{td}` (pre-trained on `{cfg.data}`), test top-1 after fine-tuning on the labelled images.\n",
           "| labels per class | " + " | ".join(NAMES[s] for s in SOURCES) + " | MAE vs supervised | MAE vs MoCo-v3 |",
           "|---" * (len(SOURCES) + 3) + "|"]
    signs = []
    for n in shots:
        v = {src: select(runs, results, method=src, eval="transfer", shots=n) for src in SOURCES}
        c = [compare(v["mae"], v["supervised"]), compare(v["mae"], v["mocov3"])]
        signs += c
        out.append(f"| {n or 'all'} | " + " | ".join(fmt(v[s]) for s in SOURCES) + f" | {c[0]} | {c[1]} |")
    fig, ax = figs.new()
    for src in SOURCES:
        mean_std_line(ax, shots, [select(runs, results, method=src, eval="transfer", shots=n) for n in shots],
                      NAMES[src])
    if len(shots) > 1:
        ax.set_xscale("log")
    ax.set_xticks(shots, [str(x) for x in shots])
    ax.set_xlabel("labelled images per class (log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Transfer {PRETTY.get(cfg.data, cfg.data)} -> {PRETTY.get(td, td)} with few labels (mean ± std)")
    ax.legend(fontsize=8)
    out.append(f"\nVerdict (MAE below both, at every size): {verdict(signs, '<' * len(signs))}. "
               f"![transfer]({figs.save(fig, 'transfer.png')})\n")
    return out, signs


def claim4(cfg, runs, results):
    td, shots = cfg.transfer_data, cfg.shot_list or [0]
    rows = [("fine-tune", dict(eval="ft")), ("linear probe", dict(eval="lin")), ("k-NN", dict(eval="knn"))] + \
        [(f"{td}, {n or 'all'} labels/class", dict(eval="transfer", shots=n)) for n in shots]
    out = ["## Claim 4: distilling a larger MAE's attention (D-MAE) helps, most on data-poor tasks\n",
           "| evaluation | MAE | D-MAE | D-MAE vs MAE |", "|---|---|---|---|"]
    signs, gains = [], []
    for label, tags in rows:
        a, b = select(runs, results, method="mae", **tags), select(runs, results, method="dmae", **tags)
        signs.append(compare(b, a))
        gains.append(stats(b)[0] - stats(a)[0])
        out.append(f"| {label} | {fmt(a)} | {fmt(b)} | {signs[-1]} ({gains[-1]:+.1f}) |")
    poor = gains[3:]
    out.append(f"\nVerdict (D-MAE above MAE everywhere): {verdict(signs, '>' * len(signs))}; the gain on the "
               f"data-poor task ({', '.join(f'{g:+.1f}' for g in poor)}) is "
               f"{'larger' if min(poor) > gains[0] else 'not larger'} than on fine-tuning ({gains[0]:+.1f}).\n")
    return out, signs


def inside(cfg, runs, figs):
    """The analysis runs' figures: attention distance per layer (with the uniform line), CKA, reconstructions, maps."""
    seed, folder = cfg.seed_list[0], lambda m: next(r.folder for r in runs if r.name == f"analysis_{m}")
    out = [f"## What the models look like inside (seed {seed})\n"]
    attn = {}
    for m, labels in (("mae", ("MAE", "supervised")), ("mocov3", ("MoCo-v3",)), ("dmae", ("D-MAE",))):
        with open(os.path.join(folder(m), "analysis.json")) as f:
            attn.update(zip(labels, json.load(f)["attn_distance"]))
    grid = cfg.img_size // cfg.patch_size
    uniform = uniform_values(grid, cfg.patch_size)[0]
    fig, axes = figs.plt.subplots(1, len(attn), figsize=(3 * len(attn), 3), sharey=True, squeeze=False)
    for ax, (label, d) in zip(axes[0], attn.items()):
        for li, heads in enumerate(d):
            ax.scatter([li + 1] * len(heads), heads, s=10, color="C0", alpha=0.6)
        ax.plot(range(1, len(d) + 1), [sum(h) / len(h) for h in d], color="C1", label="mean over heads")
        ax.axhline(uniform, color="k", ls="--", lw=1, label=f"uniform ({uniform:.1f} px)")
        ax.set_title(label)
        ax.set_xlabel("block")
        ax.set_xticks(range(1, len(d) + 1))
        ax.set_ylim(0, max(ax.get_ylim()[1], uniform * 1.1))
    axes[0, 0].set_ylabel("attention distance (pixels)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Mean attention distance per head and block ({PRETTY.get(cfg.data, cfg.data)} test images, "
                 f"{cfg.img_size} px, {cfg.patch_size}-px patches; seed {seed})", fontsize=10, y=1.04)
    out += ["| model | mean attention distance per block (pixels, mean over heads; uniform attention: "
            f"{uniform:.1f}) |", "|---|---|"]
    out += [f"| {label} | " + ", ".join(f"{sum(h) / len(h):.1f}" for h in d) + " |" for label, d in attn.items()]
    out.append(f"\n![attention distance]({figs.save(fig, 'attn_distance.png')})\n")
    copies = [("mae", "cka.png", "cka_mae_vs_supervised.png", "Linear CKA between the layers of MAE and the "
               "supervised model"),
              ("mae", "recon.png", "recon_mae.png", "MAE reconstructions"),
              ("dmae", "recon.png", "recon_dmae.png", "D-MAE reconstructions"),
              ("mae", "attn_maps.png", "attn_maps_mae.png", "MAE: last-layer attention per head"),
              ("mocov3", "attn_maps.png", "attn_maps_mocov3.png", "MoCo-v3: last-layer attention per head"),
              ("dmae", "attn_maps.png", "attn_maps_dmae.png", "D-MAE: last-layer attention per head"),
              ("mae", "attn_maps2.png", "attn_maps_supervised.png", "supervised: last-layer attention per head")]
    for m, src, dst, caption in copies:
        if os.path.exists(os.path.join(folder(m), src)):
            shutil.copyfile(os.path.join(folder(m), src), os.path.join(figs.dir, dst))
            out.append(f"{caption}:\n\n![{caption}](figures/{dst})\n")
    return out


def write_report(cfg, runs, results, wall):
    figs = Figures(cfg.out_dir)
    out = header(cfg, runs, results, wall)
    for part in (claim1(cfg, runs, results, figs), claim2(cfg, runs, results, figs),
                 claim3(cfg, runs, results, figs), claim4(cfg, runs, results)):
        out += part[0]
    out += inside(cfg, runs, figs)
    with open(os.path.join(cfg.out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {cfg.out_dir}/REPORT.md and {figs.dir}/", flush=True)
