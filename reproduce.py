r"""The reproduction study in one command: every run of the paper's four claims at CPU scale, several seeds, then
results/REPORT.md with mean ± std tables, verdicts and figures.

The study is a list of runs (built by `study()`, read it top to bottom); each run calls one stage's main(Config(...))
in its own folder under results/runs/. A run that finished left a result.json there and is skipped, so a killed study
resumes where it stopped (a half-done run continues from its own checkpoint). Runs go to `--jobs` worker processes,
one thread each: on 2 cores two single-threaded runs do 1.2 to 1.8 times the work of one two-threaded run for models
this small (a second thread speeds one step up only 1.1 to 1.7 times).
A fixed thread count also keeps every run deterministic: the same seeds give the same report on the same machine
(another CPU's instruction set can change the last bits of its kernels).

    python reproduce.py                        # the default study: 3 seeds on the embedded Fashion-MNIST (~85 min, 2 cores)
    python reproduce.py --quick                # every step on micro sizes, under a minute (the tests run it)
    python reproduce.py --seeds=0,1,2,3,4 --jobs=16 --data=fashion-mnist      # 70k images (Debian's package), 16 cores
    python reproduce.py --model=tiny --teacher_model=base --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --transfer_data=flowers102 --transfer_root=/flowers ...   # the paper's scale (GPU)

Claims (PAPER §3-§5): (1) MAE pre-training beats scratch and MoCo-v3 after fine-tuning; (2) lower layers matter more;
(3) MAE is worse than supervised / contrastive pre-training on data-poor tasks of another domain; (4) D-MAE helps,
most on those. Every claim row uses all seeds; the report states the rule behind each verdict.
"""
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import distill
import finetune
import knn
import pretrain_contrastive
import pretrain_mae
import analyze
from checkpoint import read_log
from common import BadValue, RunError, check, check_ranges, cli
from data import build_dataset
from model import VIT_SIZES

METHODS = {"mae": "MAE", "mocov3": "MoCo-v3", "dino": "DINO", "dmae": "D-MAE"}
# rough images per second of one core for each kind of run with the `mini` model: only for the first ETA
SPEED = {"pretrain_mae": 3000, "distill": 1500, "mocov3": 450, "dino": 350, "finetune": 1100, "linear": 2500,
         "knn": 5000, "analyze": 500}


@dataclass
class Config:
    seeds: str = "0,1,2"  # comma-separated; every number in the claims' tables is a mean over these
    # data
    data: str = "embedded"  # pre-training and fine-tuning data (claims 1, 2): embedded | fashion-mnist | imagefolder | ...
    data_root: str = ""  # folder of the data; unused for the embedded slices
    subset: int = 0  # class-balanced training images (0 = all)
    transfer_data: str = "mnist"  # another domain, few labels (claim 3): mnist (committed slice) | cifar10 | ...
    transfer_root: str = ""  # folder of the transfer data
    transfer_shots: str = "10,50,100"  # labelled images per class
    transfer_steps: int = 300  # optimizer steps per transfer run, whatever the labelled set's size
    transfer_batch: int = 32  # transfer batch (at most the labelled set's size)
    transfer_lr: float = 0.1  # SGD lr itself, not scaled by the batch (the paper's transfer.sh: 0.1)
    transfer_crop: float = 0.5  # RandomResizedCrop's lower area bound (the paper: 0.08 at 224 px; on 28-px digits
                                # an 8% crop is an 8-px fragment: 0.08 gave 33% on 50 labels/class, 0.5 gave 55%)
    # model
    model: str = "mini"  # student ViT size (mini: width 64, depth 4, 4 heads, 0.2M parameters)
    teacher_model: str = "cpu"  # D-MAE's larger MAE teacher (cpu: width 96, depth 6)
    img_size: int = 28  # input side (Fashion-MNIST's own 28 px)
    patch_size: int = 7  # patch side: a 4 x 4 grid
    # schedules (equal for every method: no row wins by having more epochs)
    pretrain_epochs: int = 20  # MAE, D-MAE, MoCo-v3, DINO and the teacher
    finetune_epochs: int = 40  # claim 1's fine-tuning and the from-scratch baseline (a run of twice this checks convergence)
    linear_epochs: int = 20  # linear probes
    layer_epochs: int = 10  # claim 2's fine-tuning runs, every K alike (shorter: 10 runs per seed)
    # the fine-tuning recipe (claims 1, 2 and the baseline). The paper's mixup 0.2 + RandAugment m10 at lr 1e-3 keep the
    # from-scratch model rising for 60+ epochs at this scale, so the study turns them off and raises the lr (README)
    finetune_lr: float = 4e-3  # base lr (x batch / 256); the paper: 1e-3
    finetune_mixup: float = 0.0  # the paper: 0.2
    finetune_randaug: int = 0  # RandAugment magnitude; the paper: 10
    # run
    jobs: int = 2  # runs at a time, one process each
    threads: int = 1  # torch threads per run (fixed, so results do not depend on the machine)
    out_dir: str = "results"  # REPORT.md, figures/, runs/<run>/
    quick: bool = False  # micro sizes, 1 seed, 1 epoch: every step in under a minute (a smoke test, not results)

    def __post_init__(self):
        if self.quick:  # overrides the sizes, keeps the flags that say where and how
            self.seeds, self.subset, self.model, self.teacher_model = "0", 200, "micro", "micro"
            self.pretrain_epochs = self.finetune_epochs = self.linear_epochs = self.layer_epochs = 1
            self.transfer_shots, self.transfer_steps, self.transfer_batch = "2,4", 2, 8
        try:
            self.seed_list = [int(s) for s in self.seeds.split(",")]
            self.shot_list = [int(s) for s in self.transfer_shots.split(",")]
        except ValueError:
            raise BadValue(f"--seeds and --transfer_shots must be comma-separated integers, got {self.seeds!r} / "
                           f"{self.transfer_shots!r}") from None
        check(self.seed_list and min(self.seed_list) >= 0, f"--seeds must be non-negative, got {self.seeds!r}")
        check(self.shot_list and min(self.shot_list) > 0, f"--transfer_shots must be positive, got {self.transfer_shots!r}")
        check_ranges(self, subset=">=0", transfer_steps=">0", transfer_lr=">0", transfer_crop="(0,1]", finetune_lr=">0", finetune_mixup=">=0",
                     finetune_randaug="[0,10]", transfer_batch=">0", img_size=">0", patch_size=">0",
                     pretrain_epochs=">0", finetune_epochs=">0", linear_epochs=">0",
                     layer_epochs=">0", jobs=">0", threads=">0")
        for name in ("model", "teacher_model"):
            check(getattr(self, name) in VIT_SIZES, f"{name} must be one of {sorted(VIT_SIZES)}, got {getattr(self, name)!r}")
        check(self.img_size % self.patch_size == 0, f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")


@dataclass
class Run:
    name: str  # its folder under runs/
    stage: str  # the module whose main() it calls
    cfg: object  # that stage's Config
    deps: tuple = ()  # runs that must finish first (their checkpoints are read)
    cost: float = 1.0  # estimated seconds on one core, for the ETA
    kind: str = ""  # what the report reads from it


# --- the study ---
def study(cfg):
    """Every run, in dependency order."""
    runs = []
    folder = lambda name: os.path.join(cfg.out_dir, "runs", name)  # noqa: E731
    ckpt = lambda name: os.path.join(folder(name), "ckpt.pt")  # noqa: E731
    train_images = len(build_dataset(cfg.data, cfg.data_root, True, cfg.subset)[0])
    transfer_classes = build_dataset(cfg.transfer_data, cfg.transfer_root, False)[1]
    size = lambda m: VIT_SIZES[m]["embed_dim"] ** 2 * VIT_SIZES[m]["depth"] / (64 ** 2 * 4)  # noqa: E731 cost vs mini
    shape = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, num_workers=0)  # in-memory data: the loader hands out indices
    data = dict(data=cfg.data, data_root=cfg.data_root, subset=cfg.subset)
    pe, fe = cfg.pretrain_epochs, cfg.finetune_epochs
    pre = dict(epochs=pe, warmup_epochs=max(1, pe // 10), batch_size_per_gpu=min(256, train_images), **shape, **data)
    ft = dict(model=cfg.model, epochs=fe, warmup_epochs=max(1, fe // 10), batch_size_per_gpu=min(128, train_images),
              base_lr=cfg.finetune_lr, mixup=cfg.finetune_mixup, randaug_magnitude=cfg.finetune_randaug, **shape, **data)

    def add(name, stage, c, deps=(), speed=None, images=train_images, epochs=1, model=cfg.model, kind=""):
        runs.append(Run(name, stage, c, tuple(deps), images * epochs / SPEED[speed or stage] * size(model), kind))

    # D-MAE's teacher: one larger MAE (first seed), shared by every D-MAE seed
    add("teacher", "pretrain_mae", pretrain_mae.Config(model=cfg.teacher_model, seed=cfg.seed_list[0],
                                                       out_dir=folder("teacher"), **pre), epochs=pe, model=cfg.teacher_model)
    local = max(cfg.patch_size, cfg.img_size // 2 // cfg.patch_size * cfg.patch_size)  # DINO's local crops: half the side
    for s in cfg.seed_list:
        # pre-training, the same epochs for every method
        add(f"mae_s{s}", "pretrain_mae", pretrain_mae.Config(model=cfg.model, seed=s, out_dir=folder(f"mae_s{s}"), **pre),
            epochs=pe)
        add(f"dmae_s{s}", "distill", distill.Config(model=cfg.model, teacher_ckpt=ckpt("teacher"), seed=s,
                                                    out_dir=folder(f"dmae_s{s}"), **pre), ["teacher"], epochs=pe)
        add(f"mocov3_s{s}", "pretrain_contrastive", pretrain_contrastive.Config(
            method="mocov3", model=cfg.model, local_crop_size=local, seed=s, out_dir=folder(f"mocov3_s{s}"), **pre), speed="mocov3", epochs=pe)
        add(f"dino_s{s}", "pretrain_contrastive", pretrain_contrastive.Config(
            method="dino", model=cfg.model, local_crop_size=local, seed=s, out_dir=folder(f"dino_s{s}"), **pre),
            speed="dino", epochs=pe)
        # claim 1: fine-tune, linear probe, k-NN of each; the supervised baseline on the same schedule
        add(f"scratch_s{s}", "finetune", finetune.Config(mode="scratch", seed=s, out_dir=folder(f"scratch_s{s}"), **ft),
            epochs=fe, kind="ft")
        add(f"random_knn_s{s}", "knn", knn.Config(ckpt="random", model=cfg.model, seed=s,
                                                  out=os.path.join(folder(f"random_knn_s{s}"), "knn.json"),
                                                  data=cfg.data, data_root=cfg.data_root, subset=cfg.subset,
                                                  img_size=cfg.img_size, patch_size=cfg.patch_size, num_workers=0),
            images=train_images + 1000, kind="knn")
        for m in METHODS:
            src, key = f"{m}_s{s}", "teacher" if m == "dino" else "model"  # DINO's EMA teacher is its model
            decay = 0.75 if m in ("mocov3", "dino") else 0.85  # the paper's layer decay per pre-training
            add(f"{m}_ft_s{s}", "finetune", finetune.Config(init_ckpt=ckpt(src), init_key=key, layer_decay=decay, seed=s,
                                                            out_dir=folder(f"{m}_ft_s{s}"), **ft), [src], epochs=fe, kind="ft")
            le = cfg.linear_epochs
            add(f"{m}_lin_s{s}", "finetune", finetune.Config(**dict(ft, mode="linear", init_ckpt=ckpt(src), init_key=key,
                                                                    base_lr=0.1, mixup=0, randaug_magnitude=0, seed=s,
                                                                    epochs=le, warmup_epochs=max(1, le // 10),
                                                                    out_dir=folder(f"{m}_lin_s{s}"))),
                [src], speed="linear", epochs=le, kind="ft")
            add(f"{m}_knn_s{s}", "knn", knn.Config(ckpt=ckpt(src), key=key, out=os.path.join(folder(f"{m}_knn_s{s}"), "knn.json"),
                                                   data=cfg.data, data_root=cfg.data_root, subset=cfg.subset, num_workers=0),
                [src], images=train_images + 1000, kind="knn")
        # claim 2: keep only the first K pre-trained blocks, re-initialise the rest (K = depth: keep them all)
        depth, ye = VIT_SIZES[cfg.model]["depth"], cfg.layer_epochs
        for m in ("mae", "mocov3"):
            for k in range(depth + 1):
                add(f"{m}_keep{k}_s{s}", "finetune", finetune.Config(**dict(
                    ft, init_ckpt=ckpt(f"{m}_s{s}"), reinit_from_block=k if k < depth else -1, epochs=ye,
                    warmup_epochs=max(1, ye // 10), layer_decay=0.75 if m == "mocov3" else 0.85, seed=s,
                    out_dir=folder(f"{m}_keep{k}_s{s}"))), [f"{m}_s{s}"], epochs=ye, kind="ft")
        # claim 3: another domain with few labels, the transfer recipe (PAPER §3.3), a fixed number of steps
        for src, src_ckpt in (("mae", f"mae_s{s}"), ("mocov3", f"mocov3_s{s}"), ("dmae", f"dmae_s{s}"),
                              ("supervised", f"scratch_s{s}")):
            for shots in cfg.shot_list:
                n = shots * transfer_classes
                batch = min(cfg.transfer_batch, n)
                epochs = math.ceil(cfg.transfer_steps / (n // batch))
                add(f"{src}_{cfg.transfer_data}{shots}_s{s}", "finetune", finetune.Config(
                    init_ckpt=ckpt(src_ckpt), data=cfg.transfer_data, data_root=cfg.transfer_root, subset=n,
                    model=cfg.model, epochs=epochs, warmup_epochs=epochs // 5, batch_size_per_gpu=batch,
                    optimizer="sgd", base_lr=cfg.transfer_lr * 256 / batch, crop_min_scale=cfg.transfer_crop,
                    weight_decay=0, clip_grad=1.0, layer_decay=0.75, mixup=0,
                    randaug_magnitude=0, seed=s, out_dir=folder(f"{src}_{cfg.transfer_data}{shots}_s{s}"), **shape),
                    [src_ckpt], images=n + 250, epochs=epochs, kind="ft")
    s = cfg.seed_list[0]
    # is the baseline converged? the same recipe for twice the epochs
    add(f"scratch_long_s{s}", "finetune", finetune.Config(
        mode="scratch", seed=s, out_dir=folder(f"scratch_long_s{s}"), **dict(ft, epochs=2 * fe, warmup_epochs=max(1, fe // 5))),
        epochs=2 * fe, kind="ft")
    # DINO at other settings: a faster teacher (momentum 0.99), a sharper constant teacher temperature, fewer
    # prototypes and a higher lr
    add(f"dino_b_s{s}", "pretrain_contrastive", pretrain_contrastive.Config(
        method="dino", model=cfg.model, local_crop_size=local, ema_momentum=0.99, warmup_teacher_temp=0.04,
        teacher_temp=0.04, head_out_dim=1024, base_lr=1e-3, seed=s, out_dir=folder(f"dino_b_s{s}"), **pre),
        speed="dino", epochs=pe)
    add(f"dino_b_knn_s{s}", "knn", knn.Config(ckpt=ckpt(f"dino_b_s{s}"), key="teacher",
                                              out=os.path.join(folder(f"dino_b_knn_s{s}"), "knn.json"), data=cfg.data,
                                              data_root=cfg.data_root, subset=cfg.subset, num_workers=0),
        [f"dino_b_s{s}"], images=train_images + 1000, kind="knn")
    # the analysis figures (first seed): CKA MAE vs supervised, attention of each model, reconstructions
    n_img, batch = (32, 16) if cfg.quick else (512, 128)
    for name, a, b in (("analysis_mae", f"mae_s{s}", f"scratch_s{s}"), ("analysis_mocov3", f"mocov3_s{s}", ""),
                       ("analysis_dmae", f"dmae_s{s}", "")):
        add(name, "analyze", analyze.Config(ckpt=ckpt(a), ckpt2=ckpt(b) if b else "", data=cfg.data,
                                            data_root=cfg.data_root, num_images=n_img, batch_size=batch,
                                            out_dir=folder(name)), [a] + ([b] if b else []), images=2 * n_img)
    return runs


# --- running ---
@contextlib.contextmanager
def output_to(path):
    """Send this process's stdout/stderr (the stage's progress bars too) into a file."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def settings(run):
    return json.loads(json.dumps(asdict(run.cfg), default=str))


def execute(run, threads):
    """In a worker: run the stage, then write result.json (atomically: its presence means done)."""
    import torch
    torch.set_num_threads(threads)
    folder = run_folder(run)
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    with output_to(os.path.join(folder, "output.log")):
        returned = importlib.import_module(run.stage).main(run.cfg)
    result = dict(name=run.name, stage=run.stage, seconds=time.time() - start, threads=threads, config=settings(run))
    if run.kind == "knn":
        result.update(top1=returned["top1"], top5=returned["top5"])
    elif run.stage != "analyze":
        rows = read_log(folder, 10 ** 9)
        if run.kind == "ft":
            result.update(top1=rows[-1]["top1"], best_top1=max(r["top1"] for r in rows), curve=[r["top1"] for r in rows])
        else:
            result.update(loss=rows[-1]["loss"], losses=[r["loss"] for r in rows])
    tmp = os.path.join(folder, f"result.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(folder, "result.json"))
    return result


def run_folder(run):
    return os.path.dirname(run.cfg.out) if run.stage == "knn" else run.cfg.out_dir  # knn.py writes a file, not a folder


def result_path(run):
    return os.path.join(run_folder(run), "result.json")


def finished(run):
    """The run's result, if it finished with these settings; a different run in its folder is refused."""
    if not os.path.exists(result_path(run)):
        return None
    with open(result_path(run)) as f:
        result = json.load(f)
    old, new = result["config"], settings(run)
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    check(not changed, f"{run_folder(run)} holds a run with other settings ({', '.join(changed)}); "
                       f"use another --out_dir, or delete that folder to redo it")
    return result


def run_all(runs, cfg):
    """Run what has not finished, `jobs` at a time, dependencies first; print progress and an ETA."""
    results = {r.name: res for r in runs if (res := finished(r)) is not None}
    todo = [r for r in runs if r.name not in results]
    print(f"{len(runs)} runs, {len(results)} already finished, {len(todo)} to go, {cfg.jobs} at a time "
          f"(outputs: {cfg.out_dir}/runs/<run>/output.log)", flush=True)
    start, spent, estimated = time.time(), 0.0, 0.0  # seconds and estimated cost of the runs finished here
    with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
        going = {}
        while todo or going:
            ready = sorted((r for r in todo if all(d in results for d in r.deps)), key=lambda r: -r.cost)
            for r in ready[:cfg.jobs - len(going)]:
                todo.remove(r)
                going[pool.submit(execute, r, cfg.threads)] = r
                print(f"  start {r.name}", flush=True)
            done, _ = wait(going, return_when=FIRST_COMPLETED)
            for fut in done:
                r = going.pop(fut)
                try:
                    results[r.name] = fut.result()
                except Exception as e:
                    for f in going:
                        f.cancel()
                    raise RunError(f"run {r.name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                                   f"(its output: {run_folder(r)}/output.log); run reproduce.py "
                                   f"again to resume") from e
                spent, estimated = spent + results[r.name]["seconds"], estimated + r.cost
                left = sum(x.cost for x in todo + list(going.values()))
                eta = left * spent / estimated / cfg.jobs
                score = f" top-1 {results[r.name]['top1']:.1f}" if "top1" in results[r.name] else ""
                print(f"[{len(results)}/{len(runs)}] {r.name} done in {results[r.name]['seconds']:.0f} s{score} | "
                      f"{(time.time() - start) / 60:.1f} min so far, about {eta / 60:.0f} min left", flush=True)
    return results, time.time() - start


# --- the report ---
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


def write_report(cfg, runs, results, wall):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = os.path.join(cfg.out_dir, "figures")
    os.makedirs(figs, exist_ok=True)

    def save(fig, name):
        fig.savefig(os.path.join(figs, name), dpi=120, bbox_inches="tight")
        plt.close(fig)

    def mean_std_line(ax, xs, per_x, label):  # per_x: one list of seed values per x
        st = [stats(v) for v in per_x]
        ax.errorbar(xs, [m for m, _, _ in st], yerr=[sd for _, sd, _ in st], marker="o", capsize=3, label=label)
    seeds, depth = cfg.seed_list, VIT_SIZES[cfg.model]["depth"]
    get = lambda pattern, key="top1": [results[pattern.format(s=s)][key] for s in seeds  # noqa: E731
                                       if pattern.format(s=s) in results]
    names = dict(METHODS, scratch="supervised (scratch)", supervised="supervised (scratch)")
    runs_by = {r.name: r for r in runs}
    pretty = {"embedded": "Fashion-MNIST slice", "mnist": "MNIST slice"}
    dname, tname = pretty.get(cfg.data, cfg.data), pretty.get(cfg.transfer_data, cfg.transfer_data)
    out = []
    w = out.append
    core_s = sum(r["seconds"] for r in results.values())
    w("# Reproduction study at CPU scale\n")
    w(f"Regenerate: `python reproduce.py{' --quick' if cfg.quick else ''}`"
      f"{'' if cfg.quick else ' (the defaults)'}; it skips runs whose result.json exists, so delete `{cfg.out_dir}/` "
      f"to start over. Seeds {cfg.seeds}; every table cell is mean ± sample std over them (n = seeds). Hardware: "
      f"{os.cpu_count()} CPU cores ({platform.machine()}), {cfg.jobs} runs at a time, {cfg.threads} thread each; "
      f"{core_s / 60:.0f} run-minutes (the sum of every run's own time; {cfg.jobs} at a time take about 1/{cfg.jobs} of "
      f"that), {wall / 60:.0f} min wall-clock in the invocation that wrote this report (finished runs are read back).\n")
    tr = [r for r in runs if r.name.startswith(f"mae_{cfg.transfer_data}") and r.name.endswith(f"_s{seeds[0]}")]
    w(f"Setting: data `{cfg.data}` ({len(build_dataset(cfg.data, cfg.data_root, True, cfg.subset)[0])} training "
      f"images), ViT `{cfg.model}` {VIT_SIZES[cfg.model]} at {cfg.img_size} px with {cfg.patch_size}-px patches; "
      f"pre-training {cfg.pretrain_epochs} epochs for every method (D-MAE's teacher: one `{cfg.teacher_model}` MAE, "
      f"first seed, shared); fine-tuning and the from-scratch baseline {cfg.finetune_epochs} epochs, linear probes "
      f"{cfg.linear_epochs}, the layer study {cfg.layer_epochs}, all with the paper's fine-tuning recipe (AdamW, warm-up + cosine; MAE layer decay 0.85, "
      f"MoCo-v3/DINO 0.75, none from scratch) at base lr {cfg.finetune_lr:g}, mixup {cfg.finetune_mixup:g}, RandAugment "
      f"magnitude {cfg.finetune_randaug} (the paper: 1e-3, 0.2, 10; see README for why). Accuracy is the **last epoch's** top-1 on the test split (no choice by test accuracy). "
      f"Transfer: `{cfg.transfer_data}` with {cfg.transfer_shots} labels per class (the same class-balanced images "
      f"for every seed), {cfg.transfer_steps} SGD steps of the paper's transfer recipe (lr {cfg.transfer_lr:g}, batch "
      f"{cfg.transfer_batch}, crop scale ({cfg.transfer_crop:g}, 1), flips, no mixup or RandAugment; "
      f"{', '.join(f'{r.cfg.epochs} epochs at {r.cfg.subset}' for r in tr)} images), the head re-initialised. "
      f"A verdict `A > B` needs the mean difference to exceed twice its standard error.\n")
    if cfg.quick:
        w("**--quick: micro sizes, one seed, one epoch. These numbers only show that every step runs.**\n")

    # claim 1
    w("## Claim 1: MAE pre-training beats training from scratch and MoCo-v3 after fine-tuning\n")
    w("| pre-training | fine-tune top-1 | linear probe top-1 | k-NN top-1 (k 20, T 0.07) |")
    w("|---|---|---|---|")
    w(f"| none: supervised from scratch | {fmt(get('scratch_s{s}'))} | - | - |")
    w(f"| none: random-initialised backbone | - | - | {fmt(get('random_knn_s{s}'))} |")
    for m, label in METHODS.items():
        w(f"| {label} | {fmt(get(m + '_ft_s{s}'))} | {fmt(get(m + '_lin_s{s}'))} | {fmt(get(m + '_knn_s{s}'))} |")
    mae, scr, moco = get("mae_ft_s{s}"), get("scratch_s{s}"), get("mocov3_ft_s{s}")
    signs = [compare(mae, scr), compare(mae, moco)]
    w(f"\nMAE vs scratch: {signs[0]}; MAE vs MoCo-v3: {signs[1]} (fine-tuning). Verdict: {verdict(signs, '>>')}.\n")
    long_name = f"scratch_long_s{seeds[0]}"
    curve = stats_curve([results[f"scratch_s{s}"]["curve"] for s in seeds if f"scratch_s{s}" in results])
    tail = ", ".join(f"{v:.1f}" for v in curve[-5:])
    w(f"Is the baseline converged? From scratch, mean top-1 of the last five epochs: {tail}. The same recipe for "
      f"twice the epochs (seed {seeds[0]}): {results[long_name]['top1']:.1f} (vs {results[f'scratch_s{seeds[0]}']['top1']:.1f} "
      f"at {cfg.finetune_epochs} epochs). ![top-1 per epoch](figures/curves.png)\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in [("scratch", names["scratch"])] + [(m + "_ft", l) for m, l in METHODS.items()]:
        c = stats_curve([results[f"{key}_s{s}"]["curve"] for s in seeds if f"{key}_s{s}" in results])
        ax.plot(range(1, len(c) + 1), c, marker="." if len(c) < 5 else None, label=label)
    ax.plot(range(1, 2 * cfg.finetune_epochs + 1), results[long_name]["curve"], "k:", label=f"scratch x2 (seed {seeds[0]})")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Fine-tuning on {dname}: test top-1 per epoch (mean of {len(seeds)} seeds)")
    ax.legend(fontsize=8)
    save(fig, "curves.png")
    dino_b = results.get(f"dino_b_knn_s{seeds[0]}", {}).get("top1")
    floor = get("random_knn_s{s}")
    w(f"DINO's k-NN against the random-initialised floor: {fmt(get('dino_knn_s{s}'))} vs {fmt(floor)} "
      f"({compare(get('dino_knn_s{s}'), floor)}). Other settings (seed {seeds[0]}: teacher momentum 0.99, teacher "
      f"temperature 0.04 throughout, 1024 prototypes, lr 1e-3): {dino_b:.1f} vs the floor's "
      f"{results[f'random_knn_s{seeds[0]}']['top1']:.1f}. ![k-NN](figures/knn.png)\n")
    dino_runs = [f"dino_s{s}" for s in seeds] + [f"dino_b_s{seeds[0]}"]
    w("DINO's loss against ln(prototypes), the loss of a collapsed (uniform) output: "
      + ", ".join(f"{name} {results[name]['loss']:.2f} vs {math.log(runs_by[name].cfg.head_out_dim):.2f}"
                  for name in dino_runs if name in results)
      + ". ![DINO loss](figures/dino_loss.png)\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, name in enumerate(dino_runs):
        color = "C1" if "_b_" in name else "C0"
        ax.plot(range(1, len(results[name]["losses"]) + 1), results[name]["losses"], color=color,
                label=("other settings" if "_b_" in name else "defaults") if i in (0, len(seeds)) else None)
        ax.axhline(math.log(runs_by[name].cfg.head_out_dim), color=color, ls=":", lw=1)
    ax.set_xlabel("pre-training epoch")
    ax.set_ylabel("DINO loss (nats)")
    ax.set_title("DINO pre-training loss; dotted: ln(prototypes), a uniform (collapsed) output")
    ax.legend(fontsize=8)
    save(fig, "dino_loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = list(METHODS.values()) + [f"DINO (other settings, seed {seeds[0]})"]
    vals = [stats(get(m + "_knn_s{s}")) for m in METHODS] + [(dino_b, 0.0, 1)]
    ax.bar(range(len(vals)), [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=3, color="C0")
    ax.axhline(stats(floor)[0], color="k", ls="--", label="random-initialised backbone")
    ax.set_xticks(range(len(vals)), labels, fontsize=8, rotation=15)
    ax.set_ylabel("k-NN test top-1 (%)")
    ax.set_title(f"k-NN on frozen features after pre-training ({dname})")
    ax.legend(fontsize=8)
    save(fig, "knn.png")

    # claim 2
    w("## Claim 2: the lower layers matter more\n")
    w(f"Fine-tuning for {cfg.layer_epochs} epochs after keeping only the first K pre-trained blocks (the rest "
      f"re-initialised; K = {depth} keeps them all).\n")
    w("| K | " + " | ".join(METHODS[m] for m in ("mae", "mocov3")) + " |")
    w("|---|---|---|")
    layer = {m: [get(f"{m}_keep{k}_s{{s}}") for k in range(depth + 1)] for m in ("mae", "mocov3")}
    for k in range(depth + 1):
        w(f"| {k} | {fmt(layer['mae'][k])} | {fmt(layer['mocov3'][k])} |")
    half, found = depth // 2, []
    for m in ("mae", "mocov3"):  # the claim needs a gain from the pre-trained blocks, most of it from the lower half
        lo, mid, hi = (stats(layer[m][k])[0] for k in (0, half, depth))
        gain = compare(layer[m][depth], layer[m][0])
        if gain != ">":
            found.append((f"{METHODS[m]}: keeping all {depth} pre-trained blocks is {gain} re-initialising them all "
                          f"({hi:.1f} vs {lo:.1f}), so there is no gain to locate", False))
        else:
            share = (mid - lo) / (hi - lo)
            found.append((f"{METHODS[m]}: the lower {half} blocks give {100 * share:.0f}% of the gain of all {depth} "
                          f"({lo:.1f} -> {mid:.1f} -> {hi:.1f})", share > 0.5))
    ok = [f for _, f in found]
    w("\n" + "; ".join(t for t, _ in found) + ". Verdict (K = depth above K = 0, and the lower half giving more than "
      "half of that gain, for both): " + ("**reproduced**" if all(ok) else "**not reproduced**" if not any(ok)
                                          else "**mixed**") + ". ![layers](figures/layers.png)\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for m in ("mae", "mocov3"):
        mean_std_line(ax, range(depth + 1), layer[m], METHODS[m])
    ax.set_xlabel("pre-trained blocks kept (K), the rest re-initialised")
    ax.set_ylabel("fine-tuned test top-1 (%)")
    ax.set_title(f"Which pre-trained layers matter ({dname}, {cfg.layer_epochs} epochs, mean ± std)")
    ax.legend(fontsize=8)
    save(fig, "layers.png")

    # claim 3 and 4
    srcs = ("mae", "mocov3", "dmae", "supervised")
    td = cfg.transfer_data
    w("## Claim 3: on a data-poor task of another domain, MAE is worse than supervised and contrastive pre-training\n")
    w(f"Transfer to `{td}` (pre-trained on `{cfg.data}`), test top-1 after fine-tuning on the labelled images.\n")
    w("| labels per class | " + " | ".join(names[s] for s in srcs) + " | MAE vs supervised | MAE vs MoCo-v3 |")
    w("|---" * (len(srcs) + 3) + "|")
    signs3 = []
    for shots in cfg.shot_list:
        v = {src: get(f"{src}_{td}{shots}_s{{s}}") for src in srcs}
        c = [compare(v["mae"], v["supervised"]), compare(v["mae"], v["mocov3"])]
        signs3 += c
        w(f"| {shots} | " + " | ".join(fmt(v[s]) for s in srcs) + f" | {c[0]} | {c[1]} |")
    w(f"\nVerdict (MAE below both, at every size): {verdict(signs3, '<' * len(signs3))}. ![transfer](figures/transfer.png)\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for src in srcs:
        mean_std_line(ax, cfg.shot_list, [get(f"{src}_{td}{shots}_s{{s}}") for shots in cfg.shot_list], names[src])
    ax.set_xscale("log")
    ax.set_xticks(cfg.shot_list, [str(x) for x in cfg.shot_list])
    ax.set_xlabel("labelled images per class (log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Transfer {dname} -> {tname} with few labels (mean ± std)")
    ax.legend(fontsize=8)
    save(fig, "transfer.png")

    w("## Claim 4: distilling a larger MAE's attention (D-MAE) helps, most on data-poor tasks\n")
    w("| evaluation | MAE | D-MAE | D-MAE vs MAE |")
    w("|---|---|---|---|")
    rows4 = [("fine-tune", "{m}_ft_s{{s}}"), ("linear probe", "{m}_lin_s{{s}}"), ("k-NN", "{m}_knn_s{{s}}")] + \
        [(f"{td}, {shots} labels/class", f"{{m}}_{td}{shots}_s{{{{s}}}}") for shots in cfg.shot_list]
    signs_ft = []
    for label, pat in rows4:
        a, b = get(pat.format(m="mae")), get(pat.format(m="dmae"))
        signs_ft.append(compare(b, a))
        gain = stats(b)[0] - stats(a)[0]
        w(f"| {label} | {fmt(a)} | {fmt(b)} | {signs_ft[-1]} ({gain:+.1f}) |")
    ft_gain = stats(get("dmae_ft_s{s}"))[0] - stats(mae)[0]
    poor_gain = [stats(get(f"dmae_{td}{sh}_s{{s}}"))[0] - stats(get(f"mae_{td}{sh}_s{{s}}"))[0] for sh in cfg.shot_list]
    w(f"\nVerdict (D-MAE above MAE everywhere): {verdict(signs_ft, '>' * len(signs_ft))}; the gain on the data-poor "
      f"task ({', '.join(f'{g:+.1f}' for g in poor_gain)}) is {'larger' if min(poor_gain) > ft_gain else 'not larger'} "
      f"than on fine-tuning ({ft_gain:+.1f}).\n")

    # analysis
    w(f"## What the models look like inside (seed {seeds[0]})\n")
    attn = {}
    for run_name, labels_ in (("analysis_mae", ("MAE", "supervised")), ("analysis_mocov3", ("MoCo-v3",)),
                              ("analysis_dmae", ("D-MAE",))):
        path = os.path.join(cfg.out_dir, "runs", run_name, "analysis.json")
        with open(path) as f:
            a = json.load(f)
        for label, d in zip(labels_, a["attn_distance"]):
            attn[label] = d
    fig, axes = plt.subplots(1, len(attn), figsize=(3 * len(attn), 3), sharey=True, squeeze=False)
    for ax, (label, d) in zip(axes[0], attn.items()):
        for li, heads in enumerate(d):
            ax.scatter([li + 1] * len(heads), heads, s=10, color="C0", alpha=0.6)
        ax.plot(range(1, len(d) + 1), [sum(h) / len(h) for h in d], color="C1", label="mean over heads")
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.set_xticks(range(1, len(d) + 1))
    axes[0, 0].set_ylabel("attention distance (pixels)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Mean attention distance per head and layer ({dname} test images, {cfg.img_size} px, "
                 f"{cfg.patch_size}-px patches; seed {seeds[0]})", fontsize=10, y=1.04)
    save(fig, "attn_distance.png")
    w("| model | mean attention distance per layer (pixels, mean over heads) |")
    w("|---|---|")
    for label, d in attn.items():
        w(f"| {label} | " + ", ".join(f"{sum(h) / len(h):.1f}" for h in d) + " |")
    w("\n![attention distance](figures/attn_distance.png)\n")
    copies = [("analysis_mae", "cka.png", "cka_mae_vs_supervised.png", "Linear CKA between the layers of MAE and the "
               "supervised model"),
              ("analysis_mae", "recon.png", "recon_mae.png", "MAE reconstructions (rows of original / masked / reconstruction)"),
              ("analysis_dmae", "recon.png", "recon_dmae.png", "D-MAE reconstructions"),
              ("analysis_mae", "attn_maps.png", "attn_maps_mae.png", "MAE: last-layer attention per head"),
              ("analysis_mocov3", "attn_maps.png", "attn_maps_mocov3.png", "MoCo-v3: last-layer attention per head"),
              ("analysis_dmae", "attn_maps.png", "attn_maps_dmae.png", "D-MAE: last-layer attention per head"),
              ("analysis_mae", "attn_maps2.png", "attn_maps_supervised.png", "supervised: last-layer attention per head")]
    for run_name, src, dst, caption in copies:
        path = os.path.join(cfg.out_dir, "runs", run_name, src)
        if os.path.exists(path):
            with open(path, "rb") as f, open(os.path.join(figs, dst), "wb") as g:
                g.write(f.read())
            w(f"{caption}:\n\n![{caption}](figures/{dst})\n")
    with open(os.path.join(cfg.out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {cfg.out_dir}/REPORT.md and {figs}/", flush=True)


def stats_curve(curves):
    """Mean over seeds, epoch by epoch."""
    return [sum(c[i] for c in curves) / len(curves) for i in range(min(len(c) for c in curves))] if curves else []


def main(cfg):
    runs = study(cfg)
    results, wall = run_all(runs, cfg)
    write_report(cfg, runs, results, wall)
    return results


if __name__ == "__main__":
    cli(main, Config)
