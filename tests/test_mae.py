"""pretrain_mae.py: the loss learns, resume is exact, bad input is named, outputs are written."""
import contextlib
import io
import json
import os
import tempfile
import unittest
from unittest import mock

import torch
from PIL import Image

import augment
from flags import parse_config
import pretrain_mae
from checkpoint import load_ckpt
from data import build_dataset, figure_images
from model import patchify, unpatchify
from pretrain_mae import MAE, Config, main
from tests.helpers import TINY, crash_then_resume, quiet


class TestMAE(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def test_loss_decreases_when_overfitting_a_batch(self):
        torch.manual_seed(0)
        cfg = Config(**{**TINY, "out_dir": self.dir})
        data, _ = build_dataset("embedded", "", True, subset=8)
        imgs = augment.normalize(figure_images(data, 8, 16, torch.device("cpu"))[0])
        mae = MAE(cfg)
        opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
        losses = []
        for _ in range(80):
            g = torch.Generator().manual_seed(0)  # the same masks every step: a pure memorisation task
            pred, mask, *_ = mae.encode_decode(imgs, generator=g)
            loss = pretrain_mae.mae_loss(imgs, pred, mask, cfg.patch_size, cfg.norm_pix_loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self.assertLess(losses[-1], 0.5 * losses[0])

    def test_loss_only_counts_removed_patches(self):
        imgs = torch.randn(2, 3, 8, 8)
        pred = torch.zeros(2, 4, 48)
        mask = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
        bad = pred.clone()
        bad[:, 1:3] = 100.0  # errors on visible patches must not count
        loss = lambda p: pretrain_mae.mae_loss(imgs, p, mask, 4, True)
        self.assertEqual(loss(pred), loss(bad))

    def test_resume_after_interruption_matches_uninterrupted_run(self):
        cfg = dict(TINY, epochs=2, warmup_epochs=1)
        with quiet():
            straight = main(Config(**cfg, out_dir=os.path.join(self.dir, "a"))).state_dict()
        resumed = crash_then_resume(pretrain_mae, Config(**cfg, out_dir=os.path.join(self.dir, "b"))).state_dict()
        for k in straight:
            torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)
        ckpt = load_ckpt(os.path.join(self.dir, "b", "ckpt.pt"))
        self.assertEqual((ckpt["epoch"], ckpt["step"]), (2, 8))

    def test_outputs_and_checkpoint_contents(self):
        with quiet():
            main(Config(**TINY, out_dir=self.dir))
        for f in ("ckpt.pt", "log.jsonl", "config.json", "pretrain_mae.py", "recon_e001.png"):
            self.assertTrue(os.path.exists(os.path.join(self.dir, f)), f)
        ckpt = load_ckpt(os.path.join(self.dir, "ckpt.pt"))  # weights_only=True
        self.assertEqual(set(ckpt), {"model", "optimizer", "scaler", "epoch", "step", "config", "rng", "log", "stage",
                                     "code", "files"})
        self.assertEqual(ckpt["config"]["mask_ratio"], 0.75)
        self.assertEqual(ckpt["files"], ["curves.png", "recon_e001.png"])  # --resume=false removes these too
        # the code that trained it: the stage and every project module it imports, transitively
        self.assertTrue({"pretrain_mae.py", "model.py", "common.py", "checkpoint.py"} <= set(ckpt["code"]["files"]))
        row = json.loads(open(os.path.join(self.dir, "log.jsonl")).readline())
        self.assertEqual((row["epoch"], row["code"]), (1, ckpt["code"]["hash"]))
        w, h = Image.open(os.path.join(self.dir, "recon_e001.png")).size  # 8 images a row; 5 rows with norm-pix
        self.assertGreaterEqual(w, 8 * 112)  # every 16-px image drawn at least 112 px wide
        self.assertGreaterEqual(h, 5 * 112)
        self.assertLess(w, 8 * 140 + 400)

    def test_bad_flags_are_named(self):
        for argv, msg in [(["--mask_ratio=1.5"], "--mask_ratio must be in (0,1), got 1.5"),
                          (["--img_size=30"], "img_size 30 is not divisible by patch_size 4"),
                          (["--model=huge"], "model must be one of"),
                          (["--model=tinyy"], "got 'tinyy': did you mean --model=tiny?"),
                          (["--norm_pix_loss=maybe"], "expected true or false")]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit):
                parse_config(Config, argv)
            self.assertIn(msg, err.getvalue())
        self.assertEqual(parse_config(Config, ["--mask_ratio=0.6", "--norm_pix_loss=false"]).mask_ratio, 0.6)

    def test_missing_data_and_corrupt_image_are_named(self):
        with self.assertRaisesRegex(FileNotFoundError, "image folder not found"):
            main(Config(**{**TINY, "data": "imagefolder", "data_root": os.path.join(self.dir, "nope"),
                           "out_dir": os.path.join(self.dir, "out")}))
        cls = os.path.join(self.dir, "data", "train", "shirt")
        os.makedirs(cls)
        for i in range(3):
            Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(os.path.join(cls, f"ok{i}.png"))
        bad = os.path.join(cls, "broken.png")
        with open(bad, "wb") as f:
            f.write(b"\x89PNG not really an image")
        with quiet(), self.assertRaisesRegex(RuntimeError, "corrupt or unreadable image file: .*broken.png"):
            main(Config(**{**TINY, "data": "imagefolder", "data_root": os.path.join(self.dir, "data"),
                           "batch_size_per_gpu": 2, "out_dir": os.path.join(self.dir, "out")}))

    def test_non_finite_loss_stops_with_a_message(self):
        nan_loss = lambda imgs, pred, *a: pred.sum() * float("nan")  # noqa: E731
        with quiet(), mock.patch.object(pretrain_mae, "mae_loss", nan_loss):
            with self.assertRaisesRegex(FloatingPointError, "loss is nan at epoch 0, step 0"):
                main(Config(**TINY, out_dir=self.dir))



class TestWhatTheEncoderSees(unittest.TestCase):
    """Through MAE.encode_decode, whatever masking function it calls (random_masking or a student's own): the encoder
    is shown exactly the kept patches, every image loses the same share mask_ratio of its patches, and the loss is
    scored only on the removed ones, which the encoder never sees."""

    def encode(self, mae, imgs, seed=0):
        """(patches the encoder saw (B, K) by index, mask (B, L) with 1 = removed, prediction, encoder output)."""
        g = torch.Generator().manual_seed(seed)
        pred, mask, _, _, hiddens = mae.encode_decode(imgs, return_hidden=True, generator=g)
        enc = mae.encoder
        with torch.no_grad():  # every patch as the first block would see it: embedded, positioned, normalised
            every = enc.blocks[0].norm1(enc.patch_embed(imgs) + enc.pos_embed[:, 1:])  # (B, L, D)
        distance = torch.cdist(hiddens[0][:, 1:].detach(), every)  # (B, K, L): the encoder's tokens, cls (0) dropped
        self.assertLess(distance.amin(-1).max().item(), 1e-4)  # each token is one image patch, as it is
        return distance.argmin(-1), mask, pred, hiddens[-1].detach()

    def test_the_encoder_sees_exactly_the_kept_patches(self):
        torch.manual_seed(0)
        mae, imgs = MAE(Config(**TINY)).eval(), torch.randn(4, 3, 16, 16)
        seen, mask, *_ = self.encode(mae, imgs)
        for b in range(len(imgs)):
            self.assertEqual(sorted(seen[b].tolist()), torch.nonzero(mask[b] == 0).flatten().tolist())

    def test_the_mask_ratio_holds_for_every_image(self):
        torch.manual_seed(0)
        for ratio in (0.75, 0.5, 0.9):
            mae = MAE(Config(**TINY, mask_ratio=ratio)).eval()
            seen, mask, *_ = self.encode(mae, torch.randn(3, 3, 16, 16))
            keep = int(16 * (1 - ratio))  # MAE's count: int(), so 0.9 of 16 keeps 1
            self.assertEqual(mask.sum(1).tolist(), [16 - keep] * 3, ratio)
            self.assertEqual(seen.shape, (3, keep), ratio)

    def test_the_loss_counts_only_the_removed_patches_which_the_encoder_never_sees(self):
        torch.manual_seed(0)
        cfg = Config(**TINY)
        mae, imgs = MAE(cfg).eval(), torch.randn(2, 3, 16, 16)
        _, mask, pred, latent = self.encode(mae, imgs)
        removed = mask.bool()
        loss = lambda p: pretrain_mae.mae_loss(imgs, p, mask, cfg.patch_size, cfg.norm_pix_loss).item()  # noqa: E731
        self.assertEqual(loss(pred.detach().masked_fill(~removed[..., None], 100.0)), loss(pred.detach()))
        self.assertNotEqual(loss(pred.detach().masked_fill(removed[..., None], 100.0)), loss(pred.detach()))
        # new pixels in every removed patch, the same masks: the encoder's output does not move
        changed = unpatchify(torch.where(removed[..., None], torch.randn(2, 16, 48), patchify(imgs, 4)), 4, 4)
        torch.testing.assert_close(self.encode(mae, changed)[3], latent, rtol=0, atol=0)
        torch.testing.assert_close(self.encode(mae, changed)[2], pred, rtol=0, atol=0)  # nor its predictions

if __name__ == "__main__":
    unittest.main()
