"""The raw-pixel floors (pixels.py) against hand computations, and the transfer recipe's augmentations for digits."""
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

import augment
import finetune
import pixels
from data import build_dataset
from study import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestLogisticRegression(unittest.TestCase):
    def test_the_fit_reaches_the_optimum_computed_by_hand(self):
        # two points x = +1 (class 0) and x = -1 (class 1): by symmetry the optimum has logits (a x, -a x), no bias,
        # and the objective log(1 + e^{-2a}) + l2 a^2 is smallest where l2 a = 1 / (1 + e^{2a}); bisection solves it
        l2 = 0.1
        lo, hi = 0.0, 10.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if l2 * mid < 1 / (1 + math.exp(2 * mid)) else (lo, mid)
        predict = pixels.fit_logistic(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]), 2, l2, 100)
        logits = predict(torch.tensor([[1.0]]))[0]
        self.assertAlmostEqual((logits[0] - logits[1]).item(), 2 * lo, places=3)  # L-BFGS in float32

    def test_the_l2_strength_is_chosen_on_training_images_only(self):
        # a set whose training labels are noise above x = 0: only a strong l2 generalises to the held-out fifth
        g = torch.Generator().manual_seed(0)
        x = torch.randn(200, 50, generator=g)
        y = (x[:, 0] > 0).long()
        cfg = pixels.Config(l2="0,10")
        chosen, scores = pixels.choose_l2(x, y, 2, cfg)
        self.assertEqual(len(scores), 2)
        self.assertEqual(chosen, cfg.strengths[int(np.argmax(scores))])


class TestFloorsCommand(unittest.TestCase):
    def test_the_knn_floor_is_the_nearest_neighbour_of_the_standardised_pixels(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "floor.json")
            r = subprocess.run([sys.executable, "pixels.py", "--subset=200", "--k=1", "--l2=0.01", "--img_size=16",
                                f"--out={out}"], cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("raw pixels of embedded (200 train / 1000 test images, 16 px)", r.stdout)
            result = json.load(open(out))
        # by hand: the same eval view, one channel (grey), standardised by the training images, cosine 1-NN
        train, _ = build_dataset("embedded", "", True, subset=200)
        test, _ = build_dataset("embedded", "", False)
        view = lambda ds: augment.center_crop(ds.chw(), 16)[:, 0].flatten(1).double().numpy()
        a, b = view(train), view(test)
        mean, std = a.mean(0), np.maximum(a.std(0, ddof=1), 1e-3)
        a, b = (a - mean) / std, (b - mean) / std
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        nearest = (b @ a.T).argmax(1)
        expected = 100 * (train.labels.numpy()[nearest] == test.labels.numpy()).mean()
        self.assertAlmostEqual(result["knn_top1"], expected, places=3)
        self.assertEqual((result["train_images"], result["test_images"], result["linear_l2"]), (200, 1000, 0.01))
        self.assertGreater(result["linear_top1"], 50)  # ten classes: chance is 10

    def test_bad_l2_list_is_one_line(self):
        r = subprocess.run([sys.executable, "pixels.py", "--l2=a,b"], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("l2 must be a comma-separated list of numbers", r.stderr)


class TestTransferRecipe(unittest.TestCase):
    def test_digits_are_never_mirrored(self):
        torch.manual_seed(0)
        crops = (torch.rand(64, 3, 8, 8),)
        off = finetune.train_transform(finetune.Config(hflip=False, randaug_magnitude=0))(crops)
        on = finetune.train_transform(finetune.Config(randaug_magnitude=0))(crops)
        self.assertTrue(torch.equal(off, augment.normalize(crops[0])))
        flipped = (on != augment.normalize(crops[0])).flatten(1).any(1)
        self.assertTrue(0 < flipped.sum() < 64)  # the default still flips about half

    def test_the_studys_transfer_runs_keep_digits_unmirrored_and_have_a_floor_at_each_size(self):
        runs = reproduce.study(reproduce.Config(quick=True))
        transfer = [r for r in runs if r.tags.get("eval") == "transfer"]
        self.assertTrue(transfer)
        self.assertTrue(all(not r.cfg.hflip for r in transfer))
        floors = {r.tags["shots"]: r.cfg for r in runs if r.tags.get("eval") == "transfer_floor"}
        for r in transfer:  # the floor fits exactly the labelled images the transfer run trains on
            self.assertEqual((floors[r.tags["shots"]].data, floors[r.tags["shots"]].subset), (r.cfg.data, r.cfg.subset))


if __name__ == "__main__":
    unittest.main()
