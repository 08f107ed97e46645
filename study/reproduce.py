r"""The reproduction study in one command: every run of the paper's four claims, several seeds, then REPORT.md with
mean ± std tables, verdicts and figures (study/report.py).

`study()` lists the runs: `add(name, cfg, deps, **tags)` with one stage's Config; the report picks runs by their tags.
Each run is its own process, pinned to its GPUs before CUDA starts and killed with the study. A finished run leaves
result.json and is skipped, so a killed study resumes; a run finished by hand (the command `--plan` prints) is read
back from its log. On CPU, `--jobs` single-threaded runs go side by side (a fixed thread count keeps runs
deterministic).

    python -m study.reproduce                  # the default study: 3 seeds, embedded Fashion-MNIST (~2 h 20, 2 cores)
    python -m study.reproduce --quick          # every step at micro size in about 3 minutes, into out/quick
    python -m study.reproduce --preset=fewgpu --data_root=/imagenet --transfer_root=/data/flowers --plan  # GPU-hours
    python -m study.reproduce --preset=fewgpu --data_root=/imagenet --transfer_root=/data/flowers --gpus_per_run=8
    python -m study.reproduce --preset=in100 --data_root=/imagenet --transfer_root=/data/flowers --plan  # ImageNet-100

Claims (PAPER §3-§5): (1) MAE pre-training beats scratch and MoCo-v3 after fine-tuning; (2) lower layers matter more;
(3) MAE is worse than supervised / contrastive pre-training on data-poor tasks of another domain; (4) D-MAE helps,
most on those.
"""
import contextlib
import ctypes
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch

try:  # `python study/reproduce.py` puts study/ on the path, not the project's folder
    import analyze
except ModuleNotFoundError as e:
    if e.name != "analyze":
        raise
    raise SystemExit("study/reproduce.py is part of the study package: run it from the project's folder as "
                     "python -m study.reproduce") from None
import distill
import finetune
import knn
import pixels
import pretrain_contrastive
import pretrain_mae
from checkpoint import read_log, write_text
from common import RunError
from data import build_dataset
from flags import check, check_config, cli, int_list
from model import VIT_SIZES
from study.report import METHODS, given, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {m.__name__: m for m in (pretrain_mae, distill, pretrain_contrastive, finetune, knn, pixels, analyze)}
RESULT_FILE = {"knn": "knn.json", "pixels": "pixels.json"}  # stages that write one JSON file, not a folder
# Images per second of one CPU core, the `mini` ViT, per kind of run (the ETA and the CPU plan): calibrated on the
# default study's last run (REPORT.md)
CPU_SPEED = {"pretrain_mae": 2000, "distill": 1000, "mocov3": 300, "dino": 125, "finetune": 730, "linear": 1670,
             "knn": 3330, "analyze": 330, "pixels": 500}
# Images per second of one H100 (bf16), ViT-Tiny at 224 px: bench.py's compiled steps at batch 1024, the rest (~)
# derived by FLOPs: MoCo-v3 = 2 views x (fwd + bwd) + 2 momentum forwards = 2.7 ViT steps; D-MAE = the MAE step + an
# MAE-Base forward on the visible patches (~4x the student's); a linear probe or k-NN = forwards only (~1/3 a step)
GPU_SPEED = {"pretrain_mae": (31100, "measured"), "finetune": (12600, "measured"), "mocov3": (4700, "~"),
             "dino": (3000, "~"), "distill": (6200, "~"), "linear": (37800, "~"), "knn": (37800, "~"),
             "analyze": (10000, "~"), "pixels": (10000, "~")}
# JPEGs per second one worker core reads, decodes and crops to 224 px: bench.py's "one worker core" (ImageNet-sized
# files, 2-core CPU). DINO's ~: PIL's decode (528 img/s) + two views at MoCo-v3's cost + eight at a third of it each
WORKER_SPEED = {"pretrain_mae": (265, "measured"), "distill": (265, "measured"), "finetune": (265, "measured"),
                "linear": (265, "measured"), "mocov3": (178, "measured"), "dino": (95, "~"), "knn": (252, "measured"),
                "analyze": (252, "measured"), "pixels": (252, "~")}
FILE_DATA = ("imagefolder", "flowers102", "pets", "aircraft", "cars")  # decoded by workers; the rest sit in memory
# A packed store (data/pack.py): on a GPU each batch is an index gather and its crops are cut on the device (a store
# that fits half the GPU's memory sits there; a larger one is gathered from host memory by the workers), no decode.
# Packing: images per second per core (bench.py's "pack" row: ImageNet-sized JPEGs, 2-core CPU) and bytes per image
# at the default shorter side 256 (a 4:3 image: 256 x 341 x 3; pack.py prints its own estimate from the headers)
PACK_SPEED, STORE_BYTES = 70, 256 * 341 * 3
VAL_IMAGES = {"imagefolder": 50000, "imagefolder:imagenet100": 5000}  # ImageNet's val/ (all of it, the 100 classes')
# The largest micro-batch per 80 GB GPU (ViT-Tiny, 224 px, bf16) for --fit_gpu: bench.py's 9.2 GB (MAE step) and
# 17.8 GB (ViT train step) at 1024; MoCo-v3 (~20 GB) and DINO (~25 GB) estimated from their tokens per step
MICRO_BATCH = {"pretrain_mae": 1024, "distill": 1024, "finetune": 1024, "linear": 1024, "mocov3": 512, "dino": 256}
# Settings of the GPU presets (PAPER §2-§3, ImageNet-1k, ViT-Tiny 224/16); batches are global (per optimizer step)
PAPER = dict(model="tiny", teacher_model="base", img_size=224, patch_size=16, data="imagefolder", num_workers=10,
             seeds="0", pretrain_epochs=400, pretrain_warmup=40, mae_batch=4096, mae_lr=1.5e-4, mae_crop=0.08,
             moco_batch=1024, moco_lr=1.5e-4, moco_hidden=4096, dino_batch=1024, dino_momentum=0.996,
             dino_hidden=2048, dino_prototypes=65536, dino_local_crops=8, dino_local_size=96, finetune_epochs=300,
             finetune_warmup=5, finetune_batch=1024, finetune_lr=1e-3, finetune_mixup=0.2, finetune_randaug=10,
             finetune_crop=0.08, moco_layer_decay=0.75,
             linear_epochs=90, layer_epochs=100, transfer_data="flowers102", transfer_shots="", transfer_epochs=50,
             transfer_lr=0.1, transfer_batch=512, transfer_crop=0.08, transfer_flip=True)
PRESETS = {
    "paper": PAPER,
    # a day on 4-8 GPUs: 100 + 100 epochs for every method (MAE-Lite's MAE-Tiny: 76.2 after 400 + 100, its issue #6)
    "fewgpu": dict(PAPER, pretrain_epochs=100, pretrain_warmup=10, finetune_epochs=100, linear_epochs=30,
                   layer_epochs=30),
    # ImageNet-100 (CMC's 100 classes of the ImageNet-1k folder), a seed in under 12 H100-hours: MAE-Lite's MAE recipe
    # whole, MoCo-v3 and DINO their recipes' 300 epochs (an epoch of theirs costs 5-10 of MAE's), scratch DeiT's 300,
    # fine-tuning 100; no 600-epoch baseline; D-MAE's teacher a published MAE-Base; the paper's global batches
    "in100": dict(PAPER, seeds="0,1,2", classes="imagenet100", fit_gpu=True, contrastive_epochs=300,
                  scratch_epochs=300, finetune_epochs=100, linear_epochs=50, layer_epochs=20, layer_keep="0,3,6,9,12",
                  long_baseline=False),
}
NO_TEACHER = "MAE_BASE.pth"  # in100's --plan without --teacher_ckpt: the placeholder in D-MAE's commands


@dataclass
class Config:
    seeds: str = "0,1,2"  # comma-separated; every number in the claims' tables is a mean over these
    preset: str = ""  # paper | fewgpu | in100: fill every setting below for ImageNet-1k / -100 (given flags still win)
    # data
    data: str = "embedded"  # pre-training and fine-tuning data (claims 1, 2): embedded | fashion-mnist | imagefolder
    data_root: str = ""  # folder of the data; unused for the embedded slices
    subset: int = 0  # a seeded, class-balanced subset of N training images (0 = all)
    classes: str = ""  # imagefolder: only the class folders this file lists (imagenet100: CMC's 100); "" = all
    transfer_data: str = "mnist"  # another domain, few labels (claim 3): mnist (committed slice) | cifar10 | ...
    transfer_root: str = ""  # folder of the transfer data
    transfer_shots: str = "10,50,100"  # labelled images per class; "" = the whole training split
    transfer_steps: int = 2000  # optimizer steps per transfer run, whatever the labelled set's size (1000 underfit)
    transfer_epochs: int = 0  # or this many epochs (0 = use transfer_steps); the paper's CIFAR-100 script: 50
    transfer_batch: int = 32  # transfer batch (at most the labelled set's size)
    transfer_lr: float = 0.1  # SGD lr itself, not scaled by the batch (the paper's transfer.sh: 0.1)
    transfer_crop: float = 0.8  # RandomResizedCrop's lower area bound (the paper: 0.08 at 224 px; a digit needs most)
    transfer_flip: bool = False  # horizontal flips (the paper's, for natural images; a mirrored digit is another one)
    # model
    model: str = "mini"  # student ViT size (mini: width 64, depth 4, 4 heads, 0.2M parameters)
    teacher_model: str = "cpu"  # D-MAE's larger MAE teacher (cpu: width 96, depth 6; the paper: base)
    img_size: int = 28  # input side (Fashion-MNIST's own 28 px)
    patch_size: int = 7  # patch side: a 4 x 4 grid
    # schedules (equal for every method unless a preset follows each method's own recipe, as in100 does)
    pretrain_epochs: int = 20  # MAE, D-MAE and the teacher; MoCo-v3 and DINO too unless contrastive_epochs
    contrastive_epochs: int = 0  # MoCo-v3 and DINO pre-training epochs (0 = pretrain_epochs)
    pretrain_warmup: int = 0  # warm-up epochs (0 = a tenth of the epochs)
    mae_batch: int = 256  # MAE / D-MAE global batch (the paper: 4096)
    mae_lr: float = 1.5e-3  # MAE / D-MAE base lr (x batch / 256; the paper: 1.5e-4)
    mae_crop: float = 0.2  # MAE's crop scale lower bound (MAE-Lite: 0.08)
    moco_batch: int = 256  # MoCo-v3 / DINO global batch (MoCo-v3-Tiny: 1024)
    moco_lr: float = 1e-3  # MoCo-v3 base lr (the paper: 1.5e-4)
    moco_hidden: int = 1024  # MoCo-v3's MLP width (the paper: 4096)
    dino_hidden: int = 1024  # DINO's head MLP width (DINO: 2048)
    # DINO learns at this scale only with more steps, prototypes and a faster teacher than MoCo-v3's batch gives it
    # (`--dino_sweep`; at batch 256 and 256 prototypes its output goes uniform): the same epochs as every method
    dino_batch: int = 64  # DINO's global batch (DINO: 1024)
    dino_momentum: float = 0.99  # DINO's teacher momentum (DINO: 0.996)
    dino_prototypes: int = 4096  # DINO's output dimension (DINO's ViT recipe: 65536)
    dino_local_crops: int = 4  # DINO's local crops per image (DINO: 8)
    dino_local_size: int = 0  # DINO's local crop side; 0 = half the image side (DINO: 96 at 224)
    teacher_ckpt: str = ""  # D-MAE's teacher from a file (the paper: MAE's mae_pretrain_vit_base.pth); "" = train one
    finetune_epochs: int = 80  # claim 1's fine-tuning, and the from-scratch baseline unless scratch_epochs (MAE, seed
    # 0, last epoch: 80.9 after 40 at lr 4e-3, 82.2 at 8e-3, 82.7 after 80 at 4e-3, all below the pixels' 83.3)
    scratch_epochs: int = 0  # the from-scratch baseline (0 = finetune_epochs)
    long_baseline: bool = True  # that baseline again at twice its epochs (first seed): is it converged?
    finetune_warmup: int = 0  # warm-up epochs (0 = a tenth)
    finetune_batch: int = 128  # fine-tuning global batch (the paper: 1024)
    linear_epochs: int = 20  # linear probes
    layer_epochs: int = 10  # claim 2's fine-tuning runs, every K alike (shorter: depth + 1 runs per seed and method)
    layer_keep: str = ""  # claim 2's values of K (pre-trained blocks kept), comma-separated; "" = every K 0..depth
    # the fine-tuning recipe. The paper's mixup 0.2 + RandAugment m10 at lr 1e-3 keep the from-scratch model rising for
    # 60+ epochs at the CPU scale, the CPU study turns them off and raises the lr (docs/STUDY.md); the presets keep them
    finetune_lr: float = 8e-3  # base lr (x batch / 256); the paper: 1e-3
    finetune_mixup: float = 0.0  # the paper: 0.2
    finetune_randaug: int = 0  # RandAugment magnitude; the paper: 10
    finetune_crop: float = 0.8  # RandomResizedCrop's lower area bound; the paper: 0.08 (at 28 px it cuts items apart)
    moco_layer_decay: float = 0.85  # MoCo-v3's fine-tuning layer decay, as MAE's (the paper: 0.75; at 0.75 its
    # fine-tunes ended at 83.1, below the pixels' 83.3; at 0.85 at 84.0 and 84.6, seeds 0 and 1); DINO's stays 0.75
    # where it runs
    gpus: str = "auto"  # GPUs to use: auto = every visible one (none on a CPU machine), or a list like 0,1,2,3
    gpus_per_run: int = 1  # GPUs of each pre-training and claim-1 fine-tuning run (torchrun DDP; the rest take 1)
    fit_gpu: bool = False  # a batch above what one GPU holds (MICRO_BATCH) accumulates micro-batches; same global batch
    jobs: int = 2  # CPU only: runs at a time, one process each
    threads: int = 1  # torch threads per process (fixed, so results do not depend on the machine)
    num_workers: int = 0  # data-loading processes per run (file data; in-memory sets need none)
    out_dir: str = "results"  # REPORT.md, figures/, runs/<run>/ (--quick: out/quick)
    dino_sweep: bool = False  # add DINO at 3 other settings (seed 0; about 50 run-minutes more on 2 cores)
    plan: bool = False  # print every run with its estimated GPU-hours and its own command; run nothing
    quick: bool = False  # micro sizes, 1 seed, 1 epoch: every step in about 3 minutes (a smoke test, not results)

    def __post_init__(self):
        check(self.preset in ("", *PRESETS), f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name, value in PRESETS.get(self.preset, {}).items():  # a flag the user gave still wins
            if getattr(self, name) == getattr(Config, name):
                setattr(self, name, value)
        if self.quick:  # overrides the sizes, keeps the flags that say where and how
            if self.out_dir == Config.out_dir:  # never over the committed results/REPORT.md and its figures
                self.out_dir = "out/quick"
            self.seeds, self.subset, self.model, self.teacher_model = "0", 200, "micro", "micro"
            self.pretrain_epochs = self.finetune_epochs = self.linear_epochs = self.layer_epochs = 1
            self.transfer_shots, self.transfer_steps, self.transfer_batch = "2,4", 2, 8
        self.seed_list = int_list(self.seeds, "--seeds")
        self.shot_list = int_list(self.transfer_shots, "--transfer_shots")
        check(self.seed_list and min(self.seed_list) >= 0, f"--seeds must be non-negative, got {self.seeds!r}")
        check(min(self.shot_list, default=1) > 0, f"--transfer_shots must be positive, got {self.transfer_shots!r}")
        depth = VIT_SIZES.get(self.model, {}).get("depth", 0)
        # claim 2's K values: 0 (none kept), the half and the whole depth are what its verdict compares
        self.keep_list = sorted(set(int_list(self.layer_keep, "--layer_keep")) or range(depth + 1))
        check({0, depth // 2, depth} <= set(self.keep_list) <= set(range(depth + 1)),
              f"--layer_keep must lie in 0..{depth} and hold 0, {depth // 2} and {depth} (its verdict compares "
              f"them), got {self.layer_keep!r}")
        # in100's D-MAE distils a published MAE-Base, as the paper (one trained here would be another teacher)
        check(self.preset != "in100" or self.teacher_ckpt or self.plan,
              "--preset=in100 needs --teacher_ckpt: a published MAE-Base, e.g. MAE's mae_pretrain_vit_base.pth "
              "(--plan shows the study without it)")
        check_config(self, ">=0", transfer_steps=">0", transfer_lr=">0", transfer_crop="(0,1]", finetune_lr=">0",
                     finetune_randaug="[0,10]", finetune_crop="(0,1]", transfer_batch=">0", pretrain_epochs=">0",
                     finetune_epochs=">0", linear_epochs=">0", layer_epochs=">0", jobs=">0", threads=">0",
                     gpus_per_run=">0", mae_batch=">0", moco_batch=">0", dino_batch=">0", finetune_batch=">0",
                     mae_lr=">0", moco_lr=">0", mae_crop="(0,1]", dino_momentum="[0,1]",
                     moco_layer_decay="(0,1]")
        check(self.teacher_model in VIT_SIZES, f"--teacher_model must be one of {sorted(VIT_SIZES)}")
        # the GPUs to schedule on: 'auto' asks torch how many are visible (without starting CUDA); [] on a CPU machine
        self.devices = ([str(i) for i in range(torch.cuda.device_count())] if self.gpus == "auto" else
                        [g.strip() for g in self.gpus.split(",") if g.strip()])
        check(not self.devices or self.gpus_per_run <= len(self.devices),
              f"--gpus_per_run={self.gpus_per_run} but only {len(self.devices)} GPUs: {self.devices}")


@dataclass
class Run:
    name: str  # its folder under runs/
    cfg: object  # one stage's Config
    deps: tuple = ()  # runs that must finish first (their checkpoints are read)
    tags: dict = field(default_factory=dict)  # what the report selects runs by: method, seed, eval, shots, keep
    ddp: bool = False  # may span --gpus_per_run GPUs (the long runs); the others take one

    @property
    def stage(self):  # the module whose main() it calls
        return type(self.cfg).__module__

    @property
    def folder(self):  # knn.py and pixels.py write a file, not a folder
        return os.path.dirname(self.cfg.out) if self.stage in RESULT_FILE else self.cfg.out_dir

    def images(self):  # k-NN: bank + test; analysis: both models' images
        c = self.cfg
        if self.stage == "analyze":
            return 2 * c.num_images
        return (c.epochs if hasattr(c, "epochs") else 2) * data_size(c.data, c.data_root, c.subset, c.classes)[0]

    def speed_key(self):
        if self.stage == "pretrain_contrastive":
            return self.cfg.method
        return "linear" if self.stage == "finetune" and self.cfg.mode == "linear" else self.stage


# Training-set sizes and classes for a --plan without the data (name, or name:classes for a --classes subset)
NOMINAL = {"imagefolder": (1281167, 1000), "imagefolder:imagenet100": (126689, 100), "flowers102": (2040, 102),
           "packed": (1281167, 1000), "packed:imagenet100": (126689, 100),  # a store of ImageNet, not here
           "cifar10": (50000, 10), "cifar100": (50000, 100), "pets": (3680, 37), "aircraft": (6667, 100),
           "cars": (8144, 196)}


@functools.lru_cache(maxsize=None)
def data_size(name, root, subset=0, classes=""):
    """(training images, classes), counted; the nominal figures when the data is not here."""
    try:
        ds, n_classes = build_dataset(name, root, True, subset, classes)
        return len(ds), n_classes
    except RunError:
        key = f"{name}:{classes}" if classes else name
        if key not in NOMINAL:
            raise
        n, n_classes = NOMINAL[key]
        return min(n, subset) if subset else n, n_classes


def split_batch(global_batch, world, limit, what="the batch"):
    """{batch_size_per_gpu, accum_steps}: `global_batch` over `world` processes in micro-batches of at most `limit`,
    the fewest accumulation steps that divide each share (4096 at most 1024: 1024 x 4 on 1 GPU, 512 x 1 on 8)."""
    check(global_batch % world == 0, f"{what} {global_batch} does not split over {world} processes")
    share = global_batch // world
    accum = math.ceil(share / limit)
    while share % accum:
        accum += 1
    return dict(batch_size_per_gpu=share // accum, accum_steps=accum)


# --- the study ---
def study(cfg):
    """Every run, in dependency order."""
    runs = []
    folder = lambda name: os.path.join(cfg.out_dir, "runs", name)
    ckpt = lambda name: os.path.join(folder(name), "ckpt.pt")
    n_train = data_size(cfg.data, cfg.data_root, cfg.subset, cfg.classes)[0]
    transfer_classes = data_size(cfg.transfer_data, cfg.transfer_root)[1]
    shape = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, num_workers=cfg.num_workers)
    data = dict(data=cfg.data, data_root=cfg.data_root, subset=cfg.subset, classes=cfg.classes)
    pe, fe = cfg.pretrain_epochs, cfg.finetune_epochs
    ce, se = cfg.contrastive_epochs or pe, cfg.scratch_epochs or fe
    warm = lambda epochs, given=0: given or max(1, epochs // 10)
    # a global batch as one GPU runs it: whole, or with fit_gpu in micro-batches that fit (launch() splits it over GPUs)
    batch_of = lambda kind, n: split_batch(min(n, n_train), 1, MICRO_BATCH[kind] if cfg.fit_gpu else min(n, n_train))
    pre = dict(epochs=pe, warmup_epochs=warm(pe, cfg.pretrain_warmup), **shape, **data)
    mae = dict(pre, **batch_of("pretrain_mae", cfg.mae_batch), base_lr=cfg.mae_lr, crop_min_scale=cfg.mae_crop)
    contrastive = dict(pre, epochs=ce, warmup_epochs=warm(ce, cfg.pretrain_warmup),
                       **batch_of("mocov3", cfg.moco_batch))
    ft = dict(model=cfg.model, epochs=fe, warmup_epochs=warm(fe, cfg.finetune_warmup),
              **batch_of("finetune", cfg.finetune_batch), base_lr=cfg.finetune_lr, mixup=cfg.finetune_mixup,
              randaug_magnitude=cfg.finetune_randaug, crop_min_scale=cfg.finetune_crop, **shape, **data)
    knn_data = dict(data, num_workers=cfg.num_workers)

    def add(name, c, deps=(), ddp=False, **tags):
        if hasattr(c, "out_dir"):
            c.out_dir = folder(name)
        else:
            c.out = os.path.join(folder(name), RESULT_FILE[type(c).__module__])
        runs.append(Run(name, c, tuple(deps), tags, ddp))

    # D-MAE's teacher: --teacher_ckpt, else one larger MAE (first seed) for every seed; in100: a published MAE-Base
    own_teacher = not cfg.teacher_ckpt and cfg.preset != "in100"
    decay = dict(mae=0.85, dmae=0.85, mocov3=cfg.moco_layer_decay, dino=0.75)  # fine-tuning's layer decay
    if own_teacher:
        add("teacher", pretrain_mae.Config(model=cfg.teacher_model, seed=cfg.seed_list[0], **mae), ddp=True)
    teacher, teacher_deps = (ckpt("teacher"), ["teacher"]) if own_teacher else (cfg.teacher_ckpt or NO_TEACHER, [])
    local = cfg.dino_local_size or max(cfg.patch_size, cfg.img_size // 2 // cfg.patch_size * cfg.patch_size)
    dino = dict(contrastive, method="dino", model=cfg.model, local_crop_size=local, local_crops=cfg.dino_local_crops,
                head_hidden_dim=cfg.dino_hidden, head_out_dim=cfg.dino_prototypes, ema_momentum=cfg.dino_momentum,
                **batch_of("dino", cfg.dino_batch))
    for s in cfg.seed_list:
        # pre-training
        add(f"mae_s{s}", pretrain_mae.Config(model=cfg.model, seed=s, **mae), ddp=True, method="mae", seed=s)
        add(f"dmae_s{s}", distill.Config(model=cfg.model, teacher_ckpt=teacher, teacher_model=cfg.teacher_model,
                                         seed=s, **mae), teacher_deps, ddp=True, method="dmae", seed=s)
        add(f"mocov3_s{s}", pretrain_contrastive.Config(
            method="mocov3", model=cfg.model, local_crop_size=local, seed=s, base_lr=cfg.moco_lr,
            head_hidden_dim=cfg.moco_hidden, **contrastive), ddp=True, method="mocov3", seed=s)
        add(f"dino_s{s}", pretrain_contrastive.Config(**dino, seed=s), ddp=True, method="dino", seed=s)
        # claim 1: fine-tune, linear probe, k-NN of each; the supervised baseline
        scratch = dict(ft, epochs=se, warmup_epochs=warm(se, cfg.finetune_warmup))  # in100: DeiT's 300 epochs
        add(f"scratch_s{s}", finetune.Config(mode="scratch", seed=s, **scratch), ddp=True, method="scratch", seed=s,
            eval="ft")
        add(f"random_knn_s{s}", knn.Config(ckpt="random", model=cfg.model, seed=s, img_size=cfg.img_size,
                                           patch_size=cfg.patch_size, **knn_data), method="random", seed=s, eval="knn")
        for m in METHODS:
            src, key = f"{m}_s{s}", "teacher" if m == "dino" else "model"  # DINO's EMA teacher is its model
            add(f"{m}_ft_s{s}", finetune.Config(init_ckpt=ckpt(src), init_key=key, layer_decay=decay[m], seed=s, **ft),
                [src], ddp=True, method=m, seed=s, eval="ft")
            le = cfg.linear_epochs
            add(f"{m}_lin_s{s}", finetune.Config(**dict(ft, mode="linear", init_ckpt=ckpt(src), init_key=key,
                                                        base_lr=0.1, mixup=0, randaug_magnitude=0, seed=s, epochs=le,
                                                        warmup_epochs=warm(le))), [src], method=m, seed=s, eval="lin")
            add(f"{m}_knn_s{s}", knn.Config(ckpt=ckpt(src), key=key, **knn_data), [src], method=m, seed=s, eval="knn")
        # claim 2: keep only the first K pre-trained blocks, re-initialise the rest (K = depth: keep them all)
        depth, ye = VIT_SIZES[cfg.model]["depth"], cfg.layer_epochs
        for m in ("mae", "mocov3"):
            for k in cfg.keep_list:
                add(f"{m}_keep{k}_s{s}", finetune.Config(**dict(
                    ft, init_ckpt=ckpt(f"{m}_s{s}"), reinit_from_block=k if k < depth else -1, epochs=ye,
                    warmup_epochs=warm(ye), layer_decay=decay[m], seed=s)), [f"{m}_s{s}"],
                    method=m, seed=s, eval="keep", keep=k)
        # claim 3: another domain with few labels, the transfer recipe (PAPER §3.3)
        for src, src_ckpt in (("mae", f"mae_s{s}"), ("mocov3", f"mocov3_s{s}"), ("dmae", f"dmae_s{s}"),
                              ("supervised", f"scratch_s{s}")):
            for shots in cfg.shot_list or [0]:  # 0: the whole training split
                n = shots * transfer_classes if shots else data_size(cfg.transfer_data, cfg.transfer_root)[0]
                batch = min(cfg.transfer_batch, n)
                epochs = cfg.transfer_epochs or math.ceil(cfg.transfer_steps / (n // batch))
                add(f"{src}_{cfg.transfer_data}{shots or ''}_s{s}", finetune.Config(
                    init_ckpt=ckpt(src_ckpt), data=cfg.transfer_data, data_root=cfg.transfer_root,
                    subset=shots * transfer_classes, model=cfg.model, epochs=epochs, warmup_epochs=epochs // 5,
                    batch_size_per_gpu=batch, optimizer="sgd", base_lr=cfg.transfer_lr * 256 / batch,
                    crop_min_scale=cfg.transfer_crop, hflip=cfg.transfer_flip, weight_decay=0, clip_grad=1.0,
                    layer_decay=0.75, mixup=0, randaug_magnitude=0, seed=s, **shape), [src_ckpt], method=src, seed=s,
                    eval="transfer", shots=shots)
    s = cfg.seed_list[0]
    # is the baseline converged? the same recipe for twice the epochs
    if cfg.long_baseline:
        add(f"scratch_long_s{s}", finetune.Config(mode="scratch", seed=s, **dict(ft, epochs=2 * se,
                                                                                 warmup_epochs=warm(2 * se))),
            ddp=True, method="scratch", seed=s, eval="ft_long")
    # DINO's sweep at CPU scale, seed 0: what it takes for DINO to learn at this scale (each changes the study's DINO)
    moco_batch = batch_of("mocov3", cfg.moco_batch)  # MoCo-v3's batch (and its accumulation, with --fit_gpu)
    sweep = {"b256": dict(**moco_batch, head_out_dim=256, ema_momentum=0.996),  # MoCo-v3's batch, 256 prototypes
             "b256t04": dict(**moco_batch, head_out_dim=1024, warmup_teacher_temp=0.04,
                             teacher_temp=0.04, base_lr=1e-3),  # a sharper teacher, a higher lr instead of more steps
             "b64": dict(ema_momentum=0.996)}  # more steps and prototypes, DINO's own teacher momentum
    for name, change in sweep.items() if cfg.dino_sweep and not cfg.preset else ():
        add(f"dino_{name}_s{s}", pretrain_contrastive.Config(**{**dino, **change}, seed=s), ddp=True,
            method=f"dino_{name}", seed=s, sweep=True)
        add(f"dino_{name}_knn_s{s}", knn.Config(ckpt=ckpt(f"dino_{name}_s{s}"), key="teacher", **knn_data),
            [f"dino_{name}_s{s}"], method=f"dino_{name}", seed=s, eval="knn")
    # the analysis figures (first seed): CKA MAE vs supervised, attention of each model, reconstructions
    n_img, batch = (32, 16) if cfg.quick else (512, 128)
    for m, a, b in (("mae", f"mae_s{s}", f"scratch_s{s}"), ("mocov3", f"mocov3_s{s}", ""), ("dmae", f"dmae_s{s}", "")):
        add(f"analysis_{m}", analyze.Config(ckpt=ckpt(a), ckpt2=ckpt(b) if b else "", data=cfg.data,
                                            data_root=cfg.data_root, classes=cfg.classes, num_images=n_img,
                                            batch_size=batch),
            [a] + ([b] if b else []), method=m, eval="analysis")
    # the raw-pixel floors (no seed: nothing is drawn): a linear classifier and a k-NN on the pixels of exactly the
    # images each evaluation uses, the training split (or the transfer task's labelled images) fitted, the test scored;
    # at most 32 px a side (ImageNet's 224-px views would be 150,528 numbers an image)
    side = min(cfg.img_size, 32)
    add("pixels", pixels.Config(img_size=side, **knn_data), method="pixels", eval="floor")
    for shots in cfg.shot_list or [0]:
        add(f"pixels_{cfg.transfer_data}{shots or ''}", pixels.Config(
            data=cfg.transfer_data, data_root=cfg.transfer_root, subset=shots * transfer_classes, img_size=side,
            num_workers=cfg.num_workers), method="pixels", eval="transfer_floor", shots=shots)
    return runs


# --- running one run (in its own process) ---
def die_with_parent():
    """Linux: SIGKILL this process when its parent dies (no orphan keeps a GPU or a lock)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def execute(spec_path):
    """`python -m study.reproduce run-one spec.json` (every rank): run the stage; rank 0 writes result.json (done)."""
    die_with_parent()
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    stage, start = STAGES[spec["stage"]], time.time()
    returned = stage.main(stage.Config(**spec["config"]))
    if int(os.environ.get("RANK", 0)) == 0:  # the study's own settings (a rank's batch is its share of them)
        result = dict(name=spec["name"], stage=spec["stage"], config=spec["study_config"], devices=spec["devices"],
                      world_size=int(os.environ.get("WORLD_SIZE", 1)), threads=spec["threads"],
                      seconds=time.time() - start, started=spec.get("launched", start), ended=time.time(),
                      **collect(spec["stage"], spec["config"], returned))
        write_text(os.path.join(os.path.dirname(spec_path), "result.json"), json.dumps(result, indent=1))


def collect(stage, config, returned=None):
    """What the report reads from a finished run."""
    if stage in RESULT_FILE and returned is None:
        with open(config["out"]) as f:
            returned = json.load(f)
    if stage == "knn":
        return dict(top1=returned["top1"], top5=returned["top5"])
    if stage == "pixels":  # top1: the linear classifier's
        return dict(top1=returned["linear_top1"], knn_top1=returned["knn_top1"])
    if stage == "analyze":
        return {}
    rows = read_log(config["out_dir"])
    if stage == "finetune":
        return dict(top1=rows[-1]["top1"], best_top1=max(r["top1"] for r in rows), curve=[r["top1"] for r in rows])
    return dict(loss=rows[-1]["loss"], losses=[r["loss"] for r in rows],
                **{k: [r[k] for r in rows] for k in rows[-1] if k.startswith("teacher_")})


def settings(run):
    return json.loads(json.dumps(asdict(run.cfg), default=str))


def differences(run, old, also_ignored=()):
    """The settings of `run` that differ from a recorded `old` one, but num_workers and those named. A setting newer
    than `old` counts as unchanged at its default: that run ran with it."""
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(run.cfg)}, default=str))
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings(run).items() if old.get(k) != v
            and k not in ("num_workers", *also_ignored) and not (k not in old and v == defaults.get(k))]


def recorded(run):
    """The run's result.json, or None."""
    path = os.path.join(run.folder, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)


def finished(run):
    """The run's result if it finished with these settings (other settings are refused), or adopted from its log."""
    result = recorded(run)
    if result is None:
        return adopt(run)
    changed = differences(run, result["config"])
    check(not changed, f"{run.folder} holds a run with other settings ({', '.join(changed)}); use another --out_dir, "
                       f"or delete that folder to redo it")
    return result


def adopt(run):
    """A run done by its own command (`--plan`'s list on another scheduler) -> its result, if complete."""
    c = settings(run)
    if run.stage in RESULT_FILE:
        done = os.path.exists(c["out"])
    elif run.stage == "analyze" or not os.path.exists(os.path.join(run.folder, "config.json")):
        return None
    else:
        rows = read_log(run.folder)
        with open(os.path.join(run.folder, "config.json")) as f:
            given = json.load(f)
        # a rank's batch depends on how many GPUs ran it; num_heads 0 (the checkpoint's) is recorded resolved
        ignored = ("batch_size_per_gpu", "accum_steps") + (("num_heads",) if c.get("num_heads") == 0 else ())
        done = bool(rows) and rows[-1]["epoch"] == c["epochs"] and not differences(run, given, ignored)
    if not done:
        return None
    result = dict(name=run.name, stage=run.stage, config=c, seconds=0.0, devices=[], world_size=0, adopted=True,
                  **collect(run.stage, c))
    write_text(os.path.join(run.folder, "result.json"), json.dumps(result, indent=1))
    return result


def per_rank(run, world):
    """The run's settings for one of `world` processes: its share of the study's global batch."""
    c = settings(run)
    if world > 1:
        c.update(split_batch(c["batch_size_per_gpu"] * c["accum_steps"], world, c["batch_size_per_gpu"],
                             f"{run.name}: batch"))
    return c


def launch(run, cfg, devices):
    """Start a run's process pinned to `devices`, under torchrun when it spans several (on CPU: --gpus_per_run gloo
    processes, how the tests check that path); output to its folder's output.log."""
    world = len(devices) if devices else (cfg.gpus_per_run if run.ddp else 1)
    os.makedirs(run.folder, exist_ok=True)
    spec = os.path.join(run.folder, "run.json")
    write_text(spec, json.dumps(dict(name=run.name, stage=run.stage, config=per_rank(run, world), devices=devices,
                                     world_size=world, threads=cfg.threads, study_config=settings(run),
                                     launched=time.time()), indent=1))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                              if world > 1 else []) + ["-m", "study.reproduce", "run-one", spec]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), CUDA_VISIBLE_DEVICES=",".join(devices),
               PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = open(os.path.join(run.folder, "output.log"), "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent), log


def why_it_failed(path):
    """', its last error: ...' of a failed run's output.log (the exception its last traceback raised: torchrun's summary
    follows its ranks' tracebacks), else ', its last line: ...', so that the study's own error says why."""
    with open(path, errors="replace") as f:
        lines = [re.sub(r"^\[rank\d+\]: ?", "", line).rstrip() for line in f.read()[-20000:].splitlines()]
    for i in reversed([i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]):
        raised = next((line for line in lines[i + 1:] if line and not line[0].isspace()), "")
        if raised and "ChildFailedError" not in raised:  # torchrun's own: a rank failed, its traceback says why
            return f", its last error: {raised[:300]}"
    rest = [line.strip() for line in lines if line.strip().strip("=-")]
    return f", its last line: {rest[-1][:300]}" if rest else ""


def run_all(runs, cfg):
    """Run what has not finished, dependencies first, the longest ready run first, with progress and an ETA. A failed
    run stops the study with one line naming its log."""
    results = {r.name: res for r in runs if (res := finished(r)) is not None}
    todo = [r for r in runs if r.name not in results]
    slots = cfg.devices or [None] * cfg.jobs  # a GPU each, or CPU job slots
    free = list(slots)
    print(f"{len(runs)} runs, {len(results)} already finished, {len(todo)} to go, on "
          f"{'GPUs ' + ','.join(cfg.devices) if cfg.devices else f'{cfg.jobs} CPU jobs'} "
          f"(outputs: {cfg.out_dir}/runs/<run>/output.log)", flush=True)
    start, spent, estimated = time.time(), 0.0, 0.0
    going = {}  # run name -> (run, process, log, its slots)
    try:
        while todo or going:
            for r in sorted((r for r in todo if all(d in results for d in r.deps)), key=lambda r: -cost(r, cfg)):
                need = cfg.gpus_per_run if (r.ddp and cfg.devices) else 1
                if len(free) < need:
                    continue
                mine, free[:] = free[:need], free[need:]
                todo.remove(r)
                going[r.name] = (r, *launch(r, cfg, [d for d in mine if d is not None]), mine)
                print(f"  start {r.name}" + (f" on GPU {','.join(mine)}" if cfg.devices else ""), flush=True)
            time.sleep(0.2)
            for name, (r, proc, log, mine) in list(going.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del going[name]
                free += mine
                results[name] = recorded(r)
                if proc.returncode != 0 or results[name] is None:
                    raise RunError(f"run {name} failed (exit {proc.returncode}" + (f", GPUs {','.join(mine)}"
                                   if cfg.devices else "") + f"{why_it_failed(log.name)}): see {r.folder}/output.log; "
                                   "finished runs are kept, run the study again to resume")
                spent, estimated = spent + results[name]["seconds"], estimated + cost(r, cfg)
                left = sum(cost(x, cfg) for x in todo + [g[0] for g in going.values()])
                eta = left * spent / max(estimated, 1e-9) / len(slots)
                score = f" top-1 {results[name]['top1']:.1f}" if "top1" in results[name] else ""
                print(f"[{len(results)}/{len(runs)}] {name} done in {results[name]['seconds']:.1f} s{score} | "
                      f"{(time.time() - start) / 60:.1f} min so far, about {eta / 60:.1f} min left", flush=True)
    finally:
        for _, proc, log, _ in going.values():  # a failure or Ctrl-C: the runs in flight stop (and resume later)
            proc.kill()
            proc.wait()
            log.close()
    return results, time.time() - start


# --- the plan: GPU-hours (or CPU minutes) before anything runs ---
def on_gpus(cfg):
    """The study's unit is a GPU (a preset, or GPUs here), else a CPU core."""
    return bool(cfg.devices or cfg.preset)


def cost(run, cfg):
    """Estimated seconds on one CPU core or GPU: its kind's speed scaled by width^2 x depth x tokens against the size
    it was measured at (GPU: tiny at 224/16; CPU: mini at 28/7)."""
    size = VIT_SIZES[getattr(run.cfg, "model", "") or cfg.model]
    work = size["embed_dim"] ** 2 * size["depth"] * (cfg.img_size // cfg.patch_size) ** 2
    if on_gpus(cfg):
        return run.images() / GPU_SPEED[run.speed_key()][0] * work / (192 ** 2 * 12 * 196)
    return run.images() / CPU_SPEED[run.speed_key()] * work / (64 ** 2 * 4 * 16)


def command(run, cfg):
    """The stage command that runs `run` alone: its flags that differ from the stage's defaults."""
    given = {"teacher_ckpt": "x"} if run.stage == "distill" else {}  # its one required flag
    if hasattr(run.cfg, "method"):  # --method brings the method's own defaults (DINO's momentum, lr, ...)
        given["method"] = run.cfg.method
    defaults = settings(Run("", type(run.cfg)(**given)))
    gpus = cfg.gpus_per_run if run.ddp else 1
    flags = [f"--{k}={v}" for k, v in per_rank(run, gpus).items() if defaults.get(k) != v or k in ("out_dir", "method")]
    return f"{f'torchrun --nproc_per_node={gpus}' if gpus > 1 else 'python'} {run.stage}.py " + " ".join(flags)


def wall_clock(runs, cfg, gpus, seconds):
    """Hours on `gpus` GPUs (CPU: job slots) at `seconds` per run, simulated as run_all schedules (a DDP run takes
    --gpus_per_run GPUs for 1/K of its time)."""
    done, todo, going, free, now = {}, list(runs), [], gpus, 0.0
    while todo or going:
        for r in sorted((r for r in todo if all(d in done for d in r.deps)), key=lambda r: -seconds[r.name]):
            k = cfg.gpus_per_run if r.ddp and on_gpus(cfg) else 1
            if k <= free:
                todo.remove(r)
                free -= k
                going.append((now + seconds[r.name] / k / 3600, r, k))
        end, r, k = min(going, key=lambda g: g[0])
        going.remove((end, r, k))
        now, free, done[r.name] = end, free + k, end
    return now


def measured(run):
    """The seconds a run took here with these settings; None for adopted runs (they record 0)."""
    result = recorded(run)
    return (result["seconds"] or None) if result and not differences(run, result["config"]) else None


def print_plan(runs, cfg):
    """Every run with its cost and its own command, the total and the wall-clock: CPU minutes (measured where a run
    finished here, else estimated), or GPU-hours with the worker cores per GPU its JPEG data path needs."""
    gpu = on_gpus(cfg)
    timed = {} if gpu else {r.name: measured(r) for r in runs}
    seconds = {r.name: timed.get(r.name) or cost(r, cfg) for r in runs}
    if not gpu:
        print(f"{len(runs)} runs; CPU minutes, one core and --threads={cfg.threads} each: measured = the run's own "
              f"seconds in its result.json here ({sum(map(bool, timed.values()))} runs), ~ = estimated from CPU_SPEED "
              "(img/s per core of the `mini` ViT per kind of run, scaled by the run's model size)")
        for r in runs:
            print(f"{r.name:24s} {seconds[r.name] / 60:8.1f} CPU-min {'measured' if timed[r.name] else '~':8s} "
                  + command(r, cfg))
        hours = wall_clock(runs, cfg, cfg.jobs, seconds)
        print(f"total {sum(seconds.values()) / 60:.0f} CPU-minutes; {cfg.jobs} runs at a time (--jobs): about "
              f"{hours * 60:.0f} min wall-clock (scheduled as the study runs them)")
        return sum(seconds.values()) / 3600, hours
    print(f"{len(runs)} runs; GPU-hours on one H100 (bf16, ViT-{cfg.model} at {cfg.img_size} px) from bench.py's model "
          f"steps (measured: MAE {GPU_SPEED['pretrain_mae'][0]:,} and fine-tuning {GPU_SPEED['finetune'][0]:,} img/s, "
          "compiled, batch 1024; ~ = derived by FLOPs), if the data path keeps up; then its data path: a packed store "
          "is cut on the GPU; JPEG files need worker cores per GPU (read + decode + crops: "
          f"{WORKER_SPEED['finetune'][0]} img/s a core for one view, {WORKER_SPEED['mocov3'][0]} for MoCo-v3's two, "
          f"DINO's ~{WORKER_SPEED['dino'][0]} estimated) and, where --num_workers={cfg.num_workers} cores are fewer, "
          "the run's GPU-hours at that pace")
    bound = dict(seconds)  # GPU-seconds at num_workers cores
    for r in runs:
        data = "in memory"
        if r.cfg.data == "packed":
            data = "store, cut on the GPU"
        elif r.cfg.data in FILE_DATA:
            per_core = WORKER_SPEED[r.speed_key()][0]
            workers = max(1, getattr(r.cfg, "num_workers", 0))  # no workers: the training process decodes
            bound[r.name] = max(seconds[r.name], r.images() / (workers * per_core))
            data = f"{r.images() / seconds[r.name] / per_core:.0f} cores/GPU" + (
                f", {bound[r.name] / 3600:.2f} GPU-h at {cfg.num_workers}" if bound[r.name] > seconds[r.name] else "")
        print(f"{r.name:24s} {seconds[r.name] / 3600:8.2f} GPU-h {GPU_SPEED[r.speed_key()][1]:8s} data: {data:30s} "
              + command(r, cfg))
    total, gpus = sum(seconds.values()) / 3600, len(cfg.devices) or cfg.gpus_per_run  # no GPUs here: one run's
    hours = wall_clock(runs, cfg, gpus, seconds)
    print(f"total {total:.1f} GPU-hours; on {gpus} GPU(s), {cfg.gpus_per_run} per pre-training / fine-tuning run: "
          f"about {hours:.1f} h wall-clock (scheduled as the study runs them; {total / gpus:.1f} h if never idle)")
    limited = [r for r in runs if bound[r.name] > seconds[r.name]]
    slower = (f"; with {cfg.num_workers} cores per GPU the study takes {sum(bound.values()) / 3600:.1f} GPU-hours, "
              f"about {wall_clock(runs, cfg, gpus, bound):.1f} h wall-clock") if limited else ""
    print(f"data path: {len(limited)} of {len(runs)} runs need more worker cores per GPU than their --num_workers="
          f"{cfg.num_workers} to keep up{slower}")
    for name, root, classes in {(r.cfg.data, r.cfg.data_root, getattr(r.cfg, "classes", "")) for r in limited}:
        if name != "imagefolder":
            print(f"  --transfer_data={name}: pack it too (python data/pack.py --data={name} "
                  f"--data_root={root or 'DIR'} --out_dir=STORE), then --transfer_data=packed --transfer_root=STORE")
            continue
        key = f"{name}:{classes}" if classes else name
        n = data_size(name, root, 0, classes)[0] + VAL_IMAGES.get(key, 0)
        print(f"  pack {root or 'the ImageNet folder'} first: python data/pack.py --data_root={root or '/imagenet'}"
              + (f" --classes={classes}" if classes else "") + f" --out_dir=STORE ({n:,} images, about "
              f"{n * STORE_BYTES / 1e9:.0f} GB, about {n / (PACK_SPEED * 16) / 60:.0f} min on 16 cores at "
              f"{PACK_SPEED} img/s a core), then --data=packed --data_root=STORE: the batches are cut on the GPU")
    if NO_TEACHER in {getattr(r.cfg, "teacher_ckpt", "") for r in runs}:
        print(f"D-MAE's teacher: {NO_TEACHER} above stands for the published MAE-Base the study needs: pass "
              "--teacher_ckpt=mae_pretrain_vit_base.pth (MAE's) to run it")
    return total, hours


def main(cfg):
    runs = study(cfg)
    if cfg.plan:
        return print_plan(runs, cfg)
    results, wall = run_all(runs, cfg)
    # the report reads settings and each run's result with its tags, in study order
    write_report(SimpleNamespace(**asdict(cfg), seed_list=cfg.seed_list, shot_list=cfg.shot_list,
                                 keep_list=cfg.keep_list, devices=cfg.devices, typed=given(cfg),
                                 train_images=data_size(cfg.data, cfg.data_root, cfg.subset, cfg.classes)[0]),
                 [dict(results[r.name], tags=r.tags) for r in runs], wall)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run-one":  # one run of the study, in its own process (launch())
        execute(sys.argv[2])
    else:
        cli(main, Config)
