"""pretrain_contrastive.py: EMA, InfoNCE, DINO centre and loss by hand; a few steps of each method."""
import math
import os
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_contrastive as pc
from checkpoint import load_ckpt
from model import create_vit
from weights import load_backbone
from tests.helpers import TINY, crash_then_resume, quiet


class TestPieces(unittest.TestCase):
    def test_ema_moves_teacher_by_the_right_amount(self):
        torch.manual_seed(0)
        student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
        t0 = [p.clone() for p in teacher.parameters()]
        pc.ema_update(teacher, student, 0.9)
        for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
            torch.testing.assert_close(t, 0.9 * t_old + 0.1 * s)
        self.assertFalse(any(p.grad is not None for p in teacher.parameters()))

    def test_info_nce_matches_hand_computation(self):
        q = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
        k = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
        T = 0.5
        qn = [v / v.norm() for v in q]
        kn = [v / v.norm() for v in k]
        total = 0.0
        for i in range(3):
            logits = [float(qn[i] @ kn[j]) / T for j in range(3)]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        self.assertAlmostEqual(pc.info_nce(q, k, T).item(), total / 3 * 2 * T, places=5)

    def test_dino_forward_centres_sharpens_then_moves_the_centre(self):
        torch.manual_seed(0)
        cfg = pc.Config(**TINY, method="dino", head_hidden_dim=16, head_out_dim=8, local_crops=1, local_crop_size=8)
        student = pc.DINO(create_vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0), cfg)
        teacher = student.make_teacher()
        student.schedule(10, 5)
        old_center = torch.randn(1, 8)  # not constant: softmax ignores a constant shift
        student.center.copy_(old_center)
        crops = [torch.randn(4, 3, cfg.img_size, cfg.img_size)] * 2 + [torch.randn(4, 3, 8, 8)]
        teacher_out, student_out = teacher.embed(crops[:2]).detach(), student.embed(crops).detach()
        want = 0.9 * old_center + 0.1 * teacher_out.mean(0, keepdim=True)  # centre_momentum 0.9
        loss, _ = student(crops, teacher, 0)
        torch.testing.assert_close(student.center, want)
        # the loss on the old centre at step 0's teacher temperature (warmup_teacher_temp 0.04)
        t = F.softmax((teacher_out - old_center) / 0.04, dim=-1).chunk(2)
        s = F.log_softmax(student_out / 0.1, dim=-1).chunk(3)
        pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # teacher crop, student crop (never the same crop)
        torch.testing.assert_close(loss, sum(-(t[a] * s[b]).sum(-1).mean() for a, b in pairs) / 4)

    def test_dino_loss_matches_hand_computation(self):
        torch.manual_seed(0)
        B, K = 2, 5
        student = torch.randn(3 * B, K)  # 2 global crops + 1 local
        teacher = torch.randn(2 * B, K)
        center = torch.randn(1, K)
        t = F.softmax((teacher - center) / 0.04, dim=-1).chunk(2)
        s = F.log_softmax(student / 0.1, dim=-1).chunk(3)
        pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # teacher crop, student crop (never the same crop)
        want = sum(-(t[a] * s[b]).sum(-1).mean() for a, b in pairs) / 4
        targets = F.softmax((teacher - center) / 0.04, dim=-1)
        torch.testing.assert_close(pc.dino_loss(student, targets), want)


class TestStages(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def run_method(self, method):
        cfg = pc.Config(**TINY, method=method, head_hidden_dim=64, head_out_dim=32, local_crops=2, local_crop_size=8,
                        out_dir=os.path.join(self.tmp.name, method))
        with quiet():
            student, teacher = pc.main(cfg)
        ckpt = load_ckpt(os.path.join(cfg.out_dir, "ckpt.pt"))
        self.assertEqual(ckpt["epoch"], 1)
        # the teacher moved by EMA but is not the student
        s, t = ckpt["model"]["encoder.blocks.0.attn.qkv.weight"], ckpt["teacher"]["encoder.blocks.0.attn.qkv.weight"]
        self.assertFalse(torch.equal(s, t))
        # the saved backbone loads into the ViT that finetune.py and analyze.py build
        for key in ("model", "teacher"):
            vit = create_vit("micro", img_size=16, patch_size=4, num_classes=10, global_pool=True)
            load_backbone(vit, os.path.join(cfg.out_dir, "ckpt.pt"), key, verbose=False)
            torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, ckpt[key]["encoder.blocks.0.attn.qkv.weight"])
        return ckpt

    def test_mocov3_steps(self):
        self.run_method("mocov3")

    def test_dino_resume_restores_teacher_and_center(self):
        cfg = dict(TINY, method="dino", head_hidden_dim=64, head_out_dim=32, local_crops=2, local_crop_size=8,
                   epochs=2, warmup_epochs=1)
        with quiet():
            s1, t1 = pc.main(pc.Config(**cfg, out_dir=os.path.join(self.tmp.name, "a")))
        s2, t2 = crash_then_resume(pc, pc.Config(**cfg, out_dir=os.path.join(self.tmp.name, "b")))
        for a, b in [(s1, s2), (t1, t2)]:
            for k, v in a.state_dict().items():
                torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)
        c1 = load_ckpt(os.path.join(self.tmp.name, "a", "ckpt.pt"))["model"]["center"]  # the centre is a buffer
        torch.testing.assert_close(load_ckpt(os.path.join(self.tmp.name, "b", "ckpt.pt"))["model"]["center"], c1,
                                   rtol=0, atol=0)

    def test_dino_steps(self):
        ckpt = self.run_method("dino")
        self.assertEqual(ckpt["model"]["center"].shape, (1, 32))
        self.assertGreater(ckpt["model"]["center"].abs().sum().item(), 0)



class SimSiam(pc.Method):
    """A student's method (Chen & He 2021, in brief): no teacher, a stop-gradient instead; only the defaults it has."""
    title, defaults = "SimSiam", dict(base_lr=0.05, weight_decay=1e-4, head_hidden_dim=64, head_out_dim=32,
                                      batch_size_per_gpu=16)

    def __init__(self, encoder, cfg):
        super().__init__()
        self.cfg, self.encoder = cfg, encoder
        self.projector = pc.mlp(2, encoder.embed_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=True)
        self.predictor = pc.mlp(2, cfg.head_out_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=False)

    def forward(self, crops, teacher, step):
        z1, z2 = (self.projector(self.encoder(x)) for x in crops)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2, {}


class TestANewMethod(unittest.TestCase):
    def test_a_method_without_a_teacher_states_only_its_defaults_and_trains(self):
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(pc.METHODS, simsiam=SimSiam):
            cfg = pc.Config(**{**TINY, "batch_size_per_gpu": None}, method="simsiam", out_dir=tmp)
            self.assertEqual((cfg.base_lr, cfg.batch_size_per_gpu, cfg.clip_grad), (0.05, 16, None))
            self.assertIsNone(cfg.ema_momentum)  # no teacher, no momentum
            self.assertEqual(cfg.weight_decay_end, cfg.weight_decay)  # a weight decay it does not schedule: constant
            with mock.patch.object(SimSiam, "defaults", {}), self.assertRaisesRegex(ValueError, "--base_lr"):
                pc.Config(**TINY, method="simsiam")  # a setting every run needs, stated by neither: one line
            with quiet():
                student, teacher = pc.main(cfg)
            self.assertIsNone(teacher)
            ckpt = load_ckpt(os.path.join(tmp, "ckpt.pt"))
            self.assertNotIn("teacher", ckpt)
            self.assertNotIn("momentum", ckpt["log"][0])
            self.assertEqual(ckpt["step"], 4)  # 64 images, batch 16: it trained through the public loop
            self.assertTrue(-1 <= ckpt["log"][0]["loss"] <= 1)  # a negative cosine similarity

if __name__ == "__main__":
    unittest.main()
