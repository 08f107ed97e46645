"""Plumbing shared by the stages: errors, DDP and precision, schedules, the steps of an epoch. What a stage is *about*
(masking, losses, EMA, the step) stays inline in that stage.
"""
import contextlib
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm


# --- errors the user can fix ---
class RunError(Exception):
    """Bad input (flag, file, data, out_dir): cli() prints one line naming the way out, never a traceback."""


class BadValue(RunError, ValueError):
    pass


class MissingFile(RunError, FileNotFoundError):
    pass


class BadData(RunError, RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where the run stood and how to resume (checkpoint.RunFolder adds that)."""


# --- distributed & precision ---
def setup_dist():
    """DDP iff torchrun set RANK. Returns (rank, world_size, device)."""
    if "RANK" in os.environ:
        device = torch.device("cpu")
        if torch.cuda.is_available():  # before NCCL starts, or every rank lands on GPU 0
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def autocast_ctx(device):
    """bf16 on Ampere and later, fp16 before (with make_scaler's GradScaler), fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.amp.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def make_scaler(device):
    # bf16 has fp32's exponent range: only fp16 needs loss scaling
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())


def all_gather_cat(x):
    """Concatenate x over ranks on dim 0 (no grads: MoCo keys)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_sum(x):
    """Sum x over ranks (metrics)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Average x over ranks (DINO's centre)."""
    return all_reduce_sum(x) / (dist.get_world_size() if dist.is_initialized() else 1)


def check_finite(loss, epoch, step):
    """Stop on a NaN/inf loss: nothing after it is worth keeping (the last checkpoint is)."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at epoch {epoch}, step {step}; stopping (try a lower lr)")
    return value


# --- schedules & optimizer groups ---
def cosine_schedule(total_steps, warmup_steps, peak, final=0.0, start=0.0):
    """One value per optimizer step (DINO's schedule arrays; per iteration, as MAE): linear warm-up from `start` to
    `peak`, then a half-cosine to `final`."""
    out = []
    for step in range(total_steps):
        if step < warmup_steps:
            out.append(start + (peak - start) * step / warmup_steps)
        else:
            t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            out.append(final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    return out


def param_groups(model, weight_decay, lr_scale=None):
    """AdamW groups: no weight decay on biases, norms and tokens (timm/MAE); optional per-name lr scale."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim == 1 or name.endswith(("cls_token", "pos_embed", "mask_token"))
        scale = lr_scale(name) if lr_scale else 1.0
        g = groups.setdefault((no_wd, scale), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": scale, "decays": not no_wd})
        g["params"].append(p)
    return list(groups.values())


def set_lr(optimizer, lr, weight_decay=None):
    """This step's lr (x a group's lr_scale) and, if scheduled, weight decay of the decaying groups (not biases, norms,
    tokens), even from 0."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None and g.get("decays", True):
            g["weight_decay"] = weight_decay


def optimizer_step(optimizer, scaler, model=None, clip_grad=0.0, before_step=None):
    """Unscale, clip the total norm (0 = off), let before_step edit the gradients (the contrastive methods' clip and
    DINO's frozen last layer), step (the scaler is a no-op without fp16), zero the gradients."""
    if clip_grad > 0 or before_step:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if before_step:
        before_step()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# --- the steps of an epoch ---
def steps_in_epoch(loader, accum_steps):
    """Optimizer steps per epoch: an incomplete last group of micro-batches is skipped."""
    if len(loader) < accum_steps:
        raise BadValue(f"{len(loader)} batches per epoch are fewer than accum_steps {accum_steps}")
    return len(loader) // accum_steps


class EpochSteps:
    """One epoch as (step, sync, batch): `step` counts optimizer steps over the run; `sync` marks each step's last
    micro-batch, where the optimizer steps and DDP all-reduces (nanoGPT's require_backward_grad_sync). An incomplete
    last group is skipped."""

    def __init__(self, loader, epoch, steps_per_epoch, cfg, model=None):
        self.loader, self.epoch, self.steps_per_epoch, self.accum = loader, epoch, steps_per_epoch, cfg.accum_steps
        self.sums, self.start, self.last_step = {}, time.time(), None
        model = getattr(model, "_orig_mod", model)  # under torch.compile: the module it wraps
        self.ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        master = not dist.is_initialized() or dist.get_rank() == 0
        self.bar = tqdm(total=steps_per_epoch * self.accum, desc=f"ep {epoch + 1}/{cfg.epochs}", leave=False,
                        disable=not (master and sys.stderr.isatty()))

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        for it, batch in enumerate(self.loader):
            if it == self.steps_per_epoch * self.accum:
                break
            sync = it % self.accum == self.accum - 1
            if self.ddp is not None:
                self.ddp.require_backward_grad_sync = sync  # what DDP's no_sync() sets
            self.last_step = self.epoch * self.steps_per_epoch + it // self.accum  # the epoch's row reads it
            yield self.last_step, sync, batch
            self.bar.update()
        self.bar.close()

    def show(self, text):
        self.bar.set_postfix_str(text)

    def add(self, **numbers):
        """Accumulate per-micro-batch numbers (the loss, the method's parts) for the epoch means."""
        for k, v in numbers.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def row(self, global_batch, **schedules):
        """The epoch's log row: means of add()'s numbers, each schedule (lr=, momentum=) at its last step, img/s."""
        means = {k: v / (self.steps_per_epoch * self.accum) for k, v in self.sums.items()}
        return dict(epoch=self.epoch + 1, step=self.last_step + 1, loss=means.pop("loss"),
                    **{k: v[self.last_step] for k, v in schedules.items()},
                    imgs_per_s=self.steps_per_epoch * global_batch / (time.time() - self.start), **means)


def epoch_line(row, epochs):
    """Console line: ep 3/20 loss 0.5246 [the method's parts] lr 1.5e-03 [m 0.9990] 455 img/s."""
    parts = "".join(f"{k} {v:.4f} " for k, v in row.items() if k not in ("epoch", "step", "loss", "lr", "momentum",
                                                                          "imgs_per_s"))
    momentum = f"m {row['momentum']:.4f} " if "momentum" in row else ""
    return (f"ep {row['epoch']}/{epochs} loss {row['loss']:.4f} {parts}lr {row['lr']:.1e} {momentum}"
            f"{row['imgs_per_s']:.0f} img/s")


def wrap(raw_model, world, compile_):
    """The model the train loop calls (DDP, then torch.compile); raw_model stays unwrapped for the optimizer, EMA,
    saving and eval."""
    model = torch.nn.parallel.DistributedDataParallel(raw_model) if world > 1 else raw_model
    return torch.compile(model) if compile_ else model
