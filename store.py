"""The packed store: data/pack.py decodes an image folder once into uint8 pixels, each image at its own size (shorter
side 256 by default), and every stage reads it with --data=packed --data_root=STORE, no JPEG decoded again.

A store holds meta.json (format, version, classes, image counts: written last) and per split {split}.pixels, the
images' (H, W, 3) bytes end to end, with {split}.index.pt (starts, shapes, labels). A split is memory-mapped, never
read whole. Its views are cut per image from its own box (augment.crop_box's, as for files, rounded to whole pixels)
and resized bicubic antialiased: by the CPU workers in uint8 (cut_image), or on the device in floats for a whole
batch at once (cut_on_device); data.Loader picks.
"""
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from augment import crop_box
from common import BadData, MissingFile

STORE_FORMAT, STORE_VERSION = "mae-lite-mini packed images", 1  # another version is refused


def stored_size(width, height, short_side):
    """(width, height) of an image in a store: the shorter side to short_side, the aspect ratio kept, never enlarged."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    return max(1, round(width * short_side / short)), max(1, round(height * short_side / short))


class PackedImages(Dataset):
    """One split of a packed store: uint8 (H, W, 3) images end to end in one file, memory-mapped (read when touched,
    never copied whole), each at its own size. Items as FileImages', cut from the pixels with no decode."""

    def __init__(self, pixels_path, starts, shapes, labels, names):
        self.pixels_path, self.starts, self.shapes, self.labels = pixels_path, starts, shapes, labels
        self.names, self.views, self.map = names, (), None

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):  # a worker started by spawn maps the file itself, never gets it pickled
        return dict(self.__dict__, map=None)

    def pixels(self):
        """The split's whole file, 1-D uint8, memory-mapped (copy-on-write: the store is never written)."""
        if self.map is None:
            self.map = torch.from_file(self.pixels_path, shared=False, size=os.path.getsize(self.pixels_path),
                                       dtype=torch.uint8)
        return self.map

    def nbytes(self):
        return int((self.shapes[:, 0] * self.shapes[:, 1]).sum()) * 3

    def image(self, i):
        h, w = self.shapes[i].tolist()
        start = int(self.starts[i])
        return self.pixels()[start:start + h * w * 3].view(h, w, 3)

    def select(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return PackedImages(self.pixels_path, self.starts[indices], self.shapes[indices], self.labels[indices],
                            self.names)

    def crops(self, i, seed, views):  # (3, S, S) uint8 per view, as FileImages.crops
        return cut_image(self.image(i).permute(2, 0, 1)[None], seed, views)

    def __getitem__(self, item):
        i, seed = item
        return self.crops(i, seed, self.views), int(self.labels[i]), i, seed

    def gather(self, idx):
        """The images idx as one 1-D uint8 tensor (pinned by the DataLoader on a GPU), then a row of zeros as wide as
        the widest (cut_on_device reads whole rows), and their starts in it: what the device cuts when the store does
        not fit its memory."""
        pad = torch.zeros(int(self.shapes[idx, 1].max()) * 3 if len(idx) else 0, dtype=torch.uint8)
        sizes = self.shapes[idx].prod(1) * 3
        return torch.cat([self.image(i).reshape(-1) for i in idx.tolist()] + [pad]), sizes.cumsum(0) - sizes


def open_store(root, train, list_path="", names=()):
    """(PackedImages, class names) of a store's train or val split, only the classes `names` lists (in its order;
    data.class_list reads them from list_path) if any. A store of another version, a half-written or truncated one,
    or a class it lacks is one line naming the way out."""
    folder = bool(root) and os.path.isdir(os.path.join(root, "train"))  # an image folder given for its store
    def pack(out="STORE"):  # the command that (re)packs it
        return f"python data/pack.py --data_root={root if folder else 'IMAGE_FOLDER'} --out_dir={out}"

    if not root:
        raise MissingFile(f"--data=packed needs --data_root: a store written by {pack()}")
    meta_path = os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        root = root.rstrip("/")
        if root.endswith(".partial") or os.path.isdir(root + ".partial"):  # pack.py renames it when complete
            raise BadData(f"{root} is a half-written store (its pack was interrupted): run data/pack.py again with "
                          f"--out_dir={root.removesuffix('.partial')}, it resumes")
        if os.path.isdir(root) and any(f.endswith(".pixels") for f in os.listdir(root)):
            raise BadData(f"{root} holds a store's pixels but no meta.json (pack.py writes it last): a damaged store; "
                          f"pack its images again ({pack('NEW_STORE')})")
        raise MissingFile(f"{root} is not a packed store (no meta.json): pack it first, {pack()}, then "
                          "--data_root=STORE")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        version = meta.get("version") if meta.get("format") == STORE_FORMAT else None
    except (OSError, ValueError, AttributeError):
        version = None
    if version != STORE_VERSION:
        raise BadData(f"{root} is a store of format version {version}, this code reads version {STORE_VERSION}: pack "
                      f"its images again into a new store ({pack()})")
    split = "train" if train else "val"
    try:
        index = torch.load(os.path.join(root, f"{split}.index.pt"), weights_only=True)
        size = os.path.getsize(os.path.join(root, f"{split}.pixels"))
    except (OSError, RuntimeError, EOFError) as e:
        raise BadData(f"{root}: the {split} split is missing or unreadable ({type(e).__name__}): pack it again "
                      f"({pack()})") from None
    ds = PackedImages(os.path.join(root, f"{split}.pixels"), index["starts"], index["shapes"], index["labels"],
                      meta["classes"])
    if size != index["bytes"] or len(ds) != meta["images"][split] or size != ds.nbytes():
        raise BadData(f"{root}: {split}.pixels holds {size:,} bytes where its index says {index['bytes']:,}: a "
                      f"truncated or half-written store; pack it again ({pack()})")
    if not names:
        return ds, meta["classes"]
    missing = [c for c in names if c not in meta["classes"]]
    if missing:
        more = f" (and {len(missing) - 1} more of its classes)" if len(missing) > 1 else ""
        raise MissingFile(f"class {missing[0]} of {list_path} is not in the store {root}{more}, which holds "
                          f"{len(meta['classes'])} classes: pack them (--classes of data/pack.py), or check --classes")
    relabel = torch.full((len(meta["classes"]),), -1, dtype=torch.long)
    relabel[[meta["classes"].index(c) for c in names]] = torch.arange(len(names))
    keep = (relabel[ds.labels] >= 0).nonzero()[:, 0]
    ds = ds.select(keep)
    ds.labels, ds.names = relabel[ds.labels], names
    return ds, names


def whole_box(seed, k, height, width, view):
    """(top, left, h, w) of view k in a store image's own pixels: crop_box's, rounded to whole pixels. Both cuts,
    the workers' and the device's, resize this box."""
    return tuple(round(v) for v in crop_box(seed, k, height, width, view))


def view_boxes(shapes, seeds, views):
    """(B, V, 4) int64: each image's whole_box for every view."""
    boxes = [[whole_box(seed, k, h, w, view) for k, view in enumerate(views)]
             for (h, w), seed in zip(shapes.tolist(), seeds)]
    return torch.tensor(boxes, dtype=torch.long).view(len(seeds), len(views), 4)


class Batches(Dataset):
    """A store's batches for the device's cut, made by the DataLoader's workers (its sampler yields whole batches of
    (index, seed)): the indices, every view's boxes (about 10 us an image in Python, never on the training process's
    clock), and, where the pixels are not in device memory, the images gathered from the memory map."""

    def __init__(self, store, views, gather):
        self.store, self.views, self.gather = store, views, gather

    def __getitem__(self, items):
        idx = torch.tensor([i for i, _ in items], dtype=torch.long)
        boxes = view_boxes(self.store.shapes[idx], [s for _, s in items], self.views)
        return (idx, boxes, *self.store.gather(idx)) if self.gather else (idx, boxes)


def device_pixels(store, device):
    """The store's images (all, or a --subset's) as one 1-D uint8 tensor on the device, with gather's layout: a row
    of zeros as wide as the widest image after them, and their starts in it."""
    sizes = store.shapes.prod(1) * 3
    if len(store) and torch.equal(store.starts, sizes.cumsum(0) - sizes):  # a whole split: the file as it is, once
        pixels = torch.zeros(store.nbytes() + int(store.shapes[:, 1].max()) * 3, dtype=torch.uint8, device=device)
        pixels[:store.nbytes()].copy_(store.pixels()[:store.nbytes()])
        return pixels, store.starts
    flat, starts = store.gather(torch.arange(len(store)))
    return flat.to(device), starts


def cut_on_device(pixels, starts, shapes, boxes, views):
    """Each image of a batch, uint8 (h, w, 3) at starts[b] of the 1-D `pixels` (a widest row of zeros after the
    last), cut to every view from its own box (view_boxes: the workers' boxes) and resized bicubic antialiased, PIL's
    filter: float (B, 3, S, S) per view in [0, 1]. The boxes are gathered into one padded batch and resized by two
    batched products with each image's weights, a few kernels a batch, never one per image."""
    out, device, B = [], pixels.device, len(boxes)
    for k, view in enumerate(views):
        top, left, bh, bw = boxes[:, k].unbind(1)
        H, W = int(bh.max()), int(bw.max())
        y = torch.minimum(torch.arange(H)[None], bh[:, None] - 1)  # rows past a box repeat its last (weight 0)
        rows = starts[:, None] + ((top[:, None] + y) * shapes[:, 1:2] + left[:, None]) * 3  # each row's first byte
        crops = pixels.unfold(0, W * 3, 1)[rows.to(device)].view(B, H, W, 3).permute(0, 3, 1, 2).float()
        wy, wx = resize_weights(bh, view[0], H, device), resize_weights(bw, view[0], W, device)
        resized = wy[:, None] @ crops @ wx[:, None].transpose(-1, -2)  # (B, 3, S, S)
        out.append(resized.round_().clamp_(0, 255).div_(255))
    return tuple(out)


def resize_weights(sizes, out_size, width, device):
    """(B, out_size, width) float: row i resamples a sample's first sizes[b] pixels to output pixel i, as PIL's
    antialiased bicubic (a = -0.5) and torch's interpolate(antialias=True) weigh them: the kernel widened by the
    shrink factor, taps past the sample's size dropped, each row summing to 1."""
    size = sizes.to(device, torch.float)[:, None, None]
    scale = size / out_size
    stretch = scale.clamp(min=1)  # shrinking widens the kernel: the antialiasing
    centre = (torch.arange(out_size, device=device, dtype=torch.float)[None, :, None] + 0.5) * scale
    j = torch.arange(width, device=device, dtype=torch.float)[None, None, :]
    x = ((j + 0.5 - centre) / stretch).abs()
    a = -0.5
    w = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0))
    w = w * (j < size)
    return w / w.sum(-1, keepdim=True)


def cut_image(img, seed, views):
    """The workers' cut of a store's image, uint8 (1, 3, h, w): each view's whole_box, resized bicubic antialiased by
    torch's uint8 kernel (PIL's filter in fixed point, 4x PIL's speed) -> uint8 (3, S, S) per view. cut_on_device
    cuts the same boxes with the same filter in floats: the two differ by a level at most."""
    h, w = img.shape[-2:]
    crops = []
    for k, view in enumerate(views):
        top, left, bh, bw = whole_box(seed, k, h, w, view)
        crops.append(F.interpolate(img[..., top:top + bh, left:left + bw], (view[0], view[0]), mode="bicubic",
                                   antialias=True, align_corners=False)[0])
    return tuple(crops)
