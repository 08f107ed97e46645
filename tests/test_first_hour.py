"""A teacher's first hour: no message's advice destroys a checkpoint, a checkpoint of another size is one line, the
usual first tries work or say what to type, redirected logs are one line per epoch, figures say what they show."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch
from PIL import Image

import analyze
import checkpoint
import distill
import figures
import finetune
from flags import parse_config
import pretrain_contrastive as pc
import pretrain_mae
from checkpoint import load_ckpt
from common import RunError
from data import class_by_class
from tests.helpers import TIMEOUT, TINY, quiet, tiny_mae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage(*argv, cwd=ROOT):
    """Run a stage as a person would, output redirected to a pipe (not a terminal)."""
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


class TestNothingIsLost(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.mae_dir, cls.ckpt = tiny_mae(cls.tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_another_stages_run_is_never_written_over_even_with_resume_false(self):
        before = open(self.ckpt, "rb").read()
        elsewhere = os.path.join(self.tmp.name, "init.pt")
        checkpoint.save_ckpt(load_ckpt(self.ckpt), elsewhere)
        for resume in (True, False):
            with self.assertRaisesRegex(RunError, "holds a pretrain_mae.py run .*finetune.py will not write over it: "
                                                  "pass another --out_dir"):
                finetune.main(finetune.Config(**TINY, init_ckpt=elsewhere, out_dir=self.mae_dir, resume=resume))
        self.assertEqual(open(self.ckpt, "rb").read(), before)

    def test_the_checkpoint_given_to_start_from_is_never_the_output(self):
        with self.assertRaisesRegex(RunError, "which this run reads; finetune.py would write over it"):
            finetune.main(finetune.Config(**TINY, init_ckpt=self.ckpt, out_dir=self.mae_dir, resume=False))
        with self.assertRaisesRegex(RunError, "which this run reads; distill.py would write over it"):
            distill.main(distill.Config(**TINY, teacher_ckpt=self.ckpt, out_dir=self.mae_dir, resume=False))

    def test_a_checkpoint_of_another_size_is_taken_as_it_is_and_said(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            finetune.main(finetune.Config(**{**TINY, "model": ""}, init_ckpt=self.ckpt,
                                          out_dir=os.path.join(self.tmp.name, "ft")))
        self.assertIn("holds a micro ViT: --model=micro", out.getvalue())
        self.assertEqual(load_ckpt(os.path.join(self.tmp.name, "ft", "ckpt.pt"))["config"]["model"], "micro")

    def test_a_file_without_config_of_another_size_is_one_line_naming_the_flags(self):
        sd = {k[len("encoder."):]: v for k, v in load_ckpt(self.ckpt)["model"].items() if k.startswith("encoder.")}
        path = os.path.join(self.tmp.name, "timm_style.pth")
        torch.save(sd, path)  # no config: the size is read off the weights
        from model import create_vit
        from weights import load_backbone
        with self.assertRaises(ValueError) as e:
            load_backbone(create_vit("cpu", img_size=16, patch_size=4), path, verbose=False)
        self.assertNotIn("\n", str(e.exception))
        self.assertRegex(str(e.exception), "holds a micro ViT .*this model is a cpu ViT .*pass --model=micro "
                                           "--patch_size=4")

    def test_a_file_that_is_not_a_checkpoint_says_so(self):
        png = os.path.join(self.tmp.name, "photo.png")
        Image.new("RGB", (8, 8)).save(png)
        with self.assertRaisesRegex(RunError, "photo.png is not a checkpoint \\(a PNG image\\)"):
            finetune.main(finetune.Config(**TINY, init_ckpt=png, out_dir=os.path.join(self.tmp.name, "x")))

    def test_attention_and_reconstruction_of_your_own_image(self):
        out = os.path.join(self.tmp.name, "mine")
        image = os.path.join(ROOT, "data", "grace_hopper.jpg")
        with quiet():
            written = analyze.main(analyze.Config(ckpt=self.ckpt, image=[image], out_dir=out))
        self.assertEqual(written, [f"{out}/grace_hopper_attention.png", f"{out}/grace_hopper_recon.png"])
        w, h = Image.open(written[0]).size
        self.assertGreaterEqual(w, (2 + 2) * 100)  # input, 2 heads, their mean: each panel at least 100 px wide
        self.assertGreaterEqual(Image.open(written[1]).size[0], 5 * 112)  # 5 panels of at least 112 px
        vit = analyze.load_model(self.ckpt, "model", analyze.Config(), torch.device("cpu"))[0]
        crop = analyze.eval_view(image, 16)[None].float() / 255  # what analyze.py reads: the eval view
        maps = analyze.last_layer_maps(vit, crop)  # (1, heads + 1, 4, 4)
        self.assertEqual(maps.shape, (1, 3, 4, 4))
        self.assertGreater((maps[0, 0] - maps[0, 1]).abs().max().item(), 1e-4)  # the heads look at different places
        torch.testing.assert_close(maps[0, 2], maps[0, :2].mean(0))

    def test_a_run_that_fails_before_its_first_step_leaves_no_trace(self):
        out = os.path.join(self.tmp.name, "never")
        r = stage("pretrain_mae.py", "--data=imagefolder", f"--data_root={self.tmp.name}/missing", f"--out_dir={out}")
        self.assertEqual(r.returncode, 2)
        self.assertIn("image folder not found", r.stderr)
        self.assertFalse(os.path.exists(out))
        r = stage("pretrain_mae.py", "--data=imagefolder", f"--out_dir={out}")  # no root at all
        self.assertIn("--data=imagefolder needs --data_root", r.stderr)
        self.assertFalse(os.path.exists(out))


class TestFirstTries(unittest.TestCase):
    def test_a_warmup_longer_than_the_run_is_clamped_with_a_note(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            cfg = pretrain_mae.Config(epochs=1)
        self.assertEqual(cfg.warmup_epochs, 0)
        self.assertIn("--warmup_epochs 2 is longer than --epochs 1; no warm-up instead", err.getvalue())
        with contextlib.redirect_stderr(err):
            self.assertEqual(pretrain_mae.Config(epochs=5, warmup_epochs=8).warmup_epochs, 2)
        self.assertIn("--warmup_epochs 8 is longer than --epochs 5; warming up for 2 epochs instead", err.getvalue())

    def test_an_unknown_flag_suggests_the_closest_one(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit):
            parse_config(pretrain_mae.Config, ["--mask-ratio=0.9"])
        self.assertIn("--mask-ratio: did you mean --mask_ratio?", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)  # one line

    def test_help_lists_every_size_and_says_what_subset_does(self):
        for module in (pretrain_mae, finetune, pc):
            r = stage(f"{module.__name__}.py", "--help")
            text = " ".join(r.stdout.split())
            self.assertIn("micro | mini | cpu | tiny | small | base", text, module.__name__)
            self.assertIn("seeded, class-balanced subset", text, module.__name__)
        r = stage("pretrain_contrastive.py", "--help")
        text = " ".join(r.stdout.split())
        for shown in ("MoCo-v3 256 / DINO 64", "MoCo-v3 0.0 / DINO 3.0", "MoCo-v3 constant / DINO 0.4"):
            self.assertIn(shown, text)
        self.assertNotIn("-1.0", r.stdout)

    def test_top5_only_with_more_than_five_classes(self):
        with tempfile.TemporaryDirectory() as tmp:
            for split in ("train", "val"):
                for c in range(3):
                    os.makedirs(os.path.join(tmp, "imgs", split, f"c{c}"))
                    for i in range(6):
                        Image.fromarray(np.full((20, 20, 3), 40 * c + i, np.uint8)).save(
                            os.path.join(tmp, "imgs", split, f"c{c}", f"{i}.png"))
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                finetune.main(finetune.Config(**{**TINY, "subset": 0, "batch_size_per_gpu": 6}, mode="scratch",
                                              data="imagefolder", data_root=os.path.join(tmp, "imgs"),
                                              out_dir=os.path.join(tmp, "ft")))
            self.assertNotIn("top-5", out.getvalue())
            row = json.loads(open(os.path.join(tmp, "ft", "log.jsonl")).readline())
            self.assertNotIn("top5", row)
            self.assertIn("top1", row)


class TestLogs(unittest.TestCase):
    def test_a_redirected_run_is_one_line_per_epoch_numbered_alike(self):
        with tempfile.TemporaryDirectory() as tmp:
            r = stage("pretrain_mae.py", "--model=micro", "--img_size=16", "--subset=64", "--batch_size_per_gpu=16",
                      "--epochs=2", "--warmup_epochs=0", "--num_workers=0", f"--out_dir={tmp}/mae")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("\r", r.stdout + r.stderr)  # no progress bar off a terminal
        epochs = [line for line in r.stdout.splitlines() if line.startswith("ep ")]
        self.assertEqual([line.split()[1] for line in epochs], ["1/2", "2/2"])


class TestSchedules(unittest.TestCase):
    def test_weight_decay_rises_from_zero(self):  # de7dcb9 only updated groups whose weight decay was above 0
        with tempfile.TemporaryDirectory() as tmp, quiet():
            pc.main(pc.Config(**TINY, method="dino", head_hidden_dim=64, head_out_dim=32, local_crops=2,
                              local_crop_size=8, weight_decay=0.0, weight_decay_end=0.4, out_dir=tmp))
            groups = load_ckpt(os.path.join(tmp, "ckpt.pt"))["optimizer"]["param_groups"]
        decays = [g["weight_decay"] for g in groups if g["decays"]]
        self.assertTrue(decays and all(0.3 < d <= 0.4 for d in decays), decays)  # near the end of the cosine
        self.assertTrue(all(g["weight_decay"] == 0 for g in groups if not g["decays"]))  # biases and norms: never


class TestFigures(unittest.TestCase):
    def test_figure_images_are_class_balanced(self):
        self.assertEqual(class_by_class([0, 0, 0, 1, 1, 2], 4), [0, 3, 5, 1])

    def test_uniform_attention_reference_values(self):
        dist, ent = analyze.uniform_values(8, 4)
        self.assertAlmostEqual(ent, math.log(64))
        self.assertAlmostEqual(dist, analyze.patch_distances(8, 4).mean().item())
        self.assertAlmostEqual(dist, 16.5, delta=0.1)  # the 8 x 8 grid of 4-px patches (issue 19)

    def test_reconstructions_show_what_the_loss_sees(self):
        torch.manual_seed(0)
        imgs = torch.randn(2, 3, 16, 16)
        labels = {}
        for norm_pix in (True, False):
            mae = pretrain_mae.MAE(pretrain_mae.Config(**{**TINY, "norm_pix_loss": norm_pix})).eval()
            labels[norm_pix] = [label for label, _ in figures.reconstruction_rows(mae, imgs)]
        # 16 patches at ratio 0.75: 12 removed (MAE keeps int(16 x 0.25) = 4), said beside the row
        self.assertEqual(labels[False], ["original", "masked input\n(grey: 12 of\n16 removed)", "reconstruction"])
        self.assertEqual(labels[True], labels[False] + ["prediction\n(patch units;\nteal: visible)",
                                                        "target\n(patch units;\nteal: visible)"])
        mae = pretrain_mae.MAE(pretrain_mae.Config(**TINY)).eval()  # norm-pix: visible patches teal, never grey
        rows = dict(figures.reconstruction_rows(mae, imgs))
        mask = rows["masked input\n(grey: 12 of\n16 removed)"]
        teal = torch.tensor([0.0, 0.5, 0.5])[:, None, None]
        visible = (rows["target\n(patch units;\nteal: visible)"] - teal).abs().amax(1) < 1e-6  # (B, H, W)
        self.assertAlmostEqual(visible.float().mean().item(), 1 - pretrain_mae.Config().mask_ratio, places=5)
        self.assertEqual(mask.shape, imgs.shape)


if __name__ == "__main__":
    unittest.main()
