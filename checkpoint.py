"""What a run leaves on disk: checkpoints, RNG state, log.jsonl and the out_dir's life cycle.

At any kill point: a checkpoint is written atomically, and log.jsonl (and best.pt) are re-derived from it on resume;
one run per folder (a lock); only the same run, with every flag it knew, resumes; a stage never writes over another
stage's run or its input checkpoint; a run that fails before its first step, or has nothing to train, leaves its folder
as it found it; each epoch's row names the code that trained it.
"""
import argparse
import ast
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
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
import time

import torch
import torch.distributed as dist

import figures
from common import BadData, Interrupted, MissingFile, RunError, print0
from flags import release_notes

# Fields that may differ when a run resumes (logged); any other difference is another run, refused.
RESUMABLE = ("num_workers", "epochs", "resume", "data_root", "compile", "out_dir")
CURVES_EVERY_S = 5  # curves.png at most this often while epochs are shorter (always after the last epoch)


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
    if os.path.isdir(path):  # a run folder for its checkpoint
        inside = os.path.join(path, "ckpt.pt")
        raise MissingFile(f"{what} {path} is a folder, not a file: pass " + (
            f"{inside}" if os.path.isfile(inside) else "a checkpoint's path (a run folder's is FOLDER/ckpt.pt)"))
    if not os.path.isfile(path):
        main_job = os.path.normpath(path) == os.path.join("out", "mae", "ckpt.pt")  # the default of finetune, analyze
        raise MissingFile(f"{what} not found: {path}" + (": run python pretrain_mae.py first (it writes it), or pass "
                                                         "the path of another checkpoint" if main_job else ""))
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


# --- the code that trains a run ---
def code_of(scripts):
    """{"hash": 8 hex digits, "files": {name: sha256}} of the scripts and every project module they import,
    transitively (model.py, common.py, ...): a student's edit anywhere in what runs changes the hash."""
    files, todo = {}, [os.path.abspath(s) for s in scripts]
    while todo:
        path = todo.pop()
        if os.path.basename(path) in files:
            continue
        with open(path, "rb") as f:
            source = f.read()
        files[os.path.basename(path)] = hashlib.sha256(source).hexdigest()
        for node in ast.walk(ast.parse(source)):  # `import x` / `from x import y` of a module beside the script
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            paths = [os.path.join(os.path.dirname(path), name.split(".")[0] + ".py") for name in names]
            todo += [p for p in paths if os.path.isfile(p)]
    digest = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"hash": digest[:8], "files": files}


class Absent:  # a flag the saved config lacks (added by a later release): compared as a value of its own
    def __repr__(self):
        return "(not in its config)"


ABSENT = Absent()


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
            ckpt = run.start(rank, lr_schedule, model=raw_model, ...)  # config.json, script; a resumed run's state
            for epoch in range(run.start_epoch, cfg.epochs): ...; run.save_epoch(row, model=...)

    Ctrl-C says how to resume. active=False (finetune --eval_only) writes nothing."""

    def __init__(self, cfg, rank=0, inputs=(), active=True):
        self.cfg, self.master, self.inputs, self.active = cfg, rank == 0, [p for p in inputs if p], active
        # the stage, by its file's name: run as `python pretrain_mae.py`, its module is `__main__`
        self.stage = os.path.splitext(os.path.basename(sys.modules[type(cfg).__module__].__file__))[0]
        self.dir, self.lock, self.created, self.started = cfg.out_dir, None, False, False
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.start_epoch, self.history = 0, []  # a resumed run's: set by start()
        self.drawn = -math.inf  # when curves.png was last drawn (time.monotonic)
        self.saved, self.longer, self.files = None, None, set()  # set by claim(); the figures output() names
        modules = [sys.modules[klass.__module__] for klass in type(cfg).__mro__[:-1]]
        # the stage's scripts (distill.py: pretrain_mae.py's too), not common.TrainFlags'
        self.scripts = list(dict.fromkeys(m.__file__ for m in modules if hasattr(m, "main")))
        self.code = code_of(self.scripts)

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
        this stage's run with other settings than RESUMABLE. A flag the saved run did not know is another setting."""
        for path in self.inputs:
            if os.path.dirname(os.path.realpath(path)) == os.path.realpath(self.dir):
                raise RunError(f"--out_dir {self.dir} holds {path}, which this run reads; {self.stage}.py would write "
                               "over it: pass another --out_dir")
        saved = self.saved = self.saved_run()
        if saved is not None and stage_of(saved) != self.stage:
            what = f"ckpt.pt, epoch {saved.get('epoch')}" if "epoch" in saved else "config.json"
            raise RunError(f"{self.dir} holds a {stage_of(saved)}.py run ({what}); {self.stage}.py will not write "
                           "over it: pass another --out_dir")
        self.created = not os.path.isdir(self.dir)
        self.lock = lock_out_dir(self.dir)
        if saved is None or "epoch" not in saved or not self.cfg.resume:
            return
        old = saved["config"]
        diffs = {k: (old.get(k, ABSENT), v) for k, v in dataclasses.asdict(self.cfg).items() if old.get(k, ABSENT) != v}
        allowed = {k: d for k, d in diffs.items() if k in RESUMABLE and not (k == "epochs" and d[1] < d[0])}
        refused = {k: d for k, d in diffs.items() if k not in allowed}
        if refused:
            raise RunError(f"{self.dir} holds a {self.stage}.py run with other settings: "
                           + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                           + "; pass another --out_dir, or --resume=false to start that run over (its files are "
                           "replaced)")
        self.longer = allowed.pop("epochs", None)  # said by start(), with what the schedule does
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

    def start(self, rank=0, lr_schedule=None, **stateful):
        """Right before the first step: on resume, load each object's state and this rank's RNG and return the
        checkpoint (else None). Only then does the master write, so a checkpoint that does not fit leaves the folder
        untouched, and a run with nothing left to train writes nothing."""
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
            self.start_epoch, self.history, self.files = ckpt["epoch"], ckpt["log"], set(ckpt.get("files", []))
        self.started = True
        release_notes()  # the run starts: the notes its flags raised (a refused run says only why)
        if not (self.master and self.active):
            return ckpt
        if ckpt is not None:  # a kill after the checkpoint but before the log or best.pt: they follow the checkpoint
            write_log(self.dir, ckpt["log"])
            best = os.path.join(self.dir, "best.pt")
            if ckpt.get("best") and (not os.path.exists(best) or load_ckpt(best)["epoch"] != ckpt["best"]["epoch"]):
                save_ckpt(ckpt["best"], best)
            if ckpt["epoch"] >= self.cfg.epochs:
                print0(self.complete(ckpt))
                return ckpt
        if self.saved is not None and not self.cfg.resume:
            self.remove_earlier_run()
        if ckpt is not None:
            self.code_changed(ckpt)
        write_text(os.path.join(self.dir, "config.json"), json.dumps(dataclasses.asdict(self.cfg), indent=2))
        for script in self.scripts:
            shutil.copy(script, os.path.join(self.dir, os.path.basename(script)))
        if ckpt is not None:
            done = ckpt["epoch"]
            print0(f"resumed from {self.ckpt_path}: epoch {done} of {self.cfg.epochs} done, on from epoch {done + 1}")
            if self.longer and lr_schedule:  # the cosine stretched over the new length: the lr rises again
                (was, now), lr = self.longer, lr_schedule[min(ckpt["step"], len(lr_schedule) - 1)]
                print0(f"resume: epochs changed from {was} to {now}; the schedules are recomputed for {now} epochs, so "
                       f"from epoch {done + 1} the lr goes from {ckpt['log'][-1]['lr']:.1e} (epoch {done}'s last step) "
                       f"to {lr:.1e}, then down the new cosine to {lr_schedule[-1]:.1e} (to start over instead: "
                       "--resume=false, or another --out_dir)")
        return ckpt

    def complete(self, ckpt):
        """What a finished run says when its command is typed again."""
        last = ckpt["log"][-1]
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                            if k not in ("epoch", "step", "imgs_per_s") and isinstance(v, (int, float)))
        code = ckpt.get("code", {}).get("hash", self.code["hash"])
        other = f"; it was trained by code {code}, not this code ({self.code['hash']})" if code != self.code["hash"] \
            else ""
        return (f"{self.ckpt_path} holds a complete run ({ckpt['epoch']} epochs; the last: {numbers}): nothing to "
                f"train{other}; another --out_dir starts a new one")

    def code_changed(self, ckpt):
        """Resumed by other code: say which files changed, keep the earlier script copies, named by the epoch their
        code started at; the log rows' `code` tells which code trained each epoch."""
        before = ckpt.get("code")  # None: saved before runs recorded their code
        if not before or before["hash"] == self.code["hash"]:
            return
        first = ckpt["epoch"]
        for row in reversed(ckpt["log"]):  # back to the first epoch the earlier code trained
            if row.get("code") != before["hash"]:
                break
            first = row["epoch"]
        kept = []
        for script in map(os.path.basename, self.scripts):
            copy = f"{os.path.splitext(script)[0]}.e{first:03d}.py"
            if os.path.exists(os.path.join(self.dir, script)) and not os.path.exists(os.path.join(self.dir, copy)):
                os.replace(os.path.join(self.dir, script), os.path.join(self.dir, copy))
                kept.append(copy)
                self.files.add(copy)
        old, new = before["files"], self.code["files"]
        changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        done = ckpt["epoch"]
        span = f"epoch {done}" if first == done else f"epochs {first}-{done}"
        print0(f"resume: the code changed since epoch {done} ({', '.join(changed)}): code {self.code['hash']} trains "
               f"from epoch {done + 1}, code {before['hash']} trained {span} (log.jsonl's \"code\"); its copy is kept "
               f"as {', '.join(kept) or 'nothing: none was found'}")

    def remove_earlier_run(self):
        """--resume=false: the files the earlier run wrote go (checkpoints, log, config, script copies, the figures it
        recorded), never a file it did not write."""
        names = {"ckpt.pt", "best.pt", "log.jsonl", "config.json", *map(os.path.basename, self.scripts),
                 *self.saved.get("files", [])}
        gone = sorted(name for name in names if os.path.isfile(os.path.join(self.dir, name)))
        for name in gone:
            os.remove(os.path.join(self.dir, name))
        print0(f"resume=false: removed the earlier run's {', '.join(gone)} from {self.dir}; other files are kept")

    def output(self, name):
        """The path of a file the run writes in its folder (a figure), recorded so that --resume=false removes it."""
        self.files.add(name)
        return os.path.join(self.dir, name)

    def save_epoch(self, row, best=None, **state):
        """Collective (every rank calls it). The master writes best.pt, then ckpt.pt (with every row so far), then
        log.jsonl: after a kill in between, resume re-derives the later files. Each row names the code. Then it draws
        the rows as curves.png (figures.run_curves), so every run shows its own loss: after every epoch, or, where
        epochs take under CURVES_EVERY_S, every few epochs and the last (a redraw costs up to half a second: most of a
        667-epoch transfer run on 100 images)."""
        rng = [rng_state()]
        if dist.is_initialized():  # every rank's stream, so a resumed DDP run continues each one
            rng = [None] * dist.get_world_size()
            dist.all_gather_object(rng, rng_state())
        self.history.append(dict(row, code=self.code["hash"]))
        if not self.master:
            return
        curves = self.output("curves.png")  # recorded before the checkpoint: --resume=false removes it
        if best is not None and best["epoch"] == row["epoch"]:
            save_ckpt(best, os.path.join(self.dir, "best.pt"))
        save_ckpt(dict(state, stage=self.stage, epoch=row["epoch"], step=row["step"], log=self.history, rng=rng,
                       config=dataclasses.asdict(self.cfg), code=self.code, files=sorted(self.files),
                       **({"best": best} if best else {})), self.ckpt_path)
        write_log(self.dir, self.history)
        if row["epoch"] >= getattr(self.cfg, "epochs", 0) or time.monotonic() - self.drawn >= CURVES_EVERY_S:
            figures.run_curves(self.stage, self.dir, self.history, dataclasses.asdict(self.cfg), curves)
            self.drawn = time.monotonic()

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
    """Rewritten whole from the checkpoint's rows: every epoch exactly once, whatever the kill; not written when it
    already says that (a finished run typed again)."""
    path, text = os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(row) + "\n" for row in rows)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    write_text(path, text)
