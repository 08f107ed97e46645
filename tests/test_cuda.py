"""CUDA: every stage runs bf16 steps on the GPU, attention paths agree in bf16, torch.compile runs, the batched
augmentation gives the same numbers on GPU as on CPU, a packed store is cut on the GPU as the CPU workers cut it, and
two GPUs train under torchrun.
Skipped without CUDA (the default CI machine has none); run on a GPU machine: python -m pytest -q tests/test_cuda.py"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch

import analyze
import augment
import distill
import finetune
import pretrain_contrastive as pc
import pretrain_mae
from checkpoint import load_ckpt
from common import autocast_ctx
from data import Loader, build_dataset
from model import create_vit
from tests.helpers import TIMEOUT, TINY, quiet

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA = torch.device("cuda")


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA GPU")
class TestStagesOnCuda(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def last_row(self, out):
        return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][-1]

    def test_every_stage_runs_bf16_steps(self):
        self.assertTrue(torch.cuda.is_bf16_supported())
        cfg = dict(TINY, epochs=2, warmup_epochs=1)
        with quiet():
            pretrain_mae.main(pretrain_mae.Config(**cfg, out_dir=self.path("mae")))
            mae_ckpt = self.path("mae/ckpt.pt")
            finetune.main(finetune.Config(**cfg, init_ckpt=mae_ckpt, out_dir=self.path("ft")))
            finetune.main(finetune.Config(**{**cfg, "mode": "scratch", "accum_steps": 2, "batch_size_per_gpu": 8,
                                             "compile": True, "out_dir": self.path("scratch")}))
            for method in ("mocov3", "dino"):
                pc.main(pc.Config(**cfg, method=method, head_hidden_dim=64, head_out_dim=32, local_crops=2,
                                  local_crop_size=8, compile=method == "mocov3", out_dir=self.path(method)))
            distill.main(distill.Config(**cfg, teacher_ckpt=mae_ckpt, out_dir=self.path("dmae")))
            res = analyze.main(analyze.Config(ckpt=self.path("dmae/ckpt.pt"), ckpt2=self.path("ft/best.pt"),
                                              num_images=64, batch_size=32, out_dir=self.path("an")))
        for out in ("mae", "ft", "scratch", "mocov3", "dino", "dmae"):
            row = self.last_row(self.path(out))
            self.assertTrue(all(v == v for v in row.values() if isinstance(v, float)), out)  # no NaN
            self.assertEqual(row["epoch"], 2, out)
        self.assertEqual(load_ckpt(self.path("mae/ckpt.pt"))["config"]["num_heads"], 2)
        self.assertEqual(len(res["cka"]), 3)
        model = create_vit("micro", img_size=16, patch_size=4, num_classes=10).to(CUDA)
        with autocast_ctx(CUDA):
            self.assertEqual(model(torch.randn(2, 3, 16, 16, device=CUDA)).dtype, torch.bfloat16)

    def test_sdpa_and_explicit_attention_agree_in_bf16(self):
        torch.manual_seed(0)
        model = create_vit("tiny", img_size=224, patch_size=16, num_classes=10).to(CUDA).eval()
        x = torch.randn(8, 3, 224, 224, device=CUDA)
        with torch.no_grad(), autocast_ctx(CUDA):
            fused = model(x).float()
            explicit, attns, _ = model(x, return_attn=True)
        torch.testing.assert_close(explicit.float(), fused, atol=0.05, rtol=0.05)
        self.assertEqual(attns[-1].shape, (8, 12, 197, 197))

    def test_compile_runs(self):
        with quiet():
            pretrain_mae.main(pretrain_mae.Config(**TINY, compile=True, out_dir=self.path("compiled")))
        self.assertGreater(self.last_row(self.path("compiled"))["loss"], 0)

    def test_augmentation_matches_cpu(self):
        g = torch.Generator().manual_seed(0)
        u8 = torch.randint(0, 256, (8, 3, 40, 40), generator=g, dtype=torch.uint8)
        box = [torch.tensor(v) for v in ([0, 3, 5, 1, 0, 7, 2, 4], [1, 0, 6, 2, 3, 0, 8, 5],
                                         [40, 30, 20, 35, 12, 33, 38, 16],
                                         [39, 32, 25, 30, 18, 33, 30, 20])]
        cpu = augment.crop_resize(u8, *box, 32)
        gpu = augment.crop_resize(u8.to(CUDA), *[b.to(CUDA) for b in box], 32)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-2, rtol=1e-4)
        x = cpu.clamp(0, 255) / 255
        f = torch.linspace(0.1, 1.9, 8)
        for name in augment.OPS:
            arg = {"Rotate": f * 15, "Posterize": torch.arange(8.0) % 5, "Solarize": f * 120, "SolarizeAdd": f * 50,
                   "ShearX": f / 6, "ShearY": -f / 6, "TranslateX": f / 5, "TranslateY": -f / 5}.get(name, f)
            torch.testing.assert_close(augment.apply_op(x.to(CUDA), name, arg.to(CUDA)).cpu(),
                                       augment.apply_op(x, name, arg), atol=2e-3, rtol=0, msg=name)
        for op in (augment.adjust_hue, augment.adjust_contrast):
            torch.testing.assert_close(op(x.to(CUDA), (f - 1).to(CUDA) / 10).cpu(), op(x, (f - 1) / 10), atol=1e-4,
                                       rtol=0)
        torch.testing.assert_close(augment.gaussian_blur(x.to(CUDA), f.to(CUDA) + 0.1, 5).cpu(),
                                   augment.gaussian_blur(x, f + 0.1, 5), atol=1e-4, rtol=0)

    def test_a_store_is_cut_on_the_gpu_as_the_workers_cut_it(self):
        from study.bench import make_jpegs
        root, store = self.path("jpegs"), self.path("store")
        make_jpegs(root, 20, classes=2, copies=1)
        run = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "data", "pack.py"),
                              f"--data_root={root}", f"--out_dir={store}"], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        ds, _ = build_dataset("packed", store, True)
        views = [(64, (0.2, 1.0)), (32, "center")]
        cut = []  # uint8 workers on the CPU; the GPU from its memory; the GPU from pinned host batches
        for device, workers, resident in ((torch.device("cpu"), 2, None), (CUDA, 0, True), (CUDA, 2, False)):
            torch.manual_seed(0)
            loader = Loader(ds, 8, True, workers, device, views, resident=resident)
            self.assertEqual(loader.device_cut, device.type == "cuda")
            cut.append([([v.cpu() for v in crops], labels.cpu()) for crops, labels in loader])
        for (a, la), (b, lb), (c, lc) in zip(*cut):
            self.assertEqual(la.tolist(), lb.tolist())
            self.assertEqual(lb.tolist(), lc.tolist())
            for x, y, z in zip(a, b, c):
                self.assertTrue(torch.equal(y, z))  # resident or copied ahead on a side stream: bit for bit
                self.assertLessEqual(255 * (x - y).abs().max().item(), 1.001)  # uint8, floats: the rounding
        with quiet():  # a whole fine-tune from the store on the GPU
            finetune.main(finetune.Config(**{**TINY, "data": "packed", "data_root": store, "subset": 0,
                                             "mode": "scratch", "batch_size_per_gpu": 8, "img_size": 32,
                                             "num_workers": 2, "out_dir": self.path("store_ft")}))
        self.assertEqual(self.last_row(self.path("store_ft"))["epoch"], 1)

    @unittest.skipUnless(torch.cuda.device_count() >= 2, "needs two GPUs")
    def test_two_gpus_under_torchrun(self):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(os.path.dirname(HERE), "pretrain_mae.py"), "--model=micro", "--img_size=16",
                              "--subset=256", "--batch_size_per_gpu=32", "--epochs=2", "--warmup_epochs=1",
                              "--accum_steps=2", f"--out_dir={self.path('ddp')}"], env=env, capture_output=True,
                             text=True, timeout=TIMEOUT)
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        ckpt = load_ckpt(self.path("ddp/ckpt.pt"))
        self.assertEqual(len(ckpt["rng"]), 2)
        self.assertEqual(ckpt["step"], 4)  # 256 / (2 GPUs x 32) = 4 micro-batches per epoch, 2 per step, 2 epochs


if __name__ == "__main__":
    unittest.main()
