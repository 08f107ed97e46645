r"""Contrastive / self-distillation pre-training of the shared ViT: MoCo-v3 and DINO (PAPER §2.2, §2.4).

MoCo-v3: InfoNCE of a view's query against the other's momentum key. DINO: from every crop, the student matches the
EMA teacher's centred, sharpened output on the 2 global crops. Each is a `Method`: the loop has no method branch.

    python pretrain_contrastive.py                       # CPU: MoCo-v3, cpu-sized ViT, embedded data
    python pretrain_contrastive.py --method=dino --out_dir=out/dino   # DINO at the setting that learns on a CPU
    torchrun --nproc_per_node=8 pretrain_contrastive.py --model=tiny --img_size=224 --patch_size=16 \
        --data=imagefolder --data_root=/imagenet --epochs=400 --warmup_epochs=40 --batch_size_per_gpu=128 \
        --base_lr=1.5e-4 --head_hidden_dim=4096 --head_out_dim=256     # the paper's MoCo-v3-Tiny recipe
"""
import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import augment
from checkpoint import RunFolder
from common import (EpochSteps, all_gather_cat, all_reduce_mean, autocast_ctx, check_finite, cosine_schedule,
                    epoch_line, make_scaler, optimizer_step, param_groups, print0, seed_everything, set_lr, setup_dist,
                    steps_in_epoch, wrap)
from data import Loader, build_dataset
from flags import TrainFlags, check, check_config, cli
from model import create_vit, vit_heads

STUDENT_TEMP = 0.1  # DINO's student temperature


@dataclass
class Config(TrainFlags):  # + the data and run flags every training stage shares
    method: str = "mocov3"  # mocov3 | dino (METHODS); the flags shown as "MoCo-v3 x / DINO y" take its value
    img_size: int = 32  # global view side in pixels; the paper: 224
    model: str = "cpu"  # ViT size: micro | mini | cpu | tiny | small | base
    num_heads: int = 0  # attention heads; 0 = the size's default (cpu 6, tiny/small/base 12 as MAE-Lite's MoCo-v3)
    head_hidden_dim: int = None  # MoCo-v3's MLPs (the paper: 4096) / DINO's head MLP (DINO: 2048)
    head_out_dim: int = None  # MoCo-v3's embedding / DINO's prototypes (DINO's ViT recipe: 65536)
    ema_momentum: float = None  # teacher EMA momentum at the start, rising to 1 by cosine (DINO's recipe: 0.996)
    base_lr: float = None  # lr = base_lr x global batch / 256 (MoCo-v3 paper: 1.5e-4; short CPU runs like more)
    weight_decay: float = None  # MoCo-v3 decays every weight; DINO not biases/norms, and rises to weight_decay_end
    weight_decay_end: float = None  # cosine target of the weight decay (MoCo-v3: constant)
    clip_grad: float = None  # max gradient norm (DINO: of each parameter, as its clip_gradients); 0 = off
    temperature: float = 0.2  # MoCo-v3 InfoNCE temperature
    local_crops: int = 4  # DINO local crops per image (DINO: 8)
    local_crop_size: int = 0  # DINO's local crop side; 0 = half the image side in whole patches (DINO: 96 at 224)
    global_crop_min_scale: float = 0.4  # DINO: global crops cover (0.4, 1) of the image, local ones (0.05, 0.4)
    warmup_teacher_temp: float = 0.04  # DINO teacher temperature at the start, warmed up linearly to teacher_temp
    teacher_temp: float = 0.07  # DINO teacher temperature after the warm-up (DINO's ViT recipe: 0.04 -> 0.07)
    teacher_temp_warmup_epochs: int = 3  # DINO: 30 of 300 at full scale
    center_momentum: float = 0.9  # DINO centre EMA
    freeze_last_layer_epochs: int = 1  # DINO keeps the prototypes fixed at first, for stability
    epochs: int = 10  # the paper: 400 (10 epochs on 2 CPU cores: about 10 min for MoCo-v3, 40 for DINO)
    warmup_epochs: int = 1  # the paper: 40 (DINO: 10)
    batch_size_per_gpu: int = None  # global batch = this x world size x accum_steps; MoCo-v3-Tiny, DINO: 1024
    out_dir: str = "out/contrastive"  # ckpt.pt, log.jsonl, config.json

    @classmethod
    def shown_default(cls, name):  # --help: each method's own value, "MoCo-v3 0.001 / DINO 0.0005"
        return " / ".join(f"{m.title} {'constant' if m.defaults[name] is None else m.defaults[name]}"
                          for m in METHODS.values() if name in m.defaults) or None

    def __post_init__(self):
        check(self.method in METHODS, f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name, value in METHODS[self.method].defaults.items():  # unset: the method's own value
            setattr(self, name, value if getattr(self, name) is None else getattr(self, name))
        self.weight_decay_end = self.weight_decay if self.weight_decay_end is None else self.weight_decay_end
        check_config(self, ">=0", head_hidden_dim=">0", head_out_dim=">0", temperature=">0", ema_momentum="[0,1)",
                     global_crop_min_scale="(0,1)", warmup_teacher_temp=">0", teacher_temp=">0",
                     center_momentum="[0,1]")  # every other number >= 0
        self.num_heads = vit_heads(self.model, self.num_heads)  # resolved, so checkpoints record the real count
        if not self.local_crop_size:  # resolved too: 16 at 32 px with 4-px patches, 14 at 28 px with 7-px ones
            self.local_crop_size = max(self.patch_size, self.img_size // 2 // self.patch_size * self.patch_size)


def views(cfg):  # what the loader cuts: (side, crop scale range) of each of the method's views
    return [(size, scale) for size, scale, *_ in METHODS[cfg.method].view_specs(cfg)]


def make_views(crops, cfg):  # BYOL's views on the device: the loader's crop k, flipped, then colour (augment.py)
    return [augment.normalize(augment.byol_view(augment.random_flip(crops[k]), blur, sol))
            for k, (_, _, blur, sol) in enumerate(METHODS[cfg.method].view_specs(cfg))]


class Method(nn.Module):
    """What the train loop asks of the student: forward(views, teacher, step) -> (loss, {name: 0-d tensor}) and the
    parts below where it differs; `title` names it in --help, `defaults` fill the Config fields it uses left at None."""
    title, defaults = "", {}

    def make_teacher(self):  # an EMA copy of (part of) the student; None: no teacher, no EMA, no momentum logged
        return None

    def param_groups(self):  # no weight decay on biases and norms (DINO's get_params_groups)
        return param_groups(self, self.cfg.weight_decay)

    @staticmethod
    def view_specs(cfg, scale=(0.08, 1.0)):  # BYOL's asymmetric pair: (side, crop scale, blur p, solarize p)
        return [(cfg.img_size, scale, 1.0, 0.0), (cfg.img_size, scale, 0.1, 0.2)]

    def schedule(self, total_steps, steps_per_epoch):
        """The method's own per-step schedules, built once."""

    def before_step(self, epoch):  # the unscaled gradients, before the optimizer steps: --clip_grad on the total norm
        if self.cfg.clip_grad:  # None: a method without a default
            nn.utils.clip_grad_norm_(self.parameters(), self.cfg.clip_grad)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m * teacher + (1 - m) * student, matched by parameter name (MoCo's momentum encoder, DINO's)."""
    student_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.mul_(momentum).add_(student_params[name].detach(), alpha=1 - momentum)


# --- MoCo-v3 ---
def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn):
    """MoCo-v3 MLP: Linear-BN-ReLU between layers, an affine-free BN at the end with last_bn (the official builder)."""
    dims, layers = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim], []
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        between = [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)] if i < num_layers - 1 else []
        layers += [nn.Linear(d_in, d_out, bias=False)] + between
    return nn.Sequential(*layers, *([nn.BatchNorm1d(out_dim, affine=False)] if last_bn else []))


def info_nce(q, k, temperature):
    """q (N, C) against the keys of every rank; the positive of row i is this rank's key i (MoCo-v3 Alg. 1)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    k = all_gather_cat(k)  # (world * N, C): the other ranks' keys are extra negatives
    logits = q @ k.T / temperature
    rank = dist.get_rank() if dist.is_initialized() else 0
    labels = torch.arange(len(q), device=q.device) + len(q) * rank
    return F.cross_entropy(logits, labels) * 2 * temperature  # MoCo-v3 scales by 2T


class MoCoV3(Method):  # MoCo-v3's own code clips nothing (--clip_grad 0); its lr raised for short CPU runs
    title, defaults = "MoCo-v3", dict(ema_momentum=0.99, base_lr=1e-3, weight_decay=0.1, weight_decay_end=None,
                                      clip_grad=0.0, head_hidden_dim=1024, head_out_dim=256, batch_size_per_gpu=256)

    def __init__(self, encoder, cfg):
        super().__init__()
        self.cfg, self.encoder = cfg, encoder
        self.projector = mlp(3, encoder.embed_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=True)
        self.predictor = mlp(2, cfg.head_out_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=True)  # BN: ViTs

    def make_teacher(self):  # the momentum encoder + projector (no predictor)
        return nn.ModuleDict(dict(encoder=copy.deepcopy(self.encoder), projector=copy.deepcopy(self.projector)))

    def param_groups(self):  # MoCo-v3 decays every weight
        return [{"params": list(self.parameters()), "weight_decay": self.cfg.weight_decay}]

    def forward(self, crops, teacher, step):
        """Symmetrised InfoNCE; the teacher runs without grads."""
        q1, q2 = (self.predictor(self.projector(self.encoder(x))) for x in crops)
        with torch.no_grad():
            k1, k2 = (teacher.projector(teacher.encoder(x)) for x in crops)
        return info_nce(q1, k2, self.cfg.temperature) + info_nce(q2, k1, self.cfg.temperature), {}


# --- DINO ---
def dino_loss(student_out, targets, n_global=2):
    """Cross-entropy between the teacher's targets on each global crop and the student on every other crop."""
    s = (student_out / STUDENT_TEMP).chunk(len(student_out) // (len(targets) // n_global))
    terms = [torch.sum(-tq * F.log_softmax(sv, dim=-1), dim=-1).mean()
             for iq, tq in enumerate(targets.chunk(n_global)) for iv, sv in enumerate(s) if iv != iq]
    return sum(terms) / len(terms)


class DINO(Method):
    """encoder + head: 3-layer MLP -> 256-d bottleneck -> L2 norm -> weight-normalised prototypes; centre: a buffer.
    Its defaults: DINO's recipe where it learns at CPU scale (at DINO's own batch and size its output goes uniform)."""
    title, defaults = "DINO", dict(ema_momentum=0.99, base_lr=5e-4, weight_decay=0.04, weight_decay_end=0.4,
                                   clip_grad=3.0, head_hidden_dim=1024, head_out_dim=4096, batch_size_per_gpu=64)

    def __init__(self, encoder, cfg, bottleneck_dim=256):
        super().__init__()
        self.cfg, self.encoder, hidden = cfg, encoder, cfg.head_hidden_dim
        self.mlp = nn.Sequential(nn.Linear(encoder.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck_dim))
        self.last_layer = nn.Linear(bottleneck_dim, cfg.head_out_dim, bias=False)
        for m in [*self.mlp[::2], self.last_layer]:  # the Linear layers, DINO's way: trunc_normal(0.02), zero bias
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        self.register_buffer("center", torch.zeros(1, cfg.head_out_dim))
        self.teacher_temps = []  # per step, set by schedule()

    def make_teacher(self):  # the whole student, heads included
        return copy.deepcopy(self)

    def schedule(self, total_steps, steps_per_epoch):  # the teacher temperature: linear warm-up, then constant
        c = self.cfg
        self.teacher_temps = cosine_schedule(total_steps, c.teacher_temp_warmup_epochs * steps_per_epoch,
                                             c.teacher_temp, c.teacher_temp, start=c.warmup_teacher_temp)

    @staticmethod
    def view_specs(c):  # MoCo-v3's pair at their own scale, then the small local crops (blur 0.5)
        local = [(c.local_crop_size, (0.05, c.global_crop_min_scale), 0.5, 0.0)] * c.local_crops
        return Method.view_specs(c, (c.global_crop_min_scale, 1.0)) + local

    def embed(self, crops):
        """crops: list of (B, C, h, w) batches, same-size crops adjacent. Returns (len(crops) * B, out_dim)."""
        feats = [self.encoder(torch.cat(list(same)))  # one encoder pass per resolution (DINO's multi-crop wrapper)
                 for _, same in itertools.groupby(crops, key=lambda c: c.shape[-1])]
        x = F.normalize(self.mlp(torch.cat(feats)), dim=-1)
        # weight norm with g fixed at 1 (DINO's norm_last_layer) = unit-length prototype rows
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))

    def forward(self, crops, teacher, step):
        """The student sees every crop, the teacher the global ones; then the centre follows the teacher."""
        student_out = self.embed(crops)
        with torch.no_grad():
            teacher_out = teacher.embed(crops[:2]).float()
        t = F.softmax((teacher_out - self.center) / self.teacher_temps[step], dim=-1)  # (2B, K) centred, sharpened
        loss = dino_loss(student_out.float(), t)
        with torch.no_grad():  # collapse shows here, as in DINO's paper: entropy ln K = uniform, 0 = one prototype
            s = F.log_softmax(student_out[:len(t)].float() / STUDENT_TEMP, dim=-1)  # the student, same crops
            logs = dict(teacher_entropy=torch.special.entr(t).sum(-1).mean(),
                        teacher_student_kl=(torch.special.xlogy(t, t) - t * s).sum(-1).mean())
        # centre <- EMA of the teacher's mean over the global batch (subtracting it keeps one prototype from winning)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(all_reduce_mean(teacher_out.mean(dim=0, keepdim=True)) * (1 - m))
        return loss, logs

    def before_step(self, epoch):
        for p in self.parameters():  # DINO's clip_gradients: each by its own norm (one large one shrinks no other)
            if p.grad is not None and self.cfg.clip_grad > 0:
                p.grad.mul_((self.cfg.clip_grad / (p.grad.norm(2) + 1e-6)).clamp(max=1.0))
        if epoch < self.cfg.freeze_last_layer_epochs:  # DINO keeps the prototypes fixed for the first epochs
            self.last_layer.weight.grad = None


METHODS = {"mocov3": MoCoV3, "dino": DINO}


def main(cfg):
    # --- setup ---
    rank, world, device = setup_dist()
    seed_everything(cfg.seed + rank)
    with RunFolder(cfg, rank) as run:

        # --- data --- (batches cut to the method's views; flips and colour on the device, batched)
        dataset, _ = build_dataset(cfg.data, cfg.data_root, True, cfg.subset, cfg.classes)
        loader = Loader(dataset, cfg.batch_size_per_gpu, True, cfg.num_workers, device, views(cfg))

        # --- model ---
        encoder = create_vit(cfg.model, cfg.num_heads, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0)
        raw_model = METHODS[cfg.method](encoder, cfg).to(device)
        if world > 1 and device.type == "cuda":  # MoCo-v3 uses SyncBN so the BN statistics span the global batch
            raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)  # and so does its teacher, a copy
        teacher = raw_model.make_teacher()  # updated only by EMA; None for a method without one
        # both stay in train mode (nothing here calls eval()): MoCo-v3's key encoder normalises by batch statistics
        ema = {} if teacher is None else {"teacher": teacher.requires_grad_(False)}  # saved and restored

        # --- optimizer & schedule ---
        global_batch = cfg.batch_size_per_gpu * world * cfg.accum_steps
        lr = cfg.base_lr * global_batch / 256
        optimizer = torch.optim.AdamW(raw_model.param_groups(), lr=lr)
        scaler = make_scaler(device)
        steps_per_epoch = steps_in_epoch(loader, cfg.accum_steps)
        total_steps = cfg.epochs * steps_per_epoch
        lr_schedule = cosine_schedule(total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        wd_schedule = cosine_schedule(total_steps, 0, cfg.weight_decay, cfg.weight_decay_end)
        # EMA momentum: up to 1 by a half cosine, as MoCo-v3 / DINO write it (cosine_schedule differs in the last bit)
        momentum = {"momentum": [1 - (1 - cfg.ema_momentum) * (math.cos(math.pi * s / total_steps) + 1) / 2
                                 for s in range(total_steps)]} if ema else {}
        raw_model.schedule(total_steps, steps_per_epoch)  # the method's own schedules (DINO's teacher temperature)
        print0(f"{cfg.method}: global batch {global_batch}, lr {lr:.2e}, {steps_per_epoch} steps/epoch")

        # --- resume ---
        run.start(rank, lr_schedule, model=raw_model, **ema, optimizer=optimizer, scaler=scaler)
        model = wrap(raw_model, world, cfg.compile)

        # --- train loop ---
        for epoch in range(run.start_epoch, cfg.epochs):
            steps = EpochSteps(loader, epoch, steps_per_epoch, cfg, model)
            for step, sync, (crops, _) in steps:
                set_lr(optimizer, lr_schedule[step], wd_schedule[step])
                with autocast_ctx(device):
                    loss, extra = model(make_views(crops, cfg), teacher, step)
                steps.add(loss=check_finite(loss, epoch, step), **{k: v.item() for k, v in extra.items()})
                scaler.scale(loss / cfg.accum_steps).backward()
                if sync:
                    optimizer_step(optimizer, scaler, before_step=lambda: raw_model.before_step(epoch))
                    if ema:
                        ema_update(teacher, raw_model, momentum["momentum"][step])
            row = steps.row(global_batch, lr=lr_schedule, **momentum)

            # --- save --- (the backbone under `encoder.`, the teacher's too)
            run.save_epoch(row, model=raw_model.state_dict(), **{k: v.state_dict() for k, v in ema.items()},
                           optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
            print0(epoch_line(row, cfg.epochs))  # once saved: a Ctrl-C after this line loses no epoch
    return raw_model, teacher


if __name__ == "__main__":
    cli(main, Config)
