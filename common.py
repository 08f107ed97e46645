"""Plumbing shared by the stages: distributed setup, config flags, schedule, checkpoints, logs, data sources.

Plain functions only. What a stage is *about* (masking, losses, EMA, the step) stays inline in that stage.
"""
import argparse
import contextlib
import dataclasses
import gzip
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import sys

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_DIR = os.path.join(HERE, "data")  # the committed Fashion-MNIST slice (data/make_slice.py)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


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
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        conv = _parse_bool if f.type is bool else f.type  # int("3.5") fails loudly, as it should
        parser.add_argument(f"--{f.name}", type=conv, default=f.default, metavar=f.type.__name__.upper(),
                            help=f"{comments.get(f.name, '')} (default: {f.default})")
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:
        parser.error(str(e))


def _parse_bool(s):
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def check(cond, msg):
    """Config validation: a ValueError that parse_config turns into a usage error."""
    if not cond:
        raise ValueError(msg)


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
def save_ckpt(obj, path):
    """Atomic: write a temporary file, then rename over the old one, so a crash never leaves half a checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path, what="checkpoint"):
    """torch.load with weights_only=True: a checkpoint is data, never code. Ours are plain dicts; the one class
    allowed beyond that is argparse.Namespace, which facebookresearch/mae stores under 'args'. A missing, empty,
    truncated or foreign file ends in one line naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a class: say which, never "set weights_only=False"
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{what} {path} holds a Python object that is not plain data"
                         f" ({found.group(1) if found else 'unknown class'}); it is refused for safety. Re-save its "
                         "tensors as a plain dict (torch.save(state_dict, path))") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, KeyError... for a damaged file
        size = os.path.getsize(path)
        why = "an empty file" if size == 0 else f"{size} bytes, truncated or not a PyTorch checkpoint"
        detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"{what} {path} cannot be read ({why}: {detail}); delete it or point to another file") from None


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
    RNG, and return the checkpoint (for its epoch and extras); otherwise None."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    ckpt = load_ckpt(path)
    for name, obj in stateful.items():
        obj.load_state_dict(ckpt[name])
    restore_rng(ckpt["rng"], rank)
    print0(f"resumed from {path} at epoch {ckpt['epoch']}")
    return ckpt


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_out_dir(cfg, script_path):
    """config.json and a copy of the running script, so every run can be reproduced from its folder."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    shutil.copy(script_path, os.path.join(cfg.out_dir, os.path.basename(script_path)))


def log_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# --- data ---
def read_idx(path):
    """Read an idx-ubyte(.gz) file (the MNIST format) into a uint8 tensor."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


class TensorImages(Dataset):
    """uint8 (N, H, W) grey images -> RGB PIL images, so every transform and model sees 3 channels."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i].numpy(), mode="L").convert("RGB")
        return self.transform(img), int(self.labels[i])


def load_rgb(path):
    """PIL loader for ImageFolder that names the file when it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise RuntimeError(f"corrupt or unreadable image file: {path} ({e})") from e


def build_dataset(name, root, train, transform, subset=0):
    """Returns (dataset, num_classes). See README 'Data' for the names; nothing is ever downloaded."""
    import torchvision.datasets as D

    if name in ("embedded", "fashion-mnist"):
        folder, prefix = (EMBEDDED_DIR, "fmnist-") if name == "embedded" else (root or FASHION_MNIST_DIR, "")
        split = "train" if train else "t10k"
        images = read_idx(os.path.join(folder, f"{prefix}{split}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(folder, f"{prefix}{split}-labels-idx1-ubyte.gz"))
        ds, classes = TensorImages(images, labels, transform), 10
    elif name == "imagefolder":  # ImageNet layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG
        path = os.path.join(root, "train" if train else "val")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder not found: {path} (expected {root}/train and {root}/val)")
        ds = D.ImageFolder(path, transform=transform, loader=load_rgb)
        classes = len(ds.classes)
    else:  # torchvision's small transfer datasets (PAPER §3.3), read from a local root
        makers = {
            "cifar10": (10, lambda: D.CIFAR10(root, train=train, transform=transform)),
            "cifar100": (100, lambda: D.CIFAR100(root, train=train, transform=transform)),
            "flowers102": (102, lambda: torch.utils.data.ConcatDataset(  # train+val for training, as the paper
                [D.Flowers102(root, split=s, transform=transform) for s in ("train", "val")]) if train
                else D.Flowers102(root, split="test", transform=transform)),
            "pets": (37, lambda: D.OxfordIIITPet(root, split="trainval" if train else "test", transform=transform)),
            "aircraft": (100, lambda: D.FGVCAircraft(root, split="trainval" if train else "test", transform=transform)),
            "cars": (196, lambda: D.StanfordCars(root, split="train" if train else "test", transform=transform)),
        }
        if name not in makers:
            raise ValueError(f"unknown dataset {name!r}; choose from embedded, fashion-mnist, imagefolder, "
                             + ", ".join(makers))
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"data_root {root!r} for {name} does not exist")
        classes, make = makers[name]
        try:
            ds = make()
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(f"{name} not found under {root}: {e}") from e
    if subset:
        ds = Subset(ds, range(min(subset, len(ds))))
    return ds, classes


def make_loader(dataset, batch_size, train, num_workers, drop_last=None):
    """DistributedSampler only under DDP; otherwise torch's global RNG shuffles, which resume restores."""
    drop_last = train if drop_last is None else drop_last
    if dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=train, drop_last=drop_last)
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers,
                          pin_memory=torch.cuda.is_available(),
                          drop_last=drop_last)
    if train and len(dataset) < batch_size and drop_last:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than one batch of {batch_size}")
    return DataLoader(dataset, batch_size, shuffle=train, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last)  # no persistent workers: fresh worker seeds each epoch come from the
    # global RNG, so a resumed run draws the same augmentations as an uninterrupted one


def set_epoch(loader, epoch):
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank


def eval_transform(img_size):
    """timm's eval: resize to img_size/0.875, centre crop (PAPER §3.1)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
