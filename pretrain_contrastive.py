r"""Contrastive / self-distillation pre-training of the shared ViT: MoCo-v3 and DINO (PAPER §2.2, §2.4).

MoCo-v3: two BYOL-style views; query = predictor(projector(encoder(view))), key = momentum projector(encoder(other
view)); InfoNCE against every rank's keys at temperature 0.2, scaled by 2T; the momentum rises from 0.99 to 1.
DINO: 2 global + N local crops; the student sees all, the EMA teacher only the global ones; the teacher's output
is centred and sharpened, the student matches it by cross-entropy; the teacher temperature warms up.
The backbone is saved under `encoder.` so finetune.py and analyze.py load it (DINO's EMA teacher: --init_key=teacher).

    python pretrain_contrastive.py                       # CPU: MoCo-v3, cpu-sized ViT, embedded data
    python pretrain_contrastive.py --method=dino --out_dir=out/dino
    torchrun --nproc_per_node=8 pretrain_contrastive.py --model=tiny --img_size=224 --patch_size=16 \
        --data=imagefolder --data_root=/imagenet --epochs=400 --warmup_epochs=40 --batch_size_per_gpu=128 \
        --base_lr=1.5e-4 --head_hidden_dim=4096 --head_out_dim=256     # the paper's MoCo-v3-Tiny recipe
"""
import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import augment
from common import (all_gather_cat, all_reduce_mean, autocast_ctx, check, check_finite, check_ranges, cli, cosine_value,
                    gather_rng_states, make_scaler, param_groups, prepare_out_dir, print0, save_ckpt, seed_everything,
                    set_lr, setup_dist, try_resume, unlock_out_dir, write_log)
from data import Loader, build_dataset
from model import VIT_SIZES, create_vit, vit_heads


# Where MoCo-v3 and DINO differ, each gets its own recipe (MoCo-v3's CPU lr is raised for short runs).
METHOD_DEFAULTS = {
    "mocov3": dict(ema_momentum=0.99, base_lr=1e-3, weight_decay=0.1, clip_grad=0.0),
    "dino": dict(ema_momentum=0.996, base_lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0),
}


@dataclass
class Config:
    method: str = "mocov3"  # mocov3 | dino
    # data
    data: str = "embedded"  # embedded | mnist | fashion-mnist | imagefolder | cifar10 | ... (see README)
    data_root: str = ""  # folder of the data; unused for embedded
    subset: int = 0  # use only the first N training images (0 = all)
    img_size: int = 32  # global view side in pixels; the paper: 224
    num_workers: int = 2  # data-loading processes per GPU
    # model
    model: str = "cpu"  # ViT size: cpu | tiny | small | base
    num_heads: int = 0  # attention heads; 0 = the size's default (cpu 6, tiny/small/base 12 as MAE-Lite's MoCo-v3)
    patch_size: int = 4  # patch side in pixels; the paper: 16
    head_hidden_dim: int = 1024  # MoCo-v3 MLPs: 4096; DINO head: 2048
    head_out_dim: int = 256  # MoCo-v3 embedding: 256; DINO prototypes: 65536
    # method (-1 = the method's default, listed as MoCo-v3 / DINO; each is DINO's or MoCo-v3's own value)
    temperature: float = 0.2  # MoCo-v3 InfoNCE temperature
    ema_momentum: float = -1.0  # teacher EMA momentum at the start, rising to 1 by cosine: 0.99 / 0.996
    local_crops: int = 4  # DINO local crops per image (DINO: 8)
    local_crop_size: int = 16  # DINO local crop side; 96 at 224
    global_crop_min_scale: float = 0.4  # DINO: global crops cover (0.4, 1) of the image, local ones (0.05, 0.4)
    warmup_teacher_temp: float = 0.04  # DINO teacher temperature at the start, warmed up linearly to teacher_temp
    teacher_temp: float = 0.07  # DINO teacher temperature after the warm-up (DINO's ViT recipe: 0.04 -> 0.07)
    teacher_temp_warmup_epochs: int = 3  # DINO: 30 of 300 at full scale
    center_momentum: float = 0.9  # DINO centre EMA
    freeze_last_layer_epochs: int = 1  # DINO keeps the prototypes fixed at first, for stability
    # optimisation
    epochs: int = 10  # the paper: 400 (10 epochs: about 6 min for MoCo-v3, 10 for DINO on 2 CPU cores)
    warmup_epochs: int = 1  # the paper: 40 (DINO: 10)
    batch_size_per_gpu: int = 256  # global batch = this x world size x accum_steps; MoCo-v3-Tiny: 1024
    accum_steps: int = 1  # micro-batches per optimizer step; InfoNCE negatives and BN stats stay per micro-batch
    base_lr: float = -1.0  # lr = base_lr x global batch / 256: 1e-3 (MoCo-v3 paper 1.5e-4; short CPU runs like more) / 5e-4
    weight_decay: float = -1.0  # MoCo-v3 0.1 on all weights / DINO 0.04, not on biases/norms, rising to weight_decay_end
    weight_decay_end: float = -1.0  # cosine target of the weight decay: constant / 0.4
    clip_grad: float = -1.0  # max grad norm, 0 = off: 0 / 3.0
    # run
    out_dir: str = "out/contrastive"  # ckpt.pt, log.jsonl, config.json
    resume: bool = True  # continue from out_dir/ckpt.pt if it exists
    seed: int = 0  # each rank uses seed + rank
    compile: bool = False  # torch.compile the student (CUDA)

    def __post_init__(self):
        check(self.method in ("mocov3", "dino"), f"method must be mocov3 or dino, got {self.method!r}")
        for name, value in METHOD_DEFAULTS[self.method].items():  # -1: the method's own default
            if getattr(self, name) == -1:
                setattr(self, name, value)
        if self.weight_decay_end == -1:  # MoCo-v3: a constant weight decay
            self.weight_decay_end = self.weight_decay
        check_ranges(self, subset=">=0", img_size=">0", num_workers=">=0", num_heads=">=0", patch_size=">0",
                     head_hidden_dim=">0", head_out_dim=">0", temperature=">0", ema_momentum="[0,1)", local_crops=">=0",
                     local_crop_size=">0", global_crop_min_scale="(0,1)", warmup_teacher_temp=">0", teacher_temp=">0",
                     teacher_temp_warmup_epochs=">=0", center_momentum="[0,1]", freeze_last_layer_epochs=">=0",
                     epochs=">0", warmup_epochs=">=0", batch_size_per_gpu=">0", accum_steps=">0", base_lr=">0",
                     weight_decay=">=0", weight_decay_end=">=0", clip_grad=">=0", seed=">=0")
        check(self.warmup_epochs <= self.epochs, f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        check(self.model in VIT_SIZES, f"model must be one of {sorted(VIT_SIZES)}, got {self.model!r}")
        self.num_heads = vit_heads(self.model, self.num_heads)  # resolved, so checkpoints record the real count
        for size in (self.img_size, self.local_crop_size):
            check(size % self.patch_size == 0, f"image size {size} is not divisible by patch_size {self.patch_size}")


# --- augmentation: BYOL-style asymmetric views (MoCo-v3, DINO), on the device, batched (augment.py) ---
def make_views(images, cfg):
    """One uint8 batch -> the list of normalised crops: MoCo-v3's two views (blur 1.0 / 0.1 + solarize 0.2), or
    DINO's two global views plus cfg.local_crops small local ones (blur 0.5)."""
    full = (0.08, 1.0) if cfg.method == "mocov3" else (cfg.global_crop_min_scale, 1.0)
    specs = [(cfg.img_size, full, 1.0, 0.0), (cfg.img_size, full, 0.1, 0.2)]
    specs += [(cfg.local_crop_size, (0.05, cfg.global_crop_min_scale), 0.5, 0.0)] * (cfg.local_crops if cfg.method == "dino" else 0)
    return [augment.normalize(augment.byol_view(augment.random_resized_crop(images, size, scale), blur_p, solarize_p))
            for size, scale, blur_p, solarize_p in specs]


# --- MoCo-v3 ---
def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn):
    """MoCo-v3 MLP: Linear-BN-ReLU between layers; with last_bn, an affine-free BN at the end (projector and, for
    ViTs, the predictor too, as in the official builder and MAE-Lite's mocov3)."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def info_nce(q, k, temperature):
    """q (N, C) against the keys of every rank; the positive of row i is this rank's key i (MoCo-v3 Alg. 1)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    k = all_gather_cat(k)  # (world * N, C): the other ranks' keys are extra negatives
    logits = q @ k.T / temperature
    rank = dist.get_rank() if dist.is_initialized() else 0
    labels = torch.arange(len(q), device=q.device) + len(q) * rank
    return F.cross_entropy(logits, labels) * 2 * temperature  # MoCo-v3 scales by 2T


class MoCo(nn.Module):
    def __init__(self, encoder, hidden_dim, out_dim):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(3, encoder.embed_dim, hidden_dim, out_dim, last_bn=True)
        self.predictor = mlp(2, out_dim, hidden_dim, out_dim, last_bn=True)  # the ViT predictor ends in BN too (MoCo-v3)

    def forward(self, x1, x2, teacher, temperature):
        """Symmetrised loss; `teacher` is the momentum encoder + projector (no predictor), without grads."""
        q1, q2 = (self.predictor(self.projector(self.encoder(x))) for x in (x1, x2))
        with torch.no_grad():
            k1, k2 = (teacher.projector(teacher.encoder(x)) for x in (x1, x2))
        return info_nce(q1, k2, temperature) + info_nce(q2, k1, temperature)


# --- DINO ---
class DINO(nn.Module):
    """encoder + DINO head: 3-layer MLP -> 256-d bottleneck -> L2 norm -> weight-normalised prototypes."""

    def __init__(self, encoder, hidden_dim, out_dim, bottleneck_dim=256):
        super().__init__()
        self.encoder = encoder
        self.mlp = nn.Sequential(nn.Linear(encoder.embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in [*self.mlp, self.last_layer]:
            if isinstance(m, nn.Linear):  # DINO: trunc_normal(0.02), zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, crops):
        """crops: list of (B, C, h, w) batches, same-size crops adjacent. Returns (len(crops) * B, out_dim)."""
        sizes = [c.shape[-1] for c in crops]
        feats, start = [], 0
        for size in dict.fromkeys(sizes):  # one encoder pass per resolution (DINO's multi-crop wrapper)
            n = sizes.count(size)
            feats.append(self.encoder(torch.cat(crops[start:start + n])))
            start += n
        x = F.normalize(self.mlp(torch.cat(feats)), dim=-1)
        # weight norm with g fixed at 1 (DINO's norm_last_layer) = unit-length prototype rows
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


def dino_loss(student_out, teacher_out, center, teacher_temp, student_temp=0.1, n_global=2):
    """Cross-entropy between the sharpened, centred teacher on each global crop and the student on every other crop."""
    s = (student_out / student_temp).chunk(len(student_out) // (len(teacher_out) // n_global))
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(n_global)
    terms = [torch.sum(-tq * F.log_softmax(sv, dim=-1), dim=-1).mean()
             for iq, tq in enumerate(t) for iv, sv in enumerate(s) if iv != iq]
    return sum(terms) / len(terms)


def update_center(center, teacher_out, momentum):
    """EMA of the teacher's mean output over the global batch; subtracting it keeps one prototype from winning."""
    batch_center = all_reduce_mean(teacher_out.mean(dim=0, keepdim=True))
    return center * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m * teacher + (1 - m) * student, matched by parameter name (MoCo's momentum encoder, DINO's teacher)."""
    student_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.mul_(momentum).add_(student_params[name].detach(), alpha=1 - momentum)


def main(cfg):
    # --- setup ---
    rank, world, device = setup_dist()
    master = rank == 0
    seed_everything(cfg.seed + rank)
    if master:
        prepare_out_dir(cfg, __file__)

    # --- data --- (uint8 batches on the device; make_views crops and colours them there)
    dataset, _ = build_dataset(cfg.data, cfg.data_root, True, cfg.subset)
    loader = Loader(dataset, cfg.batch_size_per_gpu, True, cfg.num_workers, device)

    # --- model ---
    encoder = create_vit(cfg.model, cfg.num_heads, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0)
    if cfg.method == "mocov3":
        raw_model = MoCo(encoder, cfg.head_hidden_dim, cfg.head_out_dim)
        teacher = nn.ModuleDict(dict(encoder=copy.deepcopy(raw_model.encoder), projector=copy.deepcopy(raw_model.projector)))
    else:
        raw_model = DINO(encoder, cfg.head_hidden_dim, cfg.head_out_dim)
        teacher = copy.deepcopy(raw_model)
    if world > 1 and device.type == "cuda":  # MoCo-v3 uses SyncBN so the BN statistics span the global batch
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    raw_model.to(device)
    teacher.to(device).requires_grad_(False)  # updated only by EMA
    center = torch.zeros(1, cfg.head_out_dim, device=device)  # DINO

    # --- optimizer & schedule ---
    global_batch = cfg.batch_size_per_gpu * world * cfg.accum_steps
    lr = cfg.base_lr * global_batch / 256
    if cfg.method == "mocov3":  # MoCo-v3 decays every weight
        optimizer = torch.optim.AdamW(raw_model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=lr)
    scaler = make_scaler(device)
    steps_per_epoch = len(loader) // cfg.accum_steps  # optimizer steps; a last incomplete group is skipped
    check(steps_per_epoch > 0, f"{len(loader)} batches per epoch are fewer than accum_steps {cfg.accum_steps}")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    print0(f"{cfg.method}: global batch {global_batch}, lr {lr:.2e}, {steps_per_epoch} steps/epoch")

    # --- resume ---
    ckpt = try_resume(cfg, rank, model=raw_model, teacher=teacher, optimizer=optimizer, scaler=scaler)
    start_epoch, history = 0, []
    if ckpt:
        start_epoch, history = ckpt["epoch"], ckpt["log"]
        center.copy_(ckpt["center"])
    model = DDP(raw_model) if world > 1 else raw_model
    if cfg.compile:
        model = torch.compile(model)

    # --- train loop ---
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        model.train()
        teacher.train()  # MoCo-v3's momentum encoder normalises with batch statistics too
        t0, loss_sum = time.time(), 0.0
        micro_batches = steps_per_epoch * cfg.accum_steps
        for it, (imgs, _) in enumerate(tqdm(loader, disable=not master, desc=f"ep {epoch}", leave=False,
                                            total=micro_batches)):
            if it == micro_batches:
                break
            step, last_micro = epoch * steps_per_epoch + it // cfg.accum_steps, it % cfg.accum_steps == cfg.accum_steps - 1
            lr_now = cosine_value(step, total_steps, warmup_steps, lr)
            set_lr(optimizer, lr_now)
            if cfg.weight_decay_end != cfg.weight_decay:
                for g in optimizer.param_groups:
                    if g["weight_decay"] > 0:
                        g["weight_decay"] = cosine_value(step, total_steps, 0, cfg.weight_decay, cfg.weight_decay_end)
            momentum = 1 - (1 - cfg.ema_momentum) * (math.cos(math.pi * step / total_steps) + 1) / 2  # -> 1
            crops = make_views(imgs, cfg)
            # gradient accumulation: DDP all-reduces only on the last micro-batch of each optimizer step
            with contextlib.nullcontext() if last_micro or world == 1 else model.no_sync():
                with autocast_ctx(device):
                    if cfg.method == "mocov3":
                        loss = model(crops[0], crops[1], teacher, cfg.temperature)
                    else:
                        student_out = model(crops)
                        with torch.no_grad():
                            teacher_out = teacher(crops[:2]).float()
                        warm = cfg.teacher_temp_warmup_epochs * steps_per_epoch
                        t_temp = cfg.teacher_temp if step >= warm else \
                            cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warm
                        loss = dino_loss(student_out.float(), teacher_out, center, t_temp)
                loss_sum += check_finite(loss, epoch, step)
                scaler.scale(loss / cfg.accum_steps).backward()
            if last_micro:
                if cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
                if cfg.method == "dino" and epoch < cfg.freeze_last_layer_epochs:
                    raw_model.last_layer.weight.grad = None
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ema_update(teacher, raw_model, momentum)
            if cfg.method == "dino":
                center = update_center(center, teacher_out, cfg.center_momentum)
        imgs_per_s = steps_per_epoch * global_batch / (time.time() - t0)
        row = dict(epoch=epoch + 1, step=step + 1, loss=loss_sum / micro_batches, lr=lr_now, momentum=momentum,
                   imgs_per_s=imgs_per_s)
        print0(f"ep {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} lr {lr_now:.1e} m {momentum:.4f} {imgs_per_s:.0f} img/s")

        # --- save ---
        rng = gather_rng_states()
        history.append(row)
        if master:  # the log rows travel in the checkpoint: log.jsonl is rewritten from them, never behind
            save_ckpt(dict(model=raw_model.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                           scaler=scaler.state_dict(), center=center, epoch=epoch + 1, step=step + 1,
                           config=asdict(cfg), rng=rng, log=history), os.path.join(cfg.out_dir, "ckpt.pt"))
            write_log(cfg.out_dir, history)
    if master:
        unlock_out_dir(cfg.out_dir)
    return raw_model, teacher


if __name__ == "__main__":
    cli(main, Config)
