"""Run by test_packed.py under `torchrun --nproc_per_node=2` (gloo, CPU): which images of a store each rank reads."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from common import setup_dist  # noqa: E402

if __name__ == "__main__":
    store, out = sys.argv[1:3]
    rank, world, device = setup_dist()
    assert world == 2 and torch.distributed.get_backend() == "gloo"
    read, cut = [], data.PackedImages.crops
    data.PackedImages.crops = lambda self, i, seed, views: read.append(i) or cut(self, i, seed, views)
    loader = data.Loader(data.build_dataset("packed", store, True)[0], 8, True, 0, device, [(16, (0.2, 1.0))])
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        read.clear()
        for _ in loader:
            pass
        epochs.append(list(read))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(epochs, f)
    torch.distributed.destroy_process_group()
