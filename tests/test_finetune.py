"""finetune.py: layer-wise lr decay, linear probing, the MAE -> fine-tune chain, loading errors."""
import json
import os
import tempfile
import unittest

import torch

import finetune
from checkpoint import load_ckpt
from common import param_groups
from model import create_vit
from tests.helpers import TINY, crash_then_resume, quiet, tiny_mae

PAPER_AUGMENTATION = dict(mixup=0.2, randaug_magnitude=10, crop_min_scale=0.08)  # not the defaults: ImageNet's


class TestFinetune(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.mae_dir, cls.mae_ckpt = tiny_mae(cls.tmp.name)
        cls.encoder = {k[len("encoder."):]: v for k, v in load_ckpt(cls.mae_ckpt)["model"].items()
                       if k.startswith("encoder.")}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_ft(self, name, **kw):
        cfg = finetune.Config(**{**TINY, "init_ckpt": self.mae_ckpt, "out_dir": os.path.join(self.tmp.name, name),
                                 **kw})
        with quiet():
            return finetune.main(cfg), cfg.out_dir

    def test_layer_decay_scales(self):
        model = create_vit("micro", img_size=16, patch_size=4, num_classes=10, global_pool=True)  # depth 2
        groups = param_groups(model, 0.05, lambda n: 0.5 ** (2 + 1 - finetune.layer_id(n, 2)))
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        named = dict(model.named_parameters())
        self.assertEqual(scale[id(named["patch_embed.proj.weight"])], 0.125)  # layer 0: decay^(depth+1)
        self.assertEqual(scale[id(named["cls_token"])], 0.125)
        self.assertEqual(scale[id(named["blocks.0.attn.qkv.weight"])], 0.25)
        self.assertEqual(scale[id(named["blocks.1.mlp.fc2.bias"])], 0.5)
        self.assertEqual(scale[id(named["head.weight"])], 1.0)
        self.assertEqual(scale[id(named["fc_norm.weight"])], 1.0)
        wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        self.assertEqual(wd[id(named["blocks.0.attn.qkv.bias"])], 0.0)  # no decay on biases and norms
        self.assertEqual(wd[id(named["blocks.0.attn.qkv.weight"])], 0.05)

    def test_linear_probe_updates_only_the_head(self):
        _, out = self.run_ft("linear", mode="linear", base_lr=0.1)
        sd = load_ckpt(os.path.join(out, "ckpt.pt"))["model"]
        for k, v in self.encoder.items():
            if k in sd:
                torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
        self.assertTrue(torch.all(sd["fc_norm.weight"] == 1))  # left as a parameter-free normalisation
        self.assertGreater(sd["head.weight"].abs().max().item(), 1e-3)  # init std 2e-5: it learned

    def test_mae_to_finetune_chain_and_eval_only(self):
        best, out = self.run_ft("ft", cutmix=1.0, epochs=2, warmup_epochs=1, drop_path=0.1)
        rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        self.assertEqual([r["epoch"] for r in rows], [1, 2])
        self.assertTrue(all(0 <= r["top1"] <= r["top5"] <= 100 for r in rows))
        self.assertEqual(best, max(r["top1"] for r in rows))
        sd = load_ckpt(os.path.join(out, "ckpt.pt"))["model"]
        self.assertFalse(torch.equal(sd["blocks.0.attn.qkv.weight"], self.encoder["blocks.0.attn.qkv.weight"]))
        top1, _ = self.run_ft("eval", eval_only=True, init_ckpt=os.path.join(out, "best.pt"))[0]
        self.assertAlmostEqual(top1, best, places=4)  # the best checkpoint reproduces its logged accuracy

    def test_resume_keeps_best_accuracy_and_weights(self):
        cfg = dict(TINY, init_ckpt=self.mae_ckpt, epochs=2, warmup_epochs=1,
                   **PAPER_AUGMENTATION)  # mixup's and RandAugment's draws resume too
        best_a, out_a = self.run_ft("res_a", **cfg)
        best_b = crash_then_resume(finetune, finetune.Config(**cfg, out_dir=os.path.join(self.tmp.name, "res_b")))
        self.assertEqual(best_a, best_b)
        a = load_ckpt(os.path.join(out_a, "ckpt.pt"))["model"]
        b = load_ckpt(os.path.join(self.tmp.name, "res_b", "ckpt.pt"))["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)

    def test_scratch_ignores_the_checkpoint(self):
        best, _ = self.run_ft("scratch", mode="scratch", init_ckpt="does/not/exist.pt")
        self.assertGreaterEqual(best, 0)

    def test_bad_checkpoint_path_and_architecture_mismatch(self):
        with self.assertRaisesRegex(FileNotFoundError, "init_ckpt not found: nope.pt"):
            self.run_ft("bad", init_ckpt="nope.pt")
        with self.assertRaisesRegex(ValueError, "holds a micro ViT .*, not cpu: drop --model or pass --model=micro"):
            self.run_ft("bad2", model="cpu")  # a micro checkpoint into a cpu-sized ViT: one line naming the flag


if __name__ == "__main__":
    unittest.main()
