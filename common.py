"""Plumbing shared by the stages: errors, distributed setup, config flags, schedule, checkpoints, logs, the out_dir.

Plain functions only; the data path is data.py and augment.py. What a stage is *about* (masking, losses, EMA, the step) stays inline in that stage.
"""
import argparse
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import sys

import torch
import torch.distributed as dist


# --- errors the user can fix: one line from cli(), never a traceback ---
class RunError(Exception):
    """Bad input (a flag's value, a file, the data, the out_dir): reported by cli() as one line naming the way out."""


class BadValue(RunError, ValueError):
    pass


class MissingFile(RunError, FileNotFoundError):
    pass


class BadData(RunError, RuntimeError):
    pass


def cli(main, cls):
    """`python stage.py --flags`: parse the Config, run main; a RunError or a non-finite loss ends in one line, exit 2."""
    cfg = parse_config(cls)
    try:
        main(cfg)
    except (RunError, FloatingPointError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# --- distributed & precision ---
def setup_dist():
    """DDP if and only if torchrun set RANK: nccl on CUDA, gloo on CPU. Returns (rank, world_size, device)."""
    if "RANK" in os.environ:
        device = torch.device("cpu")
        if torch.cuda.is_available():  # pick this process's GPU before NCCL starts, so it never lands on GPU 0
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def autocast_ctx(device):
    """bf16 autocast on CUDA from Ampere on, fp16 before it (with an enabled GradScaler), fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.amp.autocast("cuda", dtype=dtype)


def make_scaler(device):
    # bf16 keeps fp32's exponent range, so loss scaling is only needed for fp16 (pre-Ampere GPUs)
    needed = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=needed)


def all_gather_cat(x):
    """Concatenate x from every rank along dim 0 (no grads: MoCo keys); the identity in one process."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_mean(x):
    """Average x over ranks (DINO center, metrics); the identity in one process."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def all_reduce_sum(x):
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def check_finite(loss, epoch, step):
    """Stop at once on a NaN/inf loss: nothing after it would be worth keeping (the last checkpoint is)."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at epoch {epoch}, step {step}; stopping (try a lower lr)")
    return value


# --- config ---
def _field_comments(cls):
    """Map field name -> trailing '# comment' in the Config source, for --help."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.*)$", src, re.M):
            comments[m.group(1)] = m.group(2)
    return comments


def parse_config(cls, argv=None):
    """Turn a Config dataclass into --field=value flags; bad values end with a message naming the flag."""
    parser = OneLineParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        conv = _parse_bool if f.type is bool else f.type  # int("3.5") fails loudly, as it should
        flag = dict(nargs="?", const=True) if f.type is bool else {}  # a bare --flag means --flag=true
        parser.add_argument(f"--{f.name}", type=conv, default=f.default, metavar=f.type.__name__.upper(),
                            help=f"{comments.get(f.name, '')} (default: {f.default})", **flag)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:
        parser.error(str(e))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not argparse's whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_bool(s):
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def check(cond, msg):
    """Config validation: a ValueError that parse_config turns into a usage error (and cli() into one line)."""
    if not cond:
        raise BadValue(msg)


def check_ranges(cfg, **ranges):
    """Every float flag must be finite; each named flag must lie in its range: "(0,1]", "[0,1)", ">0", ">=0"."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        check(not isinstance(value, float) or math.isfinite(value), f"--{f.name} must be a finite number, got {value}")
    for name, spec in ranges.items():
        v = getattr(cfg, name)
        if spec[0] in "([":
            lo, hi = (float(x) for x in spec[1:-1].split(","))
            ok = (v > lo if spec[0] == "(" else v >= lo) and (v < hi if spec[-1] == ")" else v <= hi)
            check(ok, f"--{name} must be in {spec}, got {v}")
        else:
            bound = float(spec.lstrip(">="))
            check(v >= bound if spec.startswith(">=") else v > bound, f"--{name} must be {spec}, got {v}")


# --- schedule & optimizer groups ---
def cosine_value(step, total_steps, warmup_steps, peak, final=0.0, start=0.0):
    """Linear warm-up from `start` to `peak`, then half-cosine down to `final` (per-iteration, as MAE)."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model, weight_decay, lr_scale=None):
    """AdamW groups: no weight decay on biases, norms, cls_token and pos_embed (timm/MAE); optional lr scale per name."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim == 1 or name.endswith(("cls_token", "pos_embed", "mask_token"))
        scale = lr_scale(name) if lr_scale else 1.0
        g = groups.setdefault((no_wd, scale), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# --- checkpoints, RNG & logs ---
# Fields that may differ when a run resumes (logged); any other difference is another run, refused.
RESUMABLE = ("num_workers", "epochs", "resume", "data_root", "compile", "out_dir")


def save_ckpt(obj, path):
    """Atomic: serialise in memory, write a temporary file unique to this process, fsync, then rename over the old
    one. A crash or a full disk never leaves half a checkpoint, and the previous one stays."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise BadData(f"no space left on device while writing {path} ({len(buf.getbuffer()) / 2**20:.0f} MB); "
                          "the previous checkpoint is kept: free some space and re-run to resume") from None
        raise BadData(f"cannot write {path}: {e.strerror or e}") from None


def load_ckpt(path, what="checkpoint"):
    """torch.load with weights_only=True: a checkpoint is data, never code. Ours are plain dicts; the one class
    allowed beyond that is argparse.Namespace, which facebookresearch/mae stores under 'args'. A missing, empty,
    truncated or foreign file ends in one line naming it."""
    if not os.path.isfile(path):
        raise MissingFile(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a class: say which, never "set weights_only=False"
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise BadData(f"{what} {path} holds a Python object that is not plain data"
                      f" ({found.group(1) if found else 'unknown class'}); it is refused for safety. Re-save its "
                      "tensors as a plain dict (torch.save(state_dict, path))") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, KeyError... for a damaged file
        size = os.path.getsize(path)
        why = "an empty file" if size == 0 else f"{size} bytes, truncated or not a PyTorch checkpoint"
        detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise BadData(f"{what} {path} cannot be read ({why}: {detail}); delete it or point to another file") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states():
    """Every rank's RNG state (a list indexed by rank), so a resumed DDP run continues each rank's stream."""
    if not dist.is_initialized():
        return [rng_state()]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rng_state())
    return out


def restore_rng(states, rank):
    if len(states) <= rank:
        print0(f"resume: checkpoint has RNG state for {len(states)} ranks; rank {rank} keeps its fresh seed")
        return
    s = states[rank]
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def try_resume(cfg, rank, **stateful):
    """If cfg.resume and out_dir/ckpt.pt exists: load each object's state (model=, optimizer=, ...) and this rank's
    RNG, re-derive log.jsonl (and best.pt) from it on the master, and return the checkpoint; otherwise None."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    ckpt = load_ckpt(path, "out_dir's checkpoint")
    for name, obj in stateful.items():
        try:
            obj.load_state_dict(ckpt[name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise BadData(f"{path} does not fit this run's {name} ({str(e).splitlines()[0][:100]}); use another "
                          "--out_dir, or --resume=false to start over") from None
    restore_rng(ckpt["rng"], rank)
    if "log" not in ckpt:  # a checkpoint from before the rows travelled in it: keep the log's rows up to its epoch
        ckpt["log"] = read_log(cfg.out_dir, ckpt["epoch"])
    if rank == 0:
        write_log(cfg.out_dir, ckpt["log"])  # a kill after the checkpoint but before the log loses no row
        best = os.path.join(cfg.out_dir, "best.pt")
        if ckpt.get("best") and (not os.path.exists(best) or load_ckpt(best)["epoch"] != ckpt["best"]["epoch"]):
            save_ckpt(ckpt["best"], best)  # killed between best.pt and ckpt.pt: best.pt follows the checkpoint
    print0(f"resumed from {path} at epoch {ckpt['epoch']}")
    return ckpt


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


_LOCKS = {}  # out_dir -> open lock file held by this process


def lock_out_dir(out_dir):
    """One run per out_dir: an flock on out_dir/.lock held for the process's life (the OS drops it on any exit,
    kill -9 included, so a stale lock never blocks). A second process is refused at once."""
    os.makedirs(out_dir, exist_ok=True)
    key = os.path.realpath(out_dir)
    if key in _LOCKS:  # this process already holds it (distill.py, then pretrain_mae.main; or a notebook re-run)
        return
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"out_dir {out_dir} is in use by {holder}; wait for it to finish, or pass another "
                       "--out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS[key] = f


def unlock_out_dir(out_dir):
    f = _LOCKS.pop(os.path.realpath(out_dir), None)
    if f is not None:
        f.close()  # closing the file releases the flock


def prepare_out_dir(cfg, script_path):
    """Master only, before anything is written: lock the folder; if it holds a checkpoint to resume, refuse a
    different run (one message, every difference, the two ways out); then config.json and a copy of the script."""
    lock_out_dir(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.exists(path):
        saved, new = load_ckpt(path, "out_dir's checkpoint").get("config", {}), dataclasses.asdict(cfg)
        diffs = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}
        allowed = {k: d for k, d in diffs.items() if k in RESUMABLE and not (k == "epochs" and d[1] < d[0])}
        refused = {k: d for k, d in diffs.items() if k not in allowed}
        if refused:
            raise RunError(f"{cfg.out_dir} holds a run with other settings: "
                           + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                           + "; pass another --out_dir, or --resume=false to start over there")
        for k, (a, b) in allowed.items():
            print0(f"resume: {k} changed from {a!r} to {b!r}")
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    shutil.copy(script_path, os.path.join(cfg.out_dir, os.path.basename(script_path)))


def read_log(out_dir, last_epoch):
    rows, path = {}, os.path.join(out_dir, "log.jsonl")
    for line in open(path) if os.path.exists(path) else []:
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if row.get("epoch", 0) <= last_epoch:
                rows[row["epoch"]] = row  # one row per epoch, the last written
    return [rows[e] for e in sorted(rows)]


def write_log(out_dir, rows):
    """log.jsonl rewritten whole from the rows the checkpoint carries: every epoch exactly once, whatever the kill."""
    path = os.path.join(out_dir, "log.jsonl")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)
