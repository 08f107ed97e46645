"""REPORT.md and its figures: per claim a table, a verdict by a stated rule, and a figure. Reads what the study hands
over, none of its machinery; runs are chosen by their tags, never by their names."""
import collections
import dataclasses
import json
import math
import os
import platform
import shutil

import figures
from model import VIT_SIZES

METHODS = {"mae": "MAE", "mocov3": "MoCo-v3", "dino": "DINO", "dmae": "D-MAE"}
NAMES = dict(METHODS, scratch="supervised (scratch)", supervised="supervised (source's labels)", random="random init")
PRETTY = {"embedded": "Fashion-MNIST slice", "mnist": "MNIST slice"}
SOURCES = ("mae", "mocov3", "dmae", "supervised")  # claim 3's pre-trainings


def select(results, key="top1", **tags):
    """`key` of the runs whose tags match, in the study's order."""
    return [r[key] for r in results if all(r["tags"].get(k) == v for k, v in tags.items())]


def floor(results, key="top1", **tags):
    """A raw-pixel floor (pixels.py; deterministic, so one number): logistic regression (top1) or k-NN (knn_top1)."""
    values = select(results, key, method="pixels", **tags)
    return f"{values[0]:.1f}" if values else "-"


def stats(values):
    """(mean, sample std, n)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0, n


def fmt(values):
    return f"{stats(values)[0]:.1f} ± {stats(values)[1]:.1f} (n={len(values)})" if values else "-"


def compare(a, b):
    """'>' or '<' when the means differ by over twice the difference's standard error, else '≈'. One seed: any
    difference counts."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    se = (sa ** 2 / na + sb ** 2 / nb) ** 0.5
    return ">" if ma - mb > 2 * se else "<" if mb - ma > 2 * se else "≈"


def verdict(signs, wanted):
    """Every sign as the paper's (`wanted`): reproduced; none, some reversed: not reproduced; none, all within noise:
    not shown; else mixed."""
    ok = sum(s == w for s, w in zip(signs, wanted))
    if ok == len(signs):
        return "**reproduced**"
    if ok == 0:
        reversed_ = any(s not in (w, "≈") for s, w in zip(signs, wanted))
        return "**not reproduced**" if reversed_ else "**not shown** (within noise)"
    return "**mixed**"


def mean_curve(curves):
    """Mean over seeds, epoch by epoch."""
    return [sum(c[i] for c in curves) / len(curves) for i in range(min(len(c) for c in curves))] if curves else []


def table(head, rows):
    """A markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


class Figures:
    def __init__(self, out_dir):
        self.dir, self.plt = os.path.join(out_dir, "figures"), figures.plt()
        os.makedirs(self.dir, exist_ok=True)

    def new(self, w=5.5, h=3.5):
        return self.plt.subplots(figsize=(w, h))

    def save(self, fig, name, ax=None, xlabel="", ylabel="", title=""):
        """Label, save and close; the report's link."""
        if ax is not None:
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.savefig(os.path.join(self.dir, name), dpi=120, bbox_inches="tight")
        self.plt.close(fig)
        return f"figures/{name}"


def mean_std_line(ax, xs, per_x, label):  # per_x: one list of seed values per x
    st = [stats(v) if v else (math.nan, 0.0, 0) for v in per_x]
    ax.errorbar(xs, [m for m, _, _ in st], yerr=[sd for _, sd, _ in st], marker="o", capsize=3, label=label)


def given(s):
    """The flags this study was run with that differ from the defaults, as typed (a preset or --quick fills the
    others itself)."""
    if s.quick or s.preset:
        return " --quick" if s.quick else "".join(f" --{k}={getattr(s, k)}" for k in ("preset", "data_root",
                                                                                   "transfer_root") if getattr(s, k))
    return "".join(f" --{f.name}={getattr(s, f.name)}" if not isinstance(f.default, bool) else f" --{f.name}="
                   f"{str(getattr(s, f.name)).lower()}" for f in dataclasses.fields(s)
                   if f.init and f.default is not dataclasses.MISSING and getattr(s, f.name) != f.default)


def layer_decays(results):
    """The fine-tunes' layer decays, as their own configs say: 'MAE and D-MAE 0.85, ..., none from scratch'."""
    by_decay = {}
    for r in results:
        m = r["tags"].get("method")
        if r["tags"].get("eval") == "ft" and m in NAMES and r["config"].get("mode") != "scratch":
            by_decay.setdefault(f"{r['config']['layer_decay']:g}", []).append(NAMES[m])
    said = []
    for d, ms in by_decay.items():
        *most, last = dict.fromkeys(ms)  # each method once, in the order the study ran them
        said.append(f"{', '.join(most)} and {last} {d}" if most else f"{last} {d}")
    return ", ".join(said + ["none from scratch"])


def header(s, results, wall):
    core_s, adopted = sum(r["seconds"] for r in results), sorted(r["name"] for r in results if r.get("adopted"))
    adopted = (f"; not counted: {', '.join(adopted)}, run by their own commands (`study.reproduce --plan`) with these "
               "settings and adopted from their logs") if adopted else ""
    floor_side = next((r["config"]["img_size"] for r in results if r["tags"].get("eval") == "floor"), s.img_size)
    transfer = [r["config"] for r in results if r["tags"].get("eval") == "transfer"
                and r["tags"].get("method") == "mae" and r["tags"].get("seed") == s.seed_list[0]]
    where = (f"GPUs {','.join(s.devices)}, {s.gpus_per_run} per long run" if s.devices else
             f"{os.cpu_count()} CPU cores ({platform.machine()}), {s.jobs} runs at a time, {s.threads} thread each")
    return [
        "# Reproduction study\n",
        f"Regenerate: `python -m study.reproduce{s.typed}`{'' if s.typed else ' (the defaults)'}"
        f"; it skips runs whose result.json exists, so delete `{s.out_dir}/runs/` to start over (this report and "
        f"its figures are rewritten at the end). Seeds {s.seeds}; every table cell is mean ± sample std over them (n "
        f"= seeds). Hardware: {where}; {core_s / 60:.0f} run-minutes (the sum of every run's own time{adopted}), "
        + (f"{wall / 60:.0f} min wall-clock in the invocation that wrote this report (finished runs are read back).\n"
           if wall >= 60 else "this report was written from runs that had all finished earlier (read back).\n"),
        f"Setting: data `{s.data}`{f' (classes: {s.classes})' if s.classes else ''} ({s.train_images} training "
        f"images), ViT `{s.model}` {VIT_SIZES[s.model]} at {s.img_size} px with {s.patch_size}-px patches; "
        "pre-training " + (f"{s.pretrain_epochs} epochs for MAE and D-MAE, {s.contrastive_epochs} for MoCo-v3 and DINO"
                           if s.contrastive_epochs else f"{s.pretrain_epochs} epochs for every method")
        + (f" (D-MAE's teacher: `{s.teacher_ckpt}`); " if s.teacher_ckpt else
           f" (D-MAE's teacher: one `{s.teacher_model}` MAE, first seed, shared); ")
        + (f"fine-tuning {s.finetune_epochs} epochs and the from-scratch baseline {s.scratch_epochs}, linear probes "
           if s.scratch_epochs else f"fine-tuning and the from-scratch baseline {s.finetune_epochs} epochs, linear "
                                    "probes ") +
        f"{s.linear_epochs}, the layer study {s.layer_epochs}, all with the paper's fine-tuning recipe (AdamW, warm-up "
        f"+ cosine; layer decay: {layer_decays(results)}) at "
        "base lr "
        f"{s.finetune_lr:g}, mixup {s.finetune_mixup:g}, RandAugment magnitude {s.finetune_randaug}, crop scale "
        f"({s.finetune_crop:g}, 1) (the paper: 1e-3, 0.2, 10, 0.08; why: below). Accuracy is the **last "
        "epoch's** top-1 on the test split (no choice by "
        f"test accuracy). Transfer: `{s.transfer_data}` with {s.transfer_shots or 'all'} labels per class (the same "
        f"class-balanced images for every seed), the paper's transfer recipe (SGD, lr {s.transfer_lr:g}, batch "
        f"{s.transfer_batch}, crop scale ({s.transfer_crop:g}, 1), {'flips' if s.transfer_flip else 'no flips'}, no "
        "mixup or RandAugment; "
        + ", ".join(f"{c['epochs']} epochs at {c['subset'] or 'all'}" for c in transfer) + " images), the head "
        "re-initialised. The floors: a logistic regression and a k-NN (k 20, T 0.07) on the raw pixels of the same "
        f"images (`python pixels.py --img_size={floor_side}`, {floor_side}-px eval views; a pre-trained model below "
        "them learned nothing the pixels do not give). A verdict `A > B` needs the mean difference to exceed twice its "
        "standard error.\n",
    ] + (["**--quick: micro sizes, one seed, one epoch. These numbers only show that every step runs.**\n"]
         if s.quick else [])


def claim1(s, results, figs):
    get = lambda **t: select(results, **t)
    out = ["## Claim 1: MAE pre-training beats training from scratch and MoCo-v3 after fine-tuning\n"]
    out += table(["pre-training", "fine-tune top-1", "linear probe top-1", "k-NN top-1 (k 20, T 0.07)"],
                 [["none: raw pixels (logistic regression; k-NN), the floor", floor(results, eval="floor"),
                   floor(results, eval="floor"), floor(results, "knn_top1", eval="floor")],
                  ["none: supervised from scratch", fmt(get(method="scratch", eval="ft")), "-", "-"],
                  ["none: random-initialised backbone", "-", "-", fmt(get(method="random", eval="knn"))]]
                 + [[name] + [fmt(get(method=m, eval=e)) for e in ("ft", "lin", "knn")] for m, name in METHODS.items()])
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
        ax.plot(range(1, len(c) + 1), c, "k:", label=f"scratch x2 (seed {s.seed_list[0]})")
    pixels = select(results, method="pixels", eval="floor")
    if pixels:
        ax.axhline(pixels[0], color="k", ls="--", lw=1, label="raw pixels: logistic regression (the floor)")
    link = figs.save(fig, "curves.png", ax, "fine-tuning epoch", "test top-1 (%)", f"Fine-tuning on "
                     f"{PRETTY.get(s.data, s.data)}: test top-1 per epoch (mean of {len(s.seed_list)} seeds)")
    out.append(f"Is the baseline converged? From scratch, mean top-1 of the last five epochs: "
               f"{', '.join(f'{v:.1f}' for v in curve[-5:])}. "
               + (f"The same recipe for twice the epochs (seed {s.seed_list[0]}): {long[0][-1]:.1f} (vs {scr[0]:.1f} "
                  f"at {s.scratch_epochs or s.finetune_epochs} epochs). " if long else
                  "(No run at twice the epochs: --long_baseline=false.) ") + f"![top-1 per epoch]({link})\n")
    return out + dino(s, results, figs), signs


def dino(s, results, figs):
    """DINO vs the random floor, the sweep that found its settings, and its loss and teacher entropy vs collapse
    (ln K: uniform; 0: one-hot)."""
    get = lambda **t: select(results, **t)
    s0, floor, knn_ = s.seed_list[0], get(method="random", eval="knn"), get(method="dino", eval="knn")
    fig, ax = figs.new(6, 3.5)
    vals = [stats(get(method=m, eval="knn")) for m in METHODS]
    ax.bar(range(len(vals)), [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3, color="C0")
    ax.axhline(stats(floor)[0], color="k", ls="--", label="random-initialised backbone")
    pixels = select(results, "knn_top1", method="pixels", eval="floor")
    if pixels:
        ax.axhline(pixels[0], color="k", ls=":", label="raw pixels: k-NN")
    ax.set_xticks(range(len(vals)), list(METHODS.values()), fontsize=8, rotation=15)
    link = figs.save(fig, "knn.png", ax, "", "k-NN test top-1 (%)",
                     f"k-NN on frozen features after pre-training ({PRETTY.get(s.data, s.data)})")
    out = [f"DINO's k-NN against the random-initialised floor: {fmt(knn_)} vs {fmt(floor)} ({compare(knn_, floor)}, "
           f"{stats(knn_)[0] - stats(floor)[0]:+.1f} points).", f"![k-NN]({link})\n"]
    pre = [r for r in results if r["stage"] == "pretrain_contrastive" and r["tags"]["method"].startswith("dino")]
    study_dino = [r for r in pre if r["tags"]["method"] == "dino"]  # pre also holds the sweep's (dino_b256, ...)
    moco = [r for r in results if r["stage"] == "pretrain_contrastive" and r["tags"]["method"] == "mocov3"]
    if study_dino and moco:  # equal epochs, but a smaller batch is more steps
        c = {r["tags"]["method"]: r["config"] for r in (study_dino[0], moco[0])}
        steps = {m: s.train_images // (c[m]["batch_size_per_gpu"] * c[m]["accum_steps"]) * c[m]["epochs"] for m in c}
        out.append(f"DINO trains the same {c['dino']['epochs']} epochs as "
                   f"{'MoCo-v3' if s.contrastive_epochs else 'every method'}, at batch "
                   f"{c['dino']['batch_size_per_gpu'] * c['dino']['accum_steps']} with {c['dino']['head_out_dim']} "
                   f"prototypes: {steps['dino']} optimizer steps against MoCo-v3's {steps['mocov3']} ("
                   + ("the sweep below shows what fewer steps give)." if any(r["tags"].get("sweep") for r in results)
                      else "`--dino_sweep` adds runs at other settings that show what fewer steps give)."))
    sweep = [r for r in results if r["tags"].get("sweep")]
    if sweep and study_dino:  # what DINO needs to learn at this scale
        out.append(f"\nDINO's sweep (seed {s0}; every other setting as the study's DINO, the same {s.pretrain_epochs} "
                   f"epochs). The random floor of seed {s0}: {fmt(get(method='random', eval='knn', seed=s0))}.\n")
        out += table(["setting", "batch", "prototypes K", "teacher momentum", "teacher temp.", "base lr", "k-NN top-1",
                      "loss vs ln K", "teacher entropy (end)"],
                     [["**the study's DINO**" if r["tags"]["method"] == "dino" else r["tags"]["method"][5:],
                       str(c["batch_size_per_gpu"]), str(c["head_out_dim"]), str(c["ema_momentum"]),
                       f"{c['warmup_teacher_temp']} -> {c['teacher_temp']}", f"{c['base_lr']:g}",
                       fmt(get(method=r["tags"]["method"], eval="knn", seed=s0)),
                       f"{r['loss']:.2f} vs {math.log(c['head_out_dim']):.2f}",
                       f"{r.get('teacher_entropy', [math.nan])[-1]:.2f}"]
                      for r, c in ((r, r["config"]) for r in study_dino[:1] + sweep)])
    out.append("\nDINO's loss against ln(prototypes), the loss of a collapsed (uniform) output: "
               + ", ".join(f"{r['name']} {r['loss']:.2f} vs {math.log(r['config']['head_out_dim']):.2f}" for r in pre)
               + ".")
    fig, axes = figs.plt.subplots(1, 2, figsize=(11, 3.5))
    methods, labelled = list(dict.fromkeys(r["tags"]["method"] for r in pre)), set()
    seeds = collections.Counter(r["tags"]["method"] for r in pre)  # runs of each setting, one per seed
    for r in pre:  # legend: the setting, not its name
        m, c = r["tags"]["method"], r["config"]
        label = None if m in labelled else ("the study's: " if m == "dino" else "") + \
            f"batch {c['batch_size_per_gpu']}, K {c['head_out_dim']}, m {c['ema_momentum']}" + \
            (f", T {c['teacher_temp']}, lr {c['base_lr']:g}" if c['teacher_temp'] == c['warmup_teacher_temp'] else "") \
            + (f" ({seeds[m]} seeds)" if seeds[m] > 1 else "")
        labelled.add(m)
        for ax, key in zip(axes, ("losses", "teacher_entropy")):
            if key in r:
                ax.plot(range(1, len(r[key]) + 1), r[key], color=f"C{methods.index(m)}",
                        marker="o" if len(r[key]) < 5 else None, label=label)
            ax.axhline(math.log(c["head_out_dim"]), color=f"C{methods.index(m)}", ls=":", lw=1)
    axes[1].axhline(0, color="k", ls=":", lw=1)
    for ax, ylabel in zip(axes, ("DINO loss (nats)", "teacher output entropy (nats)")):
        ax.set(xlabel="pre-training epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle("DINO pre-training (K prototypes, m teacher momentum, T teacher temperature); dotted: ln K, a "
                 "uniform (collapsed) output, and 0, a one-hot collapse", fontsize=10)
    return out + [f"![DINO loss]({figs.save(fig, 'dino_loss.png')})\n"]


def claim2(s, results, figs):
    depth, ks = VIT_SIZES[s.model]["depth"], s.keep_list  # every K 0..depth, or --layer_keep's (0, half, depth)
    layer = {m: {k: select(results, method=m, eval="keep", keep=k) for k in ks} for m in ("mae", "mocov3")}
    out = ["## Claim 2: the lower layers matter more\n",
           f"Fine-tuning for {s.layer_epochs} epochs after keeping only the first K pre-trained blocks (the rest "
           f"re-initialised; K = {depth} keeps them all).\n"]
    out += table(["K"] + [METHODS[m] for m in layer], [[str(k)] + [fmt(layer[m][k]) for m in layer] for k in ks])
    out.append(f"\nThe floor: a logistic regression on the same images' raw pixels, {floor(results, eval='floor')}.")
    half, found, signs = depth // 2, [], []
    for m in layer:  # a gain from pre-training, mostly from the lower half
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
    ax.set_xticks(ks)
    link = figs.save(fig, "layers.png", ax, "pre-trained blocks kept (K), the rest re-initialised",
                     "fine-tuned test top-1 (%)", f"Which pre-trained layers matter ({PRETTY.get(s.data, s.data)}, "
                     f"{s.layer_epochs} epochs, mean ± std)")
    out.append("\n" + "; ".join(found) + ". Verdict (K = depth above K = 0, and the lower half giving more than "
               f"half of that gain, for both): {verdict(signs, '>' * len(signs))}. ![layers]({link})\n")
    return out, signs


def claim3(s, results, figs):
    td, shots = s.transfer_data, s.shot_list or [0]
    v = {(src, n): select(results, method=src, eval="transfer", shots=n) for src in SOURCES for n in shots}
    signs = [compare(v["mae", n], v[other, n]) for n in shots for other in ("supervised", "mocov3")]
    out = ["## Claim 3: on a data-poor task of another domain, MAE is worse than supervised and contrastive "
           "pre-training\n",
           f"Transfer to `{td}` (pre-trained on `{s.data}`), test top-1 after fine-tuning on the labelled images.\n"]
    out += table(["labels per class", "raw pixels: logistic regression", "raw pixels: k-NN"]
                 + [NAMES[src] for src in SOURCES] + ["MAE vs supervised", "MAE vs MoCo-v3"],
                 [[str(n or "all"), floor(results, eval="transfer_floor", shots=n),
                   floor(results, "knn_top1", eval="transfer_floor", shots=n)]
                  + [fmt(v[src, n]) for src in SOURCES] + signs[2 * i:2 * i + 2] for i, n in enumerate(shots)])
    fig, ax = figs.new()
    for src in SOURCES:
        mean_std_line(ax, shots, [v[src, n] for n in shots], NAMES[src])
    knn_floor = [select(results, "knn_top1", method="pixels", eval="transfer_floor", shots=n) for n in shots]
    if all(knn_floor):
        ax.plot(shots, [f[0] for f in knn_floor], "k--", label="raw pixels: k-NN (the floor)")
    logistic = [select(results, method="pixels", eval="transfer_floor", shots=n) for n in shots]
    if all(logistic):
        ax.plot(shots, [f[0] for f in logistic], "k:", label="raw pixels: logistic regression")
    if len(shots) > 1:
        ax.set_xscale("log")
    ax.set_xticks(shots, [str(x) for x in shots])
    link = figs.save(fig, "transfer.png", ax, "labelled images per class (log scale)", "test top-1 (%)",
                     f"Transfer {PRETTY.get(s.data, s.data)} -> {PRETTY.get(td, td)} with few labels (mean ± std)")
    out.append(f"\nVerdict (MAE below both, at every size): {verdict(signs, '<' * len(signs))}. "
               f"![transfer]({link})\n")
    return out, signs


def claim4(s, results):
    td, shots = s.transfer_data, s.shot_list or [0]
    rows = [("fine-tune", dict(eval="ft")), ("linear probe", dict(eval="lin")), ("k-NN", dict(eval="knn"))] + \
        [(f"{td}, {n or 'all'} labels/class", dict(eval="transfer", shots=n)) for n in shots]
    floors = [floor(results, eval="floor"), floor(results, eval="floor"), floor(results, "knn_top1", eval="floor")] + \
        [floor(results, "knn_top1", eval="transfer_floor", shots=n) for n in shots]  # transfer: the k-NN, as claim 3
    cells, signs, gains = [], [], []
    for (label, tags), bottom in zip(rows, floors):
        a, b = select(results, method="mae", **tags), select(results, method="dmae", **tags)
        signs.append(compare(b, a))
        gains.append(stats(b)[0] - stats(a)[0])
        cells.append([label, bottom, fmt(a), fmt(b), f"{signs[-1]} ({gains[-1]:+.1f})"])
    out = ["## Claim 4: distilling a larger MAE's attention (D-MAE) helps, most on data-poor tasks\n"]
    out += table(["evaluation", "raw-pixel floor", "MAE", "D-MAE", "D-MAE vs MAE"], cells)
    poor = gains[3:]
    out.append(f"\nVerdict (D-MAE above MAE everywhere): {verdict(signs, '>' * len(signs))}; the gain on the "
               f"data-poor task ({', '.join(f'{g:+.1f}' for g in poor)}) is "
               f"{'larger' if min(poor) > gains[0] else 'not larger'} than on fine-tuning ({gains[0]:+.1f}).\n")
    return out, signs


def inside(s, results, figs):
    """The analysis runs' attention distances and figures."""
    folder = {r["tags"]["method"]: r["config"]["out_dir"] for r in results if r["tags"].get("eval") == "analysis"}
    attn = {}
    for m, labels in (("mae", ("MAE", "supervised")), ("mocov3", ("MoCo-v3",)), ("dmae", ("D-MAE",))):
        with open(os.path.join(folder[m], "analysis.json")) as f:
            analysis = json.load(f)
        attn.update(zip(labels, analysis["attn_distance"]))
        uniform = analysis["uniform"]["attn_distance"]
    fig, axes = figs.plt.subplots(1, len(attn), figsize=(3 * len(attn), 3), sharey=True, squeeze=False)
    for ax, (label, d) in zip(axes[0], attn.items()):
        for li, heads in enumerate(d):
            ax.scatter([li + 1] * len(heads), heads, s=10, color="C0", alpha=0.6)
        ax.plot(range(1, len(d) + 1), [sum(h) / len(h) for h in d], color="C1", label="mean over heads")
        ax.axhline(uniform, color="k", ls="--", lw=1, label=f"uniform ({uniform:.1f} px)")
        ax.set(title=label, xlabel="block", xticks=range(1, len(d) + 1), ylim=(0, max(ax.get_ylim()[1], uniform * 1.1)))
    axes[0, 0].set_ylabel("attention distance (pixels)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Mean attention distance per head and block ({PRETTY.get(s.data, s.data)} test images, "
                 f"{s.img_size} px, {s.patch_size}-px patches; seed {s.seed_list[0]})", fontsize=10, y=1.04)
    out = [f"## What the models look like inside (seed {s.seed_list[0]})\n"]
    out += table(["model", f"mean attention distance per block (pixels, mean over heads; uniform attention: "
                           f"{uniform:.1f})"], [[label, ", ".join(f"{sum(h) / len(h):.1f}" for h in d)]
                                                for label, d in attn.items()])
    out.append(f"\n![attention distance]({figs.save(fig, 'attn_distance.png')})\n")
    for m, src, dst, caption in [("mae", "cka.png", "cka_mae_vs_supervised.png", "Linear CKA between the layers of "
                                  "MAE and the supervised model"),
                                 ("mae", "recon.png", "recon_mae.png", "MAE reconstructions"),
                                 ("dmae", "recon.png", "recon_dmae.png", "D-MAE reconstructions")] + \
            [(m, "attn_maps.png", f"attn_maps_{m}.png", f"{METHODS[m]}: last-layer attention per head")
             for m in ("mae", "mocov3", "dmae")] + \
            [("mae", "attn_maps2.png", "attn_maps_supervised.png", "supervised: last-layer attention per head")]:
        if os.path.exists(os.path.join(folder[m], src)):
            shutil.copyfile(os.path.join(folder[m], src), os.path.join(figs.dir, dst))
            out.append(f"{caption}:\n\n![{caption}](figures/{dst})\n")
    return out


def departures(s):
    """Each setting of this study that departs from the paper's recipe, with the measurement that chose it."""
    why = [
        (s.finetune_mixup == 0 and s.finetune_randaug == 0, "Fine-tuning without mixup and RandAugment, at a higher "
         "lr: with the paper's mixup 0.2 + RandAugment m10 at lr 1e-3 the from-scratch model was still rising after 60 "
         "epochs at this size."),
        (s.finetune_crop > 0.08, f"Fine-tuning crops of {s.finetune_crop:g}-1 of the area (the paper: 0.08-1): an 8% "
         f"crop of a {s.img_size}-px item is a few pixels of it."),
        (s.finetune_epochs >= 80 and s.finetune_lr >= 8e-3, f"{s.finetune_epochs} fine-tuning epochs at base lr "
         f"{s.finetune_lr:g}: after 40 epochs at 4e-3, or 80 at 4e-3, MAE's fine-tune ended below the pixels' "
         "logistic regression ([docs/STUDY.md](../docs/STUDY.md#the-fine-tuning-recipe-at-this-size) gives the runs "
         "and their commands)."),
        (s.moco_layer_decay != 0.75, f"MoCo-v3's fine-tuning at layer decay {s.moco_layer_decay:g} (the paper: "
         "0.75): at 0.75 both seeds' fine-tunes ended at 83.1, below the pixels' logistic regression (83.3); at "
         "0.85, MAE's, they ended at 84.0 and 84.6."),
        (not s.transfer_flip, "Transfer without horizontal flips: a mirrored digit is another digit (or none)."),
        (s.transfer_crop > 0.08, f"Transfer crops of {s.transfer_crop:g}-1 of the area: a digit needs most of its "
         "strokes."),
        (s.transfer_steps >= 2000 and not s.transfer_epochs, f"{s.transfer_steps} transfer steps whatever the "
         "labelled set's size: after 300 the training losses were still 1.0-1.3, and after 1000 MAE's and MoCo-v3's "
         "transfer with 50 and 100 labels a class sat below the pixels' k-NN (means over two seeds, MAE and MoCo-v3: "
         "80.3 and 81.0 against 81.2 with 50 labels; 82.5 and 82.2 against 83.0 with 100)."),
    ]
    lines = [f"- {text}" for cond, text in why if cond]
    return (["## Departures from the paper's recipe, and why\n", "\n".join(lines) + "\n"]
            if lines and not s.preset else [])


def write_report(s, results, wall):
    """s: the study's settings; results: its finished runs' result.json, in its order."""
    figs = Figures(s.out_dir)
    out = header(s, results, wall) + departures(s)
    for part in (claim1(s, results, figs), claim2(s, results, figs), claim3(s, results, figs), claim4(s, results)):
        out += part[0]
    with open(os.path.join(s.out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(out + inside(s, results, figs)) + "\n")
    print(f"wrote {s.out_dir}/REPORT.md and {figs.dir}/", flush=True)
