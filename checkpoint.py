"""What a run leaves on disk: checkpoints, RNG state, log.jsonl and the out_dir's life cycle.

At any kill point: a checkpoint is written atomically, and log.jsonl (and best.pt) are re-derived from it on resume;
one run per folder (a lock); only the same run resumes; a stage never writes over another stage's run or its input
checkpoint; a run that fails before its first step leaves its folder as it found it.
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

from common import BadData, Interrupted, MissingFile, RunError, print0

# Fields that may differ when a run resumes (logged); any other difference is another run, refused.
RESUMABLE = ("num_workers", "epochs", "resume", "data_root", "compile", "out_dir")


# --- checkpoint files ---
def save_ckpt(obj, path):
    """torch.save, written atomically (write_atomic)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getbuffer())


def write_atomic(path, data):
    """Bytes to a per-process temp file, fsync, rename: a crash or a full disk never leaves half a file (checkpoint,
    log, config or result), and the previous one stays."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C mid-write
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        if e.errno == errno.ENOSPC:
            raise BadData(f"no space left on device while writing {path} ({len(data) / 2**20:.0f} MB); the "
                          "previous file is kept: free some space and re-run to resume") from None
        raise BadData(f"cannot write {path}: {e.strerror or e}") from None


def load_ckpt(path, what="checkpoint"):
    """weights_only: a checkpoint is data, never code. The one class allowed is argparse.Namespace, which
    facebookresearch/mae stores under 'args'. A bad file ends in one line naming it."""
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
    except Exception as e:  # a damaged file: RuntimeError, EOFError, OSError, ...
        size = os.path.getsize(path)
        why = "an empty file" if size == 0 else f"{size} bytes, truncated or not a PyTorch checkpoint"
        detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise BadData(f"{what} {path} cannot be read ({why}: {detail}); delete it or point to another file") from None


def config_of(ckpt):
    """The config a checkpoint of ours records ({} for timm / MAE / MAE-Lite files)."""
    return ckpt["config"] if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}


# --- RNG ---
def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states, rank):
    if len(states) <= rank:
        print0(f"resume: checkpoint has RNG state for {len(states)} ranks; rank {rank} keeps its fresh seed")
        return
    s = states[rank]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# --- the out_dir ---
def stage_of(saved):
    """The stage that wrote a checkpoint or config.json of ours. Those written by `python <stage>.py` up to bfbdbd2
    say '__main__'; they and those with none are told by their config."""
    if saved.get("stage") not in (None, "", "__main__"):
        return saved["stage"]
    c = saved.get("config") or {}
    return ("distill" if "teacher_ckpt" in c else "pretrain_mae" if "mask_ratio" in c else
            "pretrain_contrastive" if "method" in c else "finetune" if "mode" in c else "unknown")


def lock_out_dir(out_dir):
    """An flock on out_dir/.lock, held while the returned file is open. The OS drops it on any exit, kill -9
    included, so a stale lock never blocks; a second process is refused at once."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunError(f"out_dir {out_dir} is in use by {holder}; wait for it to finish, or pass another "
                           "--out_dir") from None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        f.close()  # its holder removed it as we opened it: lock the new one
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


class RunFolder:
    """The out_dir of one training run, entered by every rank of a stage's main():

        with RunFolder(cfg, rank, inputs=[cfg.init_ckpt]) as run:  # master: lock, refuse to write over
            ...  # data, model, optimizer: nothing written yet
            ckpt = run.start(model=raw_model, optimizer=optimizer)  # config.json, script; a resumed run's state
            for epoch in range(run.start_epoch, cfg.epochs): ...; run.save_epoch(row, model=...)

    Ctrl-C says how to resume. active=False (finetune --eval_only) writes nothing."""

    def __init__(self, cfg, rank=0, inputs=(), active=True):
        self.cfg, self.master, self.inputs, self.active = cfg, rank == 0, [p for p in inputs if p], active
        # the stage, by its file's name: run as `python pretrain_mae.py`, its module is `__main__`
        self.stage = os.path.splitext(os.path.basename(sys.modules[type(cfg).__module__].__file__))[0]
        self.dir, self.lock, self.created, self.started = cfg.out_dir, None, False, False
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.start_epoch, self.history = 0, []  # a resumed run's: set by start()

    def __enter__(self):
        if self.master and self.active:
            try:
                self.claim()
            except BaseException:
                self.__exit__(None, None, None)  # refused: release the lock, leave the folder as it was
                raise
        return self

    def claim(self):
        """Lock, refusing to write over `inputs` (checkpoints this run reads) or another stage's run, or to resume
        this stage's run with other settings than RESUMABLE."""
        for path in self.inputs:
            if os.path.dirname(os.path.realpath(path)) == os.path.realpath(self.dir):
                raise RunError(f"--out_dir {self.dir} holds {path}, which this run reads; {self.stage}.py would write "
                               "over it: pass another --out_dir")
        saved = self.saved_run()
        if saved is not None and stage_of(saved) != self.stage:
            what = f"ckpt.pt, epoch {saved.get('epoch')}" if "epoch" in saved else "config.json"
            raise RunError(f"{self.dir} holds a {stage_of(saved)}.py run ({what}); {self.stage}.py will not write "
                           "over it: pass another --out_dir")
        self.created = not os.path.isdir(self.dir)
        self.lock = lock_out_dir(self.dir)
        if saved is None or "epoch" not in saved or not self.cfg.resume:
            return
        new = dataclasses.asdict(self.cfg)
        diffs = {k: (saved["config"][k], v) for k, v in new.items() if k in saved["config"] and saved["config"][k] != v}
        allowed = {k: d for k, d in diffs.items() if k in RESUMABLE and not (k == "epochs" and d[1] < d[0])}
        refused = {k: d for k, d in diffs.items() if k not in allowed}
        if refused:
            raise RunError(f"{self.dir} holds a {self.stage}.py run with other settings: "
                           + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                           + "; pass another --out_dir, or --resume=false to start that run over (its files are "
                           "replaced)")
        for k, (a, b) in allowed.items():
            print0(f"resume: {k} changed from {a!r} to {b!r}")

    def saved_run(self):
        """What the folder holds: its checkpoint, else the config.json of a run that never finished an epoch."""
        if os.path.exists(self.ckpt_path):
            return load_ckpt(self.ckpt_path, "out_dir's checkpoint")
        config = os.path.join(self.dir, "config.json")
        if os.path.exists(config):
            with open(config) as f, contextlib.suppress(ValueError):
                return {"config": json.load(f)}
        return None

    def start(self, rank=0, **stateful):
        """Right before the first step: on resume, load each object's state and this rank's RNG and return the
        checkpoint (else None). Only then does the master write, so a checkpoint that does not fit leaves the folder
        untouched."""
        ckpt = None
        if self.active and self.cfg.resume and os.path.exists(self.ckpt_path):
            ckpt = load_ckpt(self.ckpt_path, "out_dir's checkpoint")
            for name, obj in stateful.items():
                try:
                    obj.load_state_dict(ckpt[name])
                except (KeyError, RuntimeError, ValueError) as e:
                    raise BadData(f"{self.ckpt_path} does not fit this run's {name} ({str(e).splitlines()[0][:100]});"
                                  " pass another --out_dir, or --resume=false to start that run over (its files are"
                                  " replaced)") from None
            restore_rng(ckpt["rng"], rank)
            self.start_epoch, self.history = ckpt["epoch"], ckpt["log"]
        self.started = True
        if not (self.master and self.active):
            return ckpt
        write_text(os.path.join(self.dir, "config.json"), json.dumps(dataclasses.asdict(self.cfg), indent=2))
        for klass in type(self.cfg).__mro__[:-1]:  # the stage's script (distill.py: pretrain_mae.py's too)
            if hasattr(sys.modules[klass.__module__], "main"):  # a stage, not common.TrainFlags
                script = sys.modules[klass.__module__].__file__
                shutil.copy(script, os.path.join(self.dir, os.path.basename(script)))
        if ckpt is not None:
            write_log(self.dir, ckpt["log"])  # a kill after the checkpoint but before the log loses no row
            best = os.path.join(self.dir, "best.pt")
            if ckpt.get("best") and (not os.path.exists(best) or load_ckpt(best)["epoch"] != ckpt["best"]["epoch"]):
                save_ckpt(ckpt["best"], best)  # killed between best.pt and ckpt.pt: best.pt follows the checkpoint
            done, last = ckpt["epoch"], ckpt["log"][-1]
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "step", "imgs_per_s"))
            print0(f"resumed from {self.ckpt_path}: epoch {done} of {self.cfg.epochs} done, on from epoch {done + 1}"
                   if done < self.cfg.epochs else f"{self.ckpt_path} holds a complete run ({done} epochs; the last: "
                   f"{numbers}): nothing to train; another --out_dir starts a new one")
        return ckpt

    def save_epoch(self, row, best=None, **state):
        """Collective (every rank calls it). The master writes best.pt, then ckpt.pt (with every row so far), then
        log.jsonl: after a kill in between, resume re-derives the later files."""
        rng = [rng_state()]
        if dist.is_initialized():  # every rank's stream, so a resumed DDP run continues each one
            rng = [None] * dist.get_world_size()
            dist.all_gather_object(rng, rng_state())
        self.history.append(row)
        if not self.master:
            return
        if best is not None and best["epoch"] == row["epoch"]:
            save_ckpt(best, os.path.join(self.dir, "best.pt"))
        save_ckpt(dict(state, stage=self.stage, epoch=row["epoch"], step=row["step"], log=self.history, rng=rng,
                       config=dataclasses.asdict(self.cfg), **({"best": best} if best else {})), self.ckpt_path)
        write_log(self.dir, self.history)

    def __exit__(self, kind, error, traceback):
        if self.lock is not None:
            with contextlib.suppress(OSError):  # the file removed while still held, then released: no .lock left
                os.remove(self.lock.name)
            self.lock.close()
            if self.created and not self.started:  # leave no folder behind either
                with contextlib.suppress(OSError):
                    os.rmdir(self.dir)  # only when empty: nothing of anyone else's is removed
        if kind is KeyboardInterrupt and self.master and self.active:
            raise Interrupted(self.resume_note()) from None

    def resume_note(self):
        """Where a run stopped by Ctrl-C stands, and the command that continues it."""
        if not os.path.exists(self.ckpt_path):
            return f"no epoch of {self.cfg.epochs} had ended, nothing was saved: the same command starts the run again"
        done = load_ckpt(self.ckpt_path)["epoch"]
        how = "the same command" if self.cfg.resume else "the same command without --resume=false"
        return f"{self.ckpt_path} holds epoch {done} of {self.cfg.epochs}: {how} resumes from epoch {done + 1}"


def read_log(out_dir):
    """Every epoch's row of log.jsonl (the last, where an epoch appears twice)."""
    rows, path = {}, os.path.join(out_dir, "log.jsonl")
    for line in open(path) if os.path.exists(path) else []:
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def write_text(path, text):
    write_atomic(path, text.encode())


def write_log(out_dir, rows):
    """Rewritten whole from the checkpoint's rows: every epoch exactly once, whatever the kill."""
    write_text(os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
