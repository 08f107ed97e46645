"""distill.py and analyze.py: CKA and attention statistics by hand, the distillation step, the whole chain."""
import json
import math
import os
import tempfile
import unittest
from unittest import mock

import torch

import analyze
import distill
import finetune
from checkpoint import load_ckpt
from model import create_vit
from tests.helpers import TINY, quiet


def linear_cka(x, y):
    K, L = analyze.gram(x), analyze.gram(y)
    h = analyze.hsic_unbiased
    return analyze.cka(h(K, L), h(K, K)[None], h(L, L)[None]).item()


class TestAnalysisMath(unittest.TestCase):
    def test_cka_identity_orthogonal_and_scale_invariance(self):
        torch.manual_seed(0)
        x = torch.randn(64, 20)
        q, _ = torch.linalg.qr(torch.randn(20, 20))
        self.assertAlmostEqual(linear_cka(x, x), 1.0, places=6)
        self.assertAlmostEqual(linear_cka(x, x @ q), 1.0, places=6)
        self.assertAlmostEqual(linear_cka(x, 3.5 * x), 1.0, places=6)
        self.assertLess(abs(linear_cka(x, torch.randn(64, 20))), 0.2)  # unbiased: near 0 for independent features

    def test_attention_distance_and_entropy_by_hand(self):
        d = analyze.patch_distances(2, 16)  # 2x2 grid of 16-pixel patches
        uniform = torch.full((1, 1, 4, 4), 0.25)
        # from any patch of a 2x2 grid: itself 0, two neighbours 16, the diagonal 16*sqrt(2)
        self.assertAlmostEqual(analyze.attention_distance(uniform, d).item(), (0 + 16 + 16 + 16 * math.sqrt(2)) / 4,
                               places=4)
        self.assertEqual(analyze.attention_distance(torch.eye(4)[None, None], d).item(), 0.0)
        self.assertAlmostEqual(analyze.attention_entropy(uniform).item(), math.log(4), places=6)
        self.assertEqual(analyze.attention_entropy(torch.eye(4)[None, None]).item(), 0.0)


class TestDistillAndChain(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        # a larger teacher (cpu size: 6 layers, 3 heads, width 96) saved the way pretrain_mae.py saves
        torch.manual_seed(1)
        teacher = create_vit("cpu", img_size=16, patch_size=4, num_classes=0)
        cls.teacher_ckpt = os.path.join(cls.tmp.name, "teacher.pt")
        torch.save({"model": {"encoder." + k: v for k, v in teacher.state_dict().items()}, "config": {"model": "cpu"}},
                   cls.teacher_ckpt)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def cfg(self, name, **kw):
        return distill.Config(**{**TINY, "teacher_ckpt": self.teacher_ckpt, "out_dir": os.path.join(self.tmp.name,
                                                                                                    name),
                                 **kw})

    def test_distill_loss_decreases_and_teacher_stays_frozen(self):
        torch.manual_seed(0)
        cfg = self.cfg("overfit", hidden_layers="2")
        teacher = distill.load_teacher(cfg, torch.device("cpu"))
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        model = distill.DistilledMAE(cfg, teacher)
        self.assertNotIn("teacher", " ".join(model.state_dict()))  # never saved with the student
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        imgs = torch.randn(8, 3, 16, 16)
        attn_losses = []
        for _ in range(40):
            loss, parts = model(imgs, teacher)
            opt.zero_grad()
            loss.backward()
            opt.step()
            attn_losses.append(parts["attn"].item())
            self.assertGreater(parts["hidden"].item(), 0)
        self.assertLess(sum(attn_losses[-5:]), 0.7 * sum(attn_losses[:5]))
        for k, v in teacher.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        self.assertTrue(all(p.grad is None for p in teacher.parameters()))

    def test_bad_distill_flags(self):
        with self.assertRaisesRegex(ValueError, "needs --teacher_ckpt"):
            distill.Config(**TINY)
        with self.assertRaisesRegex(ValueError, "comma-separated integers"):
            self.cfg("x", attn_layers="last")
        with self.assertRaisesRegex(FileNotFoundError, "teacher checkpoint not found"):
            distill.main(self.cfg("x", teacher_ckpt="missing.pt"))

    def test_chain_distill_finetune_analyze(self):
        with quiet():
            distill.main(self.cfg("dmae"))
        dmae = os.path.join(self.tmp.name, "dmae", "ckpt.pt")
        keys = load_ckpt(dmae)["model"].keys()
        self.assertTrue(any(k.startswith("attn_adapters.0") for k in keys))
        row = json.loads(open(os.path.join(self.tmp.name, "dmae", "log.jsonl")).readline())
        self.assertGreater(row["attn"], 0)
        ft_dir = os.path.join(self.tmp.name, "ft")
        with quiet():
            finetune.main(finetune.Config(**TINY, init_ckpt=dmae, out_dir=ft_dir))
            res = analyze.main(analyze.Config(ckpt=dmae, ckpt2=os.path.join(ft_dir, "best.pt"), num_images=32,
                                              batch_size=16, out_dir=os.path.join(self.tmp.name, "an")))
        self.assertEqual(len(res["cka"]), 3)  # depth 2 + 1 representations per model
        self.assertEqual(len(res["attn_distance"]), 2)  # two models
        self.assertEqual(torch.tensor(res["attn_entropy"][0]).shape, (2, 2))  # (depth, heads)
        self.assertTrue(all(0 < e <= math.log(16) + 1e-6 for e in torch.tensor(res["attn_entropy"]).flatten()))
        for f in ("analysis.json", "cka.png", "attn_distance.png", "attn_entropy.png", "recon.png"):
            self.assertTrue(os.path.exists(os.path.join(self.tmp.name, "an", f)), f)
        titles = []
        recon = lambda mae, imgs, title, path, seed=0: titles.append(title)  # noqa: E731
        with quiet(), mock.patch.object(analyze.figures, "save_reconstructions", recon):
            self_res = analyze.main(analyze.Config(ckpt=dmae, num_images=32, batch_size=16,
                                                   out_dir=os.path.join(self.tmp.name, "an1")))
        self.assertEqual(titles, [f"D-MAE reconstructions of 8 test images (centre crops), {dmae}"])  # not "MAE"
        for i in range(3):
            self.assertAlmostEqual(self_res["cka"][i][i], 1.0, places=5)


if __name__ == "__main__":
    unittest.main()
