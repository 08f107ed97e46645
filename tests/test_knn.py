"""knn.py: the weighted vote by hand, the random floor, a checkpoint of ours; the MNIST slice."""
import math
import os
import tempfile
import unittest

import torch
import torch.nn.functional as F

import knn
import pretrain_mae
from data import build_dataset
from tests.helpers import TINY, quiet

SMALL = dict(model="micro", img_size=16, patch_size=4, subset=500, batch_size=250, num_workers=0)


class TestKNN(unittest.TestCase):
    def test_weighted_vote_by_hand(self):
        train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
        labels = torch.tensor([0, 0, 1, 1])
        query = F.normalize(torch.tensor([[0.6, 0.8]]), dim=1)
        scores = knn.knn_classify(train, labels, query, k=3, temperature=0.5, num_classes=2)
        sims = (query @ train.T)[0]
        nearest = sims.topk(3).indices.tolist()  # 3 (class 1), 2 (class 1), 1 (class 0)
        want = [sum(math.exp(sims[i].item() / 0.5) for i in nearest if labels[i] == c) for c in (0, 1)]
        torch.testing.assert_close(scores[0], torch.tensor(want))
        self.assertEqual(scores.argmax(1).item(), 1)

    def test_random_floor_and_a_trained_backbone(self):
        with quiet():
            floor = knn.main(knn.Config(ckpt="random", data="mnist", **SMALL))
        self.assertEqual((floor["train_images"], floor["test_images"]), (500, 1000))
        self.assertGreater(floor["top1"], 25)  # raw pixels through a random ViT already beat chance (10)
        self.assertLessEqual(floor["top1"], floor["top5"])
        with tempfile.TemporaryDirectory() as tmp, quiet():
            pretrain_mae.main(pretrain_mae.Config(**TINY, out_dir=tmp))
            ours = knn.main(knn.Config(ckpt=os.path.join(tmp, "ckpt.pt"), **SMALL, pool="mean",
                                       out=os.path.join(tmp, "knn.json")))
            self.assertTrue(os.path.exists(os.path.join(tmp, "knn.json")))
        self.assertTrue(0 < ours["top1"] <= 100)

    def test_mnist_slice_is_real_and_balanced(self):
        train, classes = build_dataset("mnist", "", True)
        test, _ = build_dataset("mnist", "", False)
        self.assertEqual((len(train), len(test), classes), (3900, 1000, 10))
        self.assertEqual(torch.bincount(test.labels).tolist(), [100] * 10)
        self.assertEqual(train.images.shape[1:], (28, 28))
        self.assertGreater(train.images.float().mean().item(), 20)  # digits: mostly black with bright strokes
        self.assertLess(train.images.float().mean().item(), 60)


if __name__ == "__main__":
    unittest.main()
