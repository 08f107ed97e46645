"""Make the embedded default data: a class-balanced slice of Fashion-MNIST (MIT licence).

Reads the full set from Debian's `dataset-fashion-mnist` package and writes the first
`per_class` images of each class, in the original idx-ubyte.gz format, next to this file.
    python data/make_slice.py            # 600/class train (6000), 100/class test (1000)
"""
import gzip
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import read_idx, FASHION_MNIST_DIR  # noqa: E402


def write_idx(path, t):
    # idx header: two zero bytes, dtype code 0x08 (uint8), number of dims, then big-endian sizes
    header = bytes([0, 0, 8, t.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
        f.write(header + t.contiguous().numpy().tobytes())


def main(per_class_train=600, per_class_test=100):
    out = os.path.dirname(os.path.abspath(__file__))
    for split, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        x = read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-images-idx3-ubyte.gz"))
        y = read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-labels-idx1-ubyte.gz"))
        keep = torch.cat([(y == c).nonzero()[:per_class, 0] for c in range(10)]).sort().values
        write_idx(os.path.join(out, f"fmnist-{split}-images-idx3-ubyte.gz"), x[keep])
        write_idx(os.path.join(out, f"fmnist-{split}-labels-idx1-ubyte.gz"), y[keep])
        print(split, len(keep), "images")


if __name__ == "__main__":
    main()
