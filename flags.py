"""A stage's Config dataclass is its command line: each field a --field=value flag, its trailing comment the --help.
"""
import argparse
import contextlib
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys

from common import BadValue, RunError
from model import VIT_SIZES, vit_heads


def cli(main, cls):
    """Parse the Config, run main. Bad input or a non-finite loss: one line, exit 2, never a traceback; Ctrl-C: one
    line saying how to resume, exit 130. Notes wait until the run starts (release_notes): a run refused for its
    flags or its input says only why."""
    HELD.append([])
    cfg = parse_config(cls)
    prog = os.path.basename(sys.argv[0])
    try:
        main(cfg)
        release_notes()  # a stage without a run folder
    except (RunError, FloatingPointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal
            print(f"\n{prog}: stopped by Ctrl-C" + (f"; {e}" if str(e) else ""), file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # `... --plan | head`: stop quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


@dataclasses.dataclass
class TrainFlags:
    """Flags every training stage's Config inherits: where the images come from, how a step is cut, how the run
    restarts."""
    data: str = "embedded"  # embedded | mnist | fashion-mnist | imagefolder | packed | cifar10 | cifar100 | ...
    data_root: str = ""  # folder of the data (ImageNet: holds train/ and val/); unused for the embedded slices
    subset: int = 0  # a seeded, class-balanced subset of N training images (0 = all): quick checks, data-poor studies
    classes: str = ""  # imagefolder: keep only the class folders listed in this file (imagenet100: CMC's); "" = all
    num_workers: int = 2  # data-loading processes per GPU (files; in-memory sets need none)
    resume: bool = True  # continue from out_dir/ckpt.pt if it exists
    seed: int = 0  # each rank uses seed + rank
    compile: bool = False  # torch.compile the model (CUDA)
    patch_size: int = 4  # patch side in pixels; the paper: 16
    accum_steps: int = 1  # micro-batches per optimizer step; batch-wise terms (InfoNCE negatives, BN) see one each


def parse_config(cls, argv=None):
    """argv -> a Config; a bad value ends in one line naming the flag."""
    comments = {}  # field -> its trailing comment, base classes first (distill's)
    for klass in reversed(cls.__mro__[:-1]):
        with contextlib.suppress(OSError, TypeError):
            comments.update(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.*)$", inspect.getsource(klass), re.M))
    parser = OneLineParser(description=sys.modules[cls.__module__].__doc__, allow_abbrev=False,  # --epoch: a typo
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        conv = _parse_bool if f.type is bool else str if f.type is list else f.type  # int("3.5") fails loudly
        flag = dict(nargs="?", const=True) if f.type is bool else dict(action="append") if f.type is list else {}
        shown = getattr(cls, "shown_default", lambda name: None)(f.name) or f.default  # method-dependent ones
        parser.add_argument(f"--{f.name}", type=conv, default=f.default, help=f"{comments.get(f.name, '')} (default: "
                            f"{shown})", metavar="PATH" if f.type is list else f.type.__name__.upper(), **flag)
    args = parser.parse_args(argv)
    HELD.append([])  # notes wait for the whole Config: a bad flag is then the only line (not a note, then the error)
    try:
        cfg = cls(**vars(args))
    except ValueError as e:
        parser.error(str(e))
    finally:
        held = HELD.pop()
    for text in held:
        note(text)
    return cfg


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:  # --mask-ratio=0.9 -> did you mean --mask_ratio?
            flags = [a for a in self._option_string_actions if a.startswith("--")]
            hints = []
            for arg in unknown.group(1).split():
                name = arg.split("=")[0]
                if not name.startswith("--"):
                    continue
                field = name[2:].replace("-", "_")
                close = difflib.get_close_matches(f"--{field}", flags, 1, 0.6)
                owners = [] if f"--{field}" in flags else stages_with_flag(field, self.prog)
                if owners:  # finetune.py --mask_ratio; before a look-alike (pretrain_mae.py --layer_decay)
                    hints.append(f"--{field} is a flag of {', '.join(owners)}, not of {self.prog}")
                elif close:
                    hints.append(f"{name}: did you mean {close[0]}?")
            message += "; " + "; ".join(hints) if hints else ""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def stages_with_flag(name, prog):
    """The other stages whose Config has this field, its own or inherited (read from their source, not imported: no
    import cycle), so that `finetune.py --mask_ratio=0.9` says where --mask_ratio belongs."""
    here = os.path.dirname(os.path.abspath(__file__))
    sources = {}
    for file in sorted(os.listdir(here)):
        if file.endswith(".py") and file != "flags.py":
            with open(os.path.join(here, file)) as f:
                sources[file] = f.read()
    field = re.compile(rf"^    {re.escape(name)}: \w+ = ", re.M)
    owners = [file for file, text in sources.items() if field.search(text)]
    for file, text in sources.items():  # then distill.py, whose Config(pretrain_mae.Config) has --mask_ratio too
        parent = re.search(r"^class Config\((\w+)\.Config\)", text, re.M)
        owners += [file] if parent and f"{parent.group(1)}.py" in owners else []
    return [file for file in owners if file != prog]


def _parse_bool(s):
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def check(cond, msg):
    """A ValueError that parse_config turns into a one-line usage error."""
    if not cond:
        raise BadValue(msg)


def int_list(text, flag):
    """'0,1,2' -> [0, 1, 2] ("" -> []); else a BadValue naming the flag."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BadValue(f"{flag} must be comma-separated integers, got {text!r}") from None


# Ranges of the shared flags; a stage passes its own to check_config
RANGES = dict(img_size=">0", patch_size=">0", num_heads=">=0", num_workers=">=0", subset=">=0", seed=">=0",
              epochs=">0", warmup_epochs=">=0", batch_size_per_gpu=">0", accum_steps=">0", base_lr=">0",
              weight_decay=">=0", batch_size=">0")


def check_config(cfg, default=None, **ranges):
    """Checks every stage shares: floats finite; each number in its range ("(0,1]", "[0,1)", ">0", ">=0"; `ranges`
    over RANGES, else `default`); a known ViT size ("" = the checkpoint's) whose width the heads divide. A warm-up
    longer than the run (--epochs=1 with the default 2) becomes half the run, with a note; one as long, a note."""
    numbers = [f.name for f in dataclasses.fields(cfg) if f.type in (int, float)]
    for name in numbers:
        value = getattr(cfg, name)
        check(value is not None or name not in RANGES, f"--{name} is unset and has no default here: pass --{name}")
        if value is None:  # a field this run does not use (a contrastive method without a teacher: ema_momentum)
            continue
        check(not isinstance(value, float) or math.isfinite(value), f"--{name} must be a finite number, got {value}")
        spec = ranges.get(name, RANGES.get(name, default))
        if spec is None:
            continue
        if spec[0] in "([":
            lo, hi = (float(x) for x in spec[1:-1].split(","))
            ok = (value > lo if spec[0] == "(" else value >= lo) and (value < hi if spec[-1] == ")" else value <= hi)
            check(ok, f"--{name} must be in {spec}, got {value}")
        else:
            bound = float(spec.lstrip(">="))
            check(value >= bound if spec.startswith(">=") else value > bound, f"--{name} must be {spec}, got {value}")
    if hasattr(cfg, "model"):
        optional = next(f.default == "" for f in dataclasses.fields(cfg) if f.name == "model")
        close = difflib.get_close_matches(cfg.model, VIT_SIZES, 1, 0.6)
        check(cfg.model in VIT_SIZES or (optional and not cfg.model), f"--model must be one of {sorted(VIT_SIZES)}, "
              f"got {cfg.model!r}" + (f": did you mean --model={close[0]}?" if close else ""))
        vit_heads(cfg.model or "cpu", getattr(cfg, "num_heads", 0))  # a count that does not split the width fails
    for side in ("img_size", "local_crop_size"):  # every view is a whole number of patches
        if hasattr(cfg, side) and hasattr(cfg, "patch_size"):
            check(getattr(cfg, side) % cfg.patch_size == 0,
                  f"{side} {getattr(cfg, side)} is not divisible by patch_size {cfg.patch_size}")
    if getattr(cfg, "warmup_epochs", 0) > getattr(cfg, "epochs", math.inf):
        half = cfg.epochs // 2
        note(f"--warmup_epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}; "
             + (f"warming up for {half} epochs instead" if half else "no warm-up instead")
             + " (pass --warmup_epochs to choose)")
        cfg.warmup_epochs = half
    elif getattr(cfg, "warmup_epochs", 0) == getattr(cfg, "epochs", math.inf):
        note(f"--warmup_epochs {cfg.warmup_epochs} is the whole run (--epochs {cfg.epochs}): the lr rises until the "
             "last step and never decays (pass a smaller --warmup_epochs for the cosine)")


NOTED = set()  # the notes this process has printed
HELD = []  # notes held back: while parse_config builds a Config, and from a command line until its run starts


def release_notes():
    """Print the notes held so far and hold no more: the run has started (RunFolder.start)."""
    while HELD:
        for text in HELD.pop():
            note(text)


def note(text):
    """One line on stderr, once per process: a study builds dozens of Configs that would each say it."""
    if HELD:
        HELD[-1].append(text)
    elif text not in NOTED:
        NOTED.add(text)
        print(f"note: {text}", file=sys.stderr)
