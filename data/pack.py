r"""Pack an image folder in ImageNet's layout (train/ and val/, a folder per class) into a uint8 store, once: every
image decoded and resized once (shorter side to --short_side, its own aspect ratio kept, never enlarged), so that
every stage reads it with --data=packed --data_root=STORE and no JPEG is decoded again.

    python data/pack.py --data_root=/imagenet --classes=imagenet100 --out_dir=/data/in100.store    # ImageNet-100
    python data/pack.py --data_root=/imagenet --out_dir=/data/in1k.store                           # ImageNet-1k

The store: meta.json (format, version, short side, class names, image counts: written last), and per split
{train,val}.pixels (each image's (H, W, 3) uint8 bytes end to end) with {train,val}.index.pt (starts, (H, W), labels).
It is written into STORE.partial and renamed to STORE when complete; an interrupted pack resumes there (a finished split
is kept, an unfinished one starts over). A file that cannot be decoded is named, with the list in STORE.partial.
"""
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import BadData, BadValue, RunError  # noqa: E402
from data import FileImages, build_dataset, image_folder, open_image, pack_image  # noqa: E402
from store import STORE_FORMAT, STORE_VERSION, stored_size  # noqa: E402
from flags import check, cli  # noqa: E402


@dataclass
class Config:
    data: str = "imagefolder"  # imagefolder | flowers102 | pets | aircraft | cars (their train and test splits)
    data_root: str = ""  # the image folder: data_root/train/<class>/*, data_root/val/<class>/*
    classes: str = ""  # only the class folders this file lists (imagenet100: CMC's 100), in its order; "" = all
    out_dir: str = ""  # the store to write (a new folder)
    short_side: int = 256  # each image's shorter side in the store, in pixels (smaller images kept as they are); 256
    # is the 224-px eval view's resize (224 / 0.875): its centre crop is cut at scale 1, and the README gives the crops'
    # fidelity at 160-384
    workers: int = 0  # decoding processes; 0 = one per core
    sample: int = 500  # images per split whose headers give the size estimate printed before packing

    def __post_init__(self):
        check(self.short_side > 0, f"--short_side must be > 0, got {self.short_side}")
        check(self.workers >= 0 and self.sample > 0, "--workers must be >= 0 and --sample > 0")
        check(self.out_dir, "--out_dir is required: the folder the store is written to")


def decode(job):
    """(path, short_side) -> data.pack_image's (bytes, H, W), or the error's text for a file that cannot be read."""
    try:
        return pack_image(*job)
    except RunError as e:
        return str(e), 0, 0


def estimate(splits, cfg):
    """Bytes of the store, from the headers of cfg.sample images per split."""
    total, rng = 0, random.Random(0)
    for samples in splits.values():
        picked = rng.sample(samples, min(cfg.sample, len(samples)))
        sizes = []
        for path, _ in picked:
            try:
                with open_image(path) as img:
                    sizes.append(stored_size(*img.size, cfg.short_side))
            except RunError:  # named by the pack itself, with the others
                pass
        total += sum(w * h * 3 for w, h in sizes) / max(1, len(sizes)) * len(samples)
    return total


def write_pixels(path, samples, split, cfg, pool):
    """Decode a split's images in the pool, in order, into one file: (starts, (H, W) shapes, bytes, unreadable)."""
    starts, shapes, bad, offset = [], [], [], 0
    with open(path, "wb") as f:
        jobs = ((p, cfg.short_side) for p, _ in samples)
        for (p, _), (data, h, w) in tqdm(zip(samples, pool.imap(decode, jobs, chunksize=16)), total=len(samples),
                                          desc=f"pack {split}", unit="img", smoothing=0.05,
                                          disable=not sys.stderr.isatty()):
            if not h:
                bad.append(f"{p}: {data}")
                continue
            f.write(data)
            starts.append(offset)
            shapes.append((h, w))
            offset += len(data)
        f.flush()
        os.fsync(f.fileno())
    return starts, shapes, offset, bad


def pack_split(split, samples, names, partial, cfg, pool):
    """partial/split.pixels, then its index (the split is done when the index exists)."""
    pixels, index_path = os.path.join(partial, f"{split}.pixels"), os.path.join(partial, f"{split}.index.pt")
    if os.path.exists(index_path):  # another run's, with other settings: the split is not done until written anew
        os.remove(index_path)
    try:
        starts, shapes, offset, bad = write_pixels(pixels + ".tmp", samples, split, cfg, pool)
    except OSError as e:  # a full disk, most likely: the same command starts this split over
        raise BadData(f"writing {pixels}.tmp failed ({e.strerror or e}); free some space and run the same command "
                      "again") from None
    if bad:
        with open(os.path.join(partial, "unreadable.txt"), "w") as f:
            f.write("\n".join(bad) + "\n")
        raise BadData(f"{len(bad)} file(s) of {split}/ cannot be decoded, the first: {bad[0]} (all listed in "
                      f"{partial}/unreadable.txt); remove or replace them and run the same command again")
    os.replace(pixels + ".tmp", pixels)
    index = dict(starts=torch.tensor(starts, dtype=torch.long), shapes=torch.tensor(shapes, dtype=torch.long),
                 labels=torch.tensor([y for _, y in samples], dtype=torch.long), bytes=offset,
                 short_side=cfg.short_side, paths=len(samples), classes=names)
    torch.save(index, index_path + ".tmp")
    os.replace(index_path + ".tmp", index_path)
    return len(samples)


def finished_split(partial, split, samples, names, cfg):
    """True if an interrupted pack already wrote this split with these settings."""
    try:
        index = torch.load(os.path.join(partial, f"{split}.index.pt"), weights_only=True)
        size = os.path.getsize(os.path.join(partial, f"{split}.pixels"))
        return (index["short_side"], index["paths"], index["classes"], index["bytes"]) == (
            cfg.short_side, len(samples), names, size)
    except (OSError, RuntimeError, EOFError, KeyError):
        return False


def main(cfg):
    out = cfg.out_dir.rstrip("/")
    partial = out + ".partial"
    if os.path.exists(out):
        raise BadValue(f"{out} exists; give --out_dir a new folder (a store is written once)")
    splits, names = {}, None
    for split in ("train", "val"):
        if cfg.data == "imagefolder":
            splits[split], names = image_folder(cfg.data_root, split == "train", cfg.classes)
        else:  # a transfer set of files: its classes by number
            check(not cfg.classes, "--classes selects class folders of --data=imagefolder")
            files, classes = build_dataset(cfg.data, cfg.data_root, split == "train")
            check(isinstance(files, FileImages), f"--data={cfg.data} is held in memory already: nothing to pack")
            splits[split], names = files.samples, [str(c) for c in range(classes)]
    need = estimate(splits, cfg)
    os.makedirs(partial, exist_ok=True)
    free = shutil.disk_usage(partial).free + sum(e.stat().st_size for e in os.scandir(partial))  # a resumed pack's
    workers = cfg.workers or len(os.sched_getaffinity(0))
    print(f"packing {len(splits['train']):,} train + {len(splits['val']):,} val images of {len(names)} classes, "
          f"shorter side {cfg.short_side} px, on {workers} cores: about {need / 1e9:.2f} GB (from up to {cfg.sample} "
          f"headers per split), {free / 1e9:.0f} GB free", flush=True)
    if need > free * 0.98:
        raise BadData(f"{partial} has {free / 1e9:.1f} GB free, the store needs about {need / 1e9:.1f} GB: free some "
                      "space or pack elsewhere")
    start, packed = time.time(), 0
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for split, samples in splits.items():
            if finished_split(partial, split, samples, names, cfg):
                print(f"{split}: packed by an earlier, interrupted run; kept", flush=True)
                continue
            packed += pack_split(split, samples, names, partial, cfg, pool)
    with contextlib.suppress(FileNotFoundError):  # an earlier run's list of bad files: all of them decoded now
        os.remove(os.path.join(partial, "unreadable.txt"))
    meta = dict(format=STORE_FORMAT, version=STORE_VERSION, short_side=cfg.short_side, classes=names,
                images={split: len(samples) for split, samples in splits.items()},
                source=os.path.abspath(cfg.data_root))
    with open(os.path.join(partial, "meta.json"), "w") as f:  # written last: a store without it is not complete
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, out)
    seconds = time.time() - start
    size = sum(os.path.getsize(os.path.join(out, f"{s}.pixels")) for s in splits)
    print(f"wrote {out}: {size / 1e9:.2f} GB, {packed:,} images decoded in {seconds:.0f} s "
          f"({packed / max(seconds, 1e-9):.0f} img/s on {workers} cores); train on it with --data=packed "
          f"--data_root={out}", flush=True)
    return meta


if __name__ == "__main__":
    cli(main, Config)
