"""Two gloo processes under torchrun give the same gradients as one process; collectives are correct."""
import os
import subprocess
import sys
import tempfile
import unittest

import torch

from checkpoint import load_ckpt
from tests.ddp_worker import batch, mae_model
from tests.helpers import TIMEOUT

HERE = os.path.dirname(os.path.abspath(__file__))


class TestDDP(unittest.TestCase):
    def test_two_process_gloo_matches_one_process(self):
        with tempfile.TemporaryDirectory() as out:
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            env["OMP_NUM_THREADS"] = "1"
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  os.path.join(HERE, "ddp_worker.py"), out], env=env, capture_output=True, text=True,
                                 timeout=TIMEOUT)
            self.assertEqual(run.returncode, 0, run.stdout[-3000:] + run.stderr[-3000:])
            got = torch.load(os.path.join(out, "ddp.pt"), weights_only=True)
            ckpt = load_ckpt(os.path.join(out, "mae", "ckpt.pt"))
        # reference: one process, both halves with the same masks, gradients averaged as DDP does
        model = mae_model()
        for rank in range(2):
            torch.manual_seed(100 + rank)
            loss, _ = model(batch()[rank * 4:(rank + 1) * 4])
            (loss / 2).backward()
        self.assertEqual(len(got["grads"]), len([p for p in model.parameters() if p.requires_grad]))
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        self.assertEqual(got["mean"].item(), 0.5)
        self.assertEqual(len(ckpt["rng"]), 2)  # one RNG state per rank, for an exact resume
        self.assertEqual(ckpt["config"]["batch_size_per_gpu"], 16)


if __name__ == "__main__":
    unittest.main()
