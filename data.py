"""Datasets as uint8 images, and a loader that hands each batch to the device already cut to the stage's views, with
no per-sample Python on the hot path.

A view is (side, scale range): torchvision's RandomResizedCrop; or (side, "center"): timm's eval centre crop.
In-memory sets (embedded slices, Fashion-MNIST, CIFAR) are cut on the device (augment.py); file sets (ImageFolder =
ImageNet, the small transfer sets) per image, by DataLoader workers with PIL. A packed store (store.py: every
image decoded and resized once by data/pack.py, uint8, memory-mapped) is cut by the same workers with no decode on a
CPU, and on a GPU a whole batch at once on the device, each image from its own box.
Nothing is ever downloaded: a missing folder or an undecodable file is an error naming it.
"""
import contextlib
import gzip
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import augment
from augment import crop_box
from common import BadData, BadValue, MissingFile
from store import Batches, PackedImages, cut_on_device, device_pixels, open_store, stored_size

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # committed slices (data/README.md)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_NAMES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
CLASS_LISTS = {"imagenet100": os.path.join(EMBEDDED_DIR, "imagenet100_classes.txt")}  # --classes by name: CMC's
UNREADABLE = (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError)


# --- datasets ---
def read_idx(path):
    """An idx-ubyte(.gz) file (the MNIST format) as a uint8 tensor."""
    if not os.path.isfile(path):
        raise MissingFile(f"data file not found: {path}")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise BadData(f"{path} is not a uint8 idx file")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    return torch.frombuffer(bytearray(data[4 + 4 * data[3]:]), dtype=torch.uint8).reshape(shape)


class MemoryImages:
    """uint8 images, (N, H, W) grey or (N, H, W, 3), moved whole to the device."""

    def __init__(self, images, labels, names=None):
        self.images, self.labels, self.names = images, torch.as_tensor(labels, dtype=torch.long), names

    def __len__(self):
        return len(self.images)

    def select(self, indices):
        return MemoryImages(self.images[indices], self.labels[indices], self.names)

    def chw(self):
        """(N, 3, H, W) uint8, grey repeated to 3 channels (a view, not a copy)."""
        x = self.images if self.images.dim() == 4 else self.images[..., None].expand(-1, -1, -1, 3)
        return x.permute(0, 3, 1, 2)


def open_image(path):
    """PIL's lazy open (header only), naming the file on failure."""
    try:
        img = Image.open(path)
        img.filename = path
        return img
    except UNREADABLE as e:
        raise BadData(f"corrupt or unreadable image file: {path} ({e})") from None


def rgb(img):
    """Decode to RGB, naming the file on failure. 16-bit grey is scaled to 8 bits: convert("RGB") alone clips
    mid-grey to white."""
    try:
        if img.mode.startswith("I"):  # I;16 / I: 0..65535
            img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
        return img.convert("RGB")
    except UNREADABLE as e:
        raise BadData(f"corrupt or unreadable image file: {img.filename} ({e})") from None


def eval_view(path, size):
    """An image file's eval view, cut as the loader's workers cut it (never the full-size image moved): uint8
    (3, size, size)."""
    with open_image(path) as img:
        return crop_pil(img, 0, [(size, "center")])[0]


def crop_pil(img, seed, views):
    """Lazily opened PIL image -> uint8 (3, S, S) per view, resized (antialiased bicubic) as torchvision's
    RandomResizedCrop on PIL images."""
    width, height = img.size
    boxes = [crop_box(seed, k, height, width, v) for k, v in enumerate(views)]
    factor = min(min(h, w) / v[0] for (_, _, h, w), v in zip(boxes, views))
    if img.format == "JPEG" and factor >= 2:  # decode reduced by JPEG's DCT scaling: 1/2, 1/4 or 1/8
        reduce = 2 ** min(3, int(math.log2(factor)))
        img.draft("RGB", (width // reduce, height // reduce))
    img = rgb(img)
    sx, sy = img.size[0] / width, img.size[1] / height
    return tuple(pil_to_tensor(img.resize((v[0], v[0]), Image.BICUBIC,
                                          box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)))
                 for (top, left, h, w), v in zip(boxes, views))


def pil_to_tensor(img):
    """An RGB PIL image -> uint8 (3, H, W), as torchvision's pil_to_tensor (whose import alone, with torchvision's
    models and ops, would add seconds to every command's start)."""
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)


class FileImages(Dataset):
    """(path, label) samples. Item (index, seed) -> (crops, label, index, seed): uint8 (3, S, S) per view."""

    def __init__(self, samples, names=None):
        self.samples, self.labels, self.names, self.views = samples, [y for _, y in samples], names, ()

    def __len__(self):
        return len(self.samples)

    def select(self, indices):
        return FileImages([self.samples[i] for i in indices], self.names)

    def crops(self, i, seed, views):
        with open_image(self.samples[i][0]) as img:
            return crop_pil(img, seed, views)

    def __getitem__(self, item):
        i, seed = item
        return self.crops(i, seed, self.views), self.samples[i][1], i, seed


def pack_image(path, short_side):
    """An image file as a store holds it (data/pack.py): uint8 (H, W, 3) bytes, H, W; resized once, antialiased
    bicubic (JPEG's DCT scaling first where it halves the image at least, as the file workers do)."""
    with open_image(path) as img:
        width, height = img.size
        size = stored_size(width, height, short_side)
        factor = min(width, height) / min(size)
        if img.format == "JPEG" and factor >= 2:
            reduce = 2 ** min(3, int(math.log2(factor)))
            img.draft("RGB", (width // reduce, height // reduce))
        img = rgb(img)
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)  # PIL widens the kernel by the shrink factor: antialiased
        return img.tobytes(), size[1], size[0]


def class_list(classes):
    """(path, names) of a --classes file (one folder per line) or of a CLASS_LISTS name."""
    path = CLASS_LISTS.get(classes, classes)
    if not os.path.isfile(path):
        raise MissingFile(f"--classes file not found: {path} (one class folder name per line, or one of "
                          f"{sorted(CLASS_LISTS)})")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    twice = sorted({c for c in names if names.count(c) > 1})
    if not names or twice:  # a class listed twice would get two labels for the same images
        raise BadData(f"--classes file {path} " + (f"lists {twice[0]} more than once" if twice else "names no class")
                      + ": give each class folder once")
    return path, names


def image_folder(root, train, classes=""):
    """(samples, class names) of root/{train,val}/<class>/<image> (ImageNet's layout), labelled by sorted folder, or
    by a class_list file's order. Nothing is copied or linked."""
    if not root:
        raise MissingFile("--data=imagefolder needs --data_root: a folder holding train/ and val/, one sub-folder per "
                          "class (ImageNet's layout)")
    path = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(path):
        raise MissingFile(f"image folder not found: {path} (expected {root}/train and {root}/val, one sub-folder "
                          "per class)")
    splits = [d for d in (os.path.join(root, "train"), os.path.join(root, "val")) if os.path.isdir(d)]
    folders = {d: sorted(e.name for e in os.scandir(d) if e.is_dir()) for d in splits}
    if classes:  # a subset (ImageNet-100 of ImageNet-1k): the rest is never read
        list_path, names = class_list(classes)
        for split in splits:
            missing = [c for c in names if c not in folders[split]]
            if missing:
                more = f" (and {len(missing) - 1} more of its classes)" if len(missing) > 1 else ""
                raise MissingFile(f"class {missing[0]} of {list_path} is not a folder in {split}{more}: check "
                                  "--data_root and --classes")
    elif len(splits) == 2 and folders[splits[0]] != folders[splits[1]]:
        only_train, only_val = (sorted(set(folders[a]) - set(folders[b]))[:10] for a, b in (splits, splits[::-1]))
        # labels are folder indices: a class missing from one split would shift every later label
        raise BadData(f"train/ and val/ under {root} hold different classes (only in train: {only_train}, only in "
                      f"val: {only_val}); the labels would not match: give both the same class folders")
    if not classes:
        names = folders[path]
    samples = [(os.path.join(path, c, f), label) for label, c in enumerate(names)
               for f in sorted(os.listdir(os.path.join(path, c))) if not f.startswith(".")]
    if not samples:
        raise MissingFile(f"no images under {path}")
    return samples, names


def transfer_set(name, root, train):
    """(dataset, num_classes) of torchvision's small transfer sets (PAPER §3.3), from a local root."""
    import torchvision.datasets as D  # only here: importing every dataset class is slow

    splits = {"flowers102": ("train", "val") if train else ("test",), "pets": ("trainval" if train else "test",),
              "aircraft": ("trainval" if train else "test",), "cars": ("train" if train else "test",)}
    if name not in ("cifar10", "cifar100", *splits):
        raise BadValue(f"unknown dataset {name!r}; choose from embedded, mnist, fashion-mnist, imagefolder, packed, "
                       "cifar10, cifar100, flowers102, pets, aircraft, cars")
    if not root or not os.path.isdir(root):
        raise MissingFile(f"data_root {root!r} for {name} does not exist")
    try:
        if name.startswith("cifar"):
            ds = (D.CIFAR10 if name == "cifar10" else D.CIFAR100)(root, train=train)
            return MemoryImages(torch.from_numpy(ds.data), ds.targets, ds.classes), len(ds.classes)
        make = dict(flowers102=D.Flowers102, pets=D.OxfordIIITPet, aircraft=D.FGVCAircraft, cars=D.StanfordCars)[name]
        samples = []
        for split in splits[name]:  # flowers: train+val for training, as the paper
            ds = make(root, split=split)
            files = getattr(ds, "_image_files", None) or getattr(ds, "_images", None)
            samples += list(zip(map(str, files), ds._labels)) if files else [(str(p), y) for p, y in ds._samples]
        return FileImages(samples), {"flowers102": 102, "pets": 37, "aircraft": 100, "cars": 196}[name]
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise MissingFile(f"{name} not found under {root}: {e}") from None


def class_by_class(labels, n, order=None):
    """n indices, one class at a time in turn (each class's in `order`): as balanced as n allows, where the first
    files of a folder are all one class."""
    by_class = {}
    for i in range(len(labels)) if order is None else order:
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    return [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)][:n]


def build_dataset(name, root, train, subset=0, classes=""):
    """(dataset, num_classes); README 'Data' lists the names. `subset`: N images, class-balanced and seeded;
    `classes`: see image_folder."""
    if classes and name not in ("imagefolder", "packed"):  # silently ignoring it would train on every class
        raise BadValue(f"--classes selects class folders of --data=imagefolder or packed, not of --data={name}: drop "
                       "--classes")
    if name in ("embedded", "mnist", "fashion-mnist"):  # the committed slices, or Debian's 70k
        folder, prefix = {"embedded": (EMBEDDED_DIR, "fmnist-"), "mnist": (EMBEDDED_DIR, "mnist-"),
                          "fashion-mnist": (root or FASHION_MNIST_DIR, "")}[name]
        split = "train" if train else "t10k"
        ds = MemoryImages(read_idx(os.path.join(folder, f"{prefix}{split}-images-idx3-ubyte.gz")),
                          read_idx(os.path.join(folder, f"{prefix}{split}-labels-idx1-ubyte.gz")),
                          range(10) if name == "mnist" else FASHION_MNIST_NAMES)
        classes = 10
    elif name == "imagefolder":
        samples, names = image_folder(root, train, classes)
        ds, classes = FileImages(samples, names), len(names)
        if not train:  # headers only: a bad val file fails before training
            for path, _ in samples:
                open_image(path).close()
    elif name == "packed":
        ds, names = open_store(root, train, *(class_list(classes) if classes else ()))
        classes = len(names)
    else:
        ds, classes = transfer_set(name, root, train)
    if subset and subset < len(ds):  # each class's images in a seeded shuffle, taken from its end
        shuffled = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(0)).tolist()
        ds = ds.select(sorted(class_by_class(ds.labels, subset, shuffled[::-1])))
    return ds, classes


def figure_images(dataset, n, size, device):
    """n class-balanced images, always the same, as eval centre crops (float in [0, 1]), and their class names."""
    idx = class_by_class(dataset.labels, n)
    names = [str(dataset.names[y]) if dataset.names else f"class {y}" for y in (int(dataset.labels[i]) for i in idx)]
    if isinstance(dataset, MemoryImages):
        return augment.center_crop(dataset.chw()[idx].to(device), size), names
    return torch.stack([dataset.crops(i, 0, [(size, "center")])[0] for i in idx]).to(device).float() / 255, names


# --- the loader ---
def _collate(batch):
    """Workers' crops stacked per view (in the worker, so a GPU's pinned copy is one per view); labels as a tensor."""
    views = tuple(torch.stack([b[0][k] for b in batch]) for k in range(len(batch[0][0])))
    return views, torch.tensor([b[1] for b in batch])


class SeededSampler(torch.utils.data.Sampler):
    """(index, crop seed) pairs. Seeds come from torch's RNG here, in the training process (checkpoints save it),
    never from a worker, so a resumed run cuts the same boxes."""

    def __init__(self, sampler, n, draw, lazy=False):
        self.sampler, self.n, self.draw, self.lazy = sampler, n, draw, lazy  # draw: False for eval views

    def __len__(self):
        return len(self.sampler) if self.sampler is not None else self.n

    def __iter__(self):
        # lazy (a store): drawn when the pass starts, so the DataLoader's extra iter() on its first pass draws nothing
        # and a resumed run draws as the one it continues (files keep the order of draws their runs always had)
        return self.pairs() if self.lazy else iter(list(self.pairs()))

    def pairs(self):
        order = list(self.sampler) if self.sampler is not None else list(range(self.n))
        seeds = torch.randint(2 ** 40, (len(order),)).tolist() if self.draw else [0] * len(order)
        yield from zip(order, seeds)


class DeviceCrops:
    """An in-memory batch; [k] cuts it to view k, float (B, 3, S, S) in [0, 1]. Cut when read, so each view's draws
    come in the order the stage reads them (crop, flip, colour of view 0, then view 1, ...)."""

    def __init__(self, images, views):
        self.images, self.views = images, views

    def __len__(self):
        return len(self.views)

    def __getitem__(self, k):
        size, scale = self.views[k]
        if scale == "center":
            return augment.center_crop(self.images, size)
        return augment.random_resized_crop(self.images, size, scale)


class Loader:
    """One pass of (crops, labels) on `device`: crops[k] is the batch cut to views[k], float (B, 3, S, S) in [0, 1].
    Shuffling draws from torch's global RNG, which checkpoints save, so a resumed run sees the same order.
    A packed store is cut on the device on a GPU (device_cut=None; tests force it on a CPU): from its pixels in device
    memory when they fit (resident=None: half the GPU's memory), else gathered by the workers into pinned memory."""

    def __init__(self, dataset, batch_size, train, num_workers, device, views, drop_last=None, device_cut=None,
                 resident=None):
        drop_last = train if drop_last is None else drop_last
        self.device, self.views, self.memory = device, views, isinstance(dataset, MemoryImages)
        cuda = device.type == "cuda"
        self.device_cut = isinstance(dataset, PackedImages) and (cuda if device_cut is None else device_cut)
        if torch.distributed.is_initialized():
            self.sampler = DistributedSampler(range(len(dataset)), shuffle=train, drop_last=drop_last)
        else:
            if train and drop_last and len(dataset) < batch_size:
                raise BadValue(f"dataset has {len(dataset)} images, fewer than one batch of {batch_size}; lower "
                               "--batch_size_per_gpu")
            self.sampler = torch.utils.data.RandomSampler(range(len(dataset))) if train else None
        packed = isinstance(dataset, PackedImages)
        seeded = SeededSampler(self.sampler, len(dataset), any(scale != "center" for _, scale in views), lazy=packed)
        # the workers' base seed (unused: crops come from the seeds) from a generator of its own, not the run's RNG:
        # persistent workers draw it once, at a resumed run's first epoch too, which would shift every later draw
        private = torch.Generator()
        if self.memory:  # a batch is an index gather on the device
            self.images = dataset.chw().contiguous().to(device)  # (N, 3, H, W) uint8
            self.labels = dataset.labels.to(device)
            self.batches = DataLoader(range(len(dataset)), batch_size, sampler=self.sampler, drop_last=drop_last)
        elif self.device_cut:  # a store: boxes from the seeds, cut on the device
            self.store = dataset
            if resident is None:
                resident = cuda and dataset.nbytes() <= torch.cuda.get_device_properties(device).total_memory / 2
            # resident: the pixels of these images only, once, in device memory, a batch is an index gather; else the
            # workers gather each batch from the memory map, pinned and copied ahead on a side stream. The workers
            # draw the boxes either way.
            self.pixels, self.starts = device_pixels(dataset, device) if resident else (None, None)
            self.batches = DataLoader(Batches(dataset, views, gather=not resident), None, generator=private,
                                      sampler=torch.utils.data.BatchSampler(seeded, batch_size, drop_last),
                                      num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0,
                                      prefetch_factor=4 if num_workers else None)
        else:
            dataset.views = views
            self.batches = DataLoader(dataset, batch_size, sampler=seeded, drop_last=drop_last, generator=private,
                                      num_workers=num_workers, collate_fn=_collate, pin_memory=cuda,
                                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank

    def __iter__(self):
        if self.memory:
            for batch in self.batches:
                idx = torch.as_tensor(batch).to(self.device, non_blocking=True)
                yield DeviceCrops(self.images[idx], self.views), self.labels[idx]
        elif self.device_cut and self.pixels is not None:
            for idx, boxes in self.batches:
                yield (cut_on_device(self.pixels, self.starts[idx], self.store.shapes[idx], boxes, self.views),
                       self.store.labels[idx].to(self.device, non_blocking=True))
        elif self.device_cut:
            yield from self._copied_ahead()
        else:
            for crops, labels in self.batches:
                yield (tuple(c.to(self.device, non_blocking=True).float().div_(255) for c in crops),
                       labels.to(self.device, non_blocking=True))

    def _copied_ahead(self):
        """Host-gathered batches: batch k + 1 is copied on a side stream while the caller trains on batch k."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def copy(batch):
            idx, boxes, flat, starts = batch
            labels = self.store.labels[idx]
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                out = flat.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                return out, starts, self.store.shapes[idx], boxes, stream.record_event() if cuda else None

        batches = iter(self.batches)
        ahead = copy(next(batches)) if len(self.batches) else None
        while ahead is not None:
            (flat, labels), starts, shapes, boxes, done = ahead
            following = next(batches, None)
            if cuda:  # the caller's stream waits for the copy; its allocator keeps the memory until it is done
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in (flat, labels):
                    t.record_stream(torch.cuda.current_stream(self.device))
            ahead = copy(following) if following is not None else None
            yield cut_on_device(flat, starts, shapes, boxes, self.views), labels


