"""Plumbing for what a run leaves on disk: checkpoints, RNG state, log.jsonl and the out_dir's life cycle.

What holds at any kill point: a checkpoint is written atomically, and log.jsonl (and best.pt) are re-derived from it
on resume; one run per folder (a lock); only the same run resumes; a stage never writes over another stage's run
or over the checkpoint it was given to start from; a run that fails before its first step leaves its folder as it
found it.
"""
import argparse
import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys

import torch
import torch.distributed as dist

from common import BadData, MissingFile, RunError, print0

# Fields that may differ when a run resumes (logged); any other difference is another run, refused.
RESUMABLE = ("num_workers", "epochs", "resume", "data_root", "compile", "out_dir")


# --- checkpoint files ---
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
    with open(path, "rb") as f:
        head = f.read(8)
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip; old torch a pickle
        kind = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"{": "a JSON file"}
        found = next((v for k, v in kind.items() if head.startswith(k)), "not a PyTorch checkpoint")
        raise BadData(f"{what} {path} is not a checkpoint ({found}); pass a .pt / .pth file written by torch.save")
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


def config_of(ckpt):
    """The config a checkpoint of ours records ({} for timm / MAE / MAE-Lite files)."""
    return ckpt["config"] if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}


# --- RNG: every rank's stream travels in the checkpoint ---
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


# --- the out_dir: lock, config check, resume, end of epoch ---
_LOCKS = {}  # out_dir -> (open lock file, whether this process created the folder)


def lock_out_dir(out_dir):
    """One run per out_dir: an flock on out_dir/.lock held for the process's life (the OS drops it on any exit,
    kill -9 included, so a stale lock never blocks). A second process is refused at once."""
    key = os.path.realpath(out_dir)
    if key in _LOCKS:  # this process already holds it (distill.py, then pretrain_mae.main; or a notebook re-run)
        return
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
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
    _LOCKS[key] = (f, created)


def unlock_out_dir(out_dir, discard=False):
    """Release the folder. discard=True (a run that failed before its first step): leave it as it was found, i.e.
    remove the lock file, and the folder too if this run created it."""
    f, created = _LOCKS.pop(os.path.realpath(out_dir), (None, False))
    if f is None:
        return
    f.close()  # closing the file releases the flock
    if discard and not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out_dir, ".lock"))
            if created:
                os.rmdir(out_dir)  # only when empty: nothing of anyone else's is removed


def discard_unstarted_runs():
    """cli()'s clean-up after a failure: every folder this process locked is released as it was found."""
    for key in list(_LOCKS):
        unlock_out_dir(key, discard=True)


def stage_of(ckpt):
    """Which stage wrote a checkpoint of ours ('stage' key; older ones are recognised by their config)."""
    if ckpt.get("stage"):
        return ckpt["stage"]
    c = ckpt.get("config") or {}
    return ("distill" if "teacher_ckpt" in c else "pretrain_mae" if "mask_ratio" in c else
            "pretrain_contrastive" if "method" in c else "finetune" if "mode" in c else "unknown")


def prepare_out_dir(cfg, inputs=()):
    """Master only, before anything is written: lock the folder; refuse to write over `inputs` (the checkpoints
    this run reads) or over another stage's run; if it holds a checkpoint to resume, refuse a different run (one
    message, every difference, the two ways out). Nothing is written here: config.json comes with the first step."""
    stage = type(cfg).__module__
    for path in inputs:
        if path and os.path.dirname(os.path.realpath(path)) == os.path.realpath(cfg.out_dir):
            raise RunError(f"--out_dir {cfg.out_dir} holds {path}, which this run reads; {stage}.py would write "
                           "over it: pass another --out_dir")
    lock_out_dir(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return
    ckpt = load_ckpt(path, "out_dir's checkpoint")
    if stage_of(ckpt) != stage:
        unlock_out_dir(cfg.out_dir)
        raise RunError(f"{cfg.out_dir} holds a {stage_of(ckpt)}.py run (ckpt.pt, epoch {ckpt.get('epoch')}); "
                       f"{stage}.py will not write over it: pass another --out_dir")
    if cfg.resume:
        saved, new = ckpt.get("config", {}), dataclasses.asdict(cfg)
        diffs = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}
        allowed = {k: d for k, d in diffs.items() if k in RESUMABLE and not (k == "epochs" and d[1] < d[0])}
        refused = {k: d for k, d in diffs.items() if k not in allowed}
        if refused:
            raise RunError(f"{cfg.out_dir} holds a {stage}.py run with other settings: "
                           + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                           + "; pass another --out_dir, or --resume=false to start over there")
        for k, (a, b) in allowed.items():
            print0(f"resume: {k} changed from {a!r} to {b!r}")


def describe_run(cfg):
    """config.json and a copy of the stage's script (distill.py keeps pretrain_mae.py's copy beside its own)."""
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    for klass in type(cfg).__mro__[:-1]:
        script = sys.modules[klass.__module__].__file__
        shutil.copy(script, os.path.join(cfg.out_dir, os.path.basename(script)))


def start_run(cfg, rank, **stateful):
    """Right before the first step: the master writes config.json and the script. Then, if cfg.resume and
    out_dir/ckpt.pt exists: load each object's state (model=, optimizer=, ...) and this rank's RNG, re-derive
    log.jsonl (and best.pt) from it on the master, and return the checkpoint; otherwise None."""
    if rank == 0:
        describe_run(cfg)
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


def save_epoch(cfg, history, row, best=None, **state):
    """The end of an epoch; collective (every rank calls it). The master writes best.pt (when given), then ckpt.pt
    (the state, this epoch's row appended to every earlier one, each rank's RNG, and `best`), then log.jsonl
    rewritten from those rows: after a kill anywhere in between, resume re-derives the later files."""
    rng = gather_rng_states()
    history.append(row)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if best is not None and best["epoch"] == row["epoch"]:
        save_ckpt(best, os.path.join(cfg.out_dir, "best.pt"))
    save_ckpt(dict(state, stage=type(cfg).__module__, epoch=row["epoch"], step=row["step"],
                   config=dataclasses.asdict(cfg), rng=rng, log=history, **({"best": best} if best else {})),
              os.path.join(cfg.out_dir, "ckpt.pt"))
    write_log(cfg.out_dir, history)


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
