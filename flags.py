"""A stage's flags: its Config dataclass is its command line (every field a --field=value flag, its comment the
--help), checked in one place (check_config), and run by cli(), where bad input ends in one line, never a traceback.
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
    """`python stage.py --flags`: parse the Config, run main; a RunError or a non-finite loss is one line, exit 2;
    Ctrl-C is one line saying where the run stopped and how to continue it, exit 130."""
    cfg = parse_config(cls)
    prog = os.path.basename(sys.argv[0])
    try:
        main(cfg)
    except (RunError, FloatingPointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; one line says it
            print(f"\n{prog}: stopped by Ctrl-C" + (f"; {e}" if str(e) else ""), file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # `... --plan | head` closed the pipe: stop quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


@dataclasses.dataclass
class TrainFlags:
    """The flags every training stage shares (its Config subclasses this; --help lists them with its own): where
    its images come from, and how its run restarts."""
    data: str = "embedded"  # embedded | mnist | fashion-mnist | imagefolder | cifar10 | cifar100 | flowers102 | ...
    data_root: str = ""  # folder of the data (ImageNet: holds train/ and val/); unused for the embedded slices
    subset: int = 0  # a seeded, class-balanced subset of N training images (0 = all): quick checks, data-poor studies
    classes: str = ""  # imagefolder: keep only the class folders listed in this file (imagenet100: CMC's); "" = all
    num_workers: int = 2  # data-loading processes per GPU (files; in-memory sets need none)
    resume: bool = True  # continue from out_dir/ckpt.pt if it exists
    seed: int = 0  # each rank uses seed + rank
    compile: bool = False  # torch.compile the model (CUDA)


def parse_config(cls, argv=None):
    """Turn a Config dataclass into --field=value flags, each with its source comment as help; a bad value ends in
    one line naming the flag."""
    comments = {}  # field -> its trailing '# comment' in the source, base classes first (distill's)
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
    try:
        return cls(**vars(args))
    except ValueError as e:
        parser.error(str(e))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not argparse's whole usage block
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:  # --mask-ratio=0.9 -> did you mean --mask_ratio?
            flags = [a for a in self._option_string_actions if a.startswith("--")]
            hints = []
            for arg in unknown.group(1).split():
                name = arg.split("=")[0]
                close = difflib.get_close_matches(name.replace("-", "_").replace("__", "--", 1), flags, 1, 0.6)
                hints += [f"{name}: did you mean {close[0]}?"] if close and name.startswith("--") else []
            message += "; " + "; ".join(hints) if hints else ""
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


def int_list(text, flag):
    """'0,1,2' -> [0, 1, 2] ("" -> []); anything else is one line naming the flag."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BadValue(f"{flag} must be comma-separated integers, got {text!r}") from None


# The ranges of the flags the stages share; a stage's own are passed to check_config
RANGES = dict(img_size=">0", patch_size=">0", num_heads=">=0", num_workers=">=0", subset=">=0", seed=">=0",
              epochs=">0", warmup_epochs=">=0", batch_size_per_gpu=">0", accum_steps=">0", base_lr=">0",
              weight_decay=">=0", batch_size=">0")


def check_config(cfg, default=None, **ranges):
    """What every stage's Config checks: every float flag finite; each flag in its range ("(0,1]", "[0,1)", ">0",
    ">=0"; RANGES, then `ranges`, else `default` for any other number); a known ViT size ("" lets the checkpoint
    say) with a head count that divides its width; an image side divisible by the patch side. A warm-up longer
    than the run (--epochs=1 with the default 2 warm-up epochs) becomes half the run, said once."""
    numbers = [f.name for f in dataclasses.fields(cfg) if f.type in (int, float)]
    for name in numbers:
        value = getattr(cfg, name)
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
    if hasattr(cfg, "patch_size"):
        check(cfg.img_size % cfg.patch_size == 0,
              f"img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}")
    if getattr(cfg, "warmup_epochs", 0) > getattr(cfg, "epochs", math.inf):
        print(f"note: --warmup_epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}; warming up for "
              f"{cfg.epochs // 2} epochs instead (pass --warmup_epochs to choose)", file=sys.stderr)
        cfg.warmup_epochs = cfg.epochs // 2
