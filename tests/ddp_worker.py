"""Run by test_ddp.py under `torchrun --nproc_per_node=2` (gloo, CPU): DDP gradients, collectives, a stage run."""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain_mae  # noqa: E402
from common import all_gather_cat, all_reduce_mean, setup_dist  # noqa: E402
from tests.helpers import TINY  # noqa: E402


def batch():
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(123))


def mae_model():
    torch.manual_seed(0)
    return pretrain_mae.MAE(pretrain_mae.Config(**TINY))


if __name__ == "__main__":
    out = sys.argv[1]
    rank, world, device = setup_dist()
    assert world == 2 and torch.distributed.get_backend() == "gloo"
    # 1. gradients: each rank takes half the batch and its own masks (seed 100 + rank)
    model = DDP(mae_model())
    torch.manual_seed(100 + rank)
    loss, _ = model(batch()[rank * 4:(rank + 1) * 4])
    loss.backward()
    # 2. collectives
    gathered = all_gather_cat(torch.full((2, 3), float(rank)))
    mean = all_reduce_mean(torch.tensor([float(rank)]))
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None},
                    "gathered": gathered, "mean": mean}, os.path.join(out, "ddp.pt"))
    # 3. a whole stage under torchrun: DistributedSampler, DDP wrapper, master-only files
    pretrain_mae.main(pretrain_mae.Config(**TINY, out_dir=os.path.join(out, "mae")))
    # the master still writes the run's files (checkpoint, curves, figures) after the last collective: a rank that
    # tears its group down before the other is done can abort inside gloo (seen on a loaded machine), so wait first
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
