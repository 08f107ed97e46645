"""augment.py and data.py: batched ops equal torchvision's functional ops for fixed parameters, torchvision's sampling
rules, the device-side loaders, and gradient accumulation."""
import os
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import augment
import data
import finetune
from checkpoint import load_ckpt
from data import Loader, build_dataset, figure_images
from tests.helpers import TINY, quiet

CPU = torch.device("cpu")


def images(n=6, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


class TestEqualsTorchvision(unittest.TestCase):
    def setUp(self):
        self.u8 = images()
        self.x = self.u8.float() / 255

    def test_crop_resize_is_torchvisions_resized_crop(self):
        n = len(self.u8)
        full = [torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), torch.full((n,), 24),
                torch.full((n,), 24)]
        ours = augment.crop_resize(self.u8, *full, 40)
        ref = TF.resize(self.u8.float(), [40, 40], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)  # a whole-image crop: exactly the same points
        box = [torch.full((n,), 5), torch.full((n,), 3), torch.full((n,), 12), torch.full((n,), 16)]
        ours = augment.crop_resize(self.u8, *box, 32)
        ref = TF.resized_crop(self.u8.float(), 5, 3, 12, 16, [32, 32], TF.InterpolationMode.BICUBIC, antialias=False)
        # inside, the same; at the crop's border we sample the real neighbouring pixels, torchvision repeats the edge
        torch.testing.assert_close(ours[..., 4:-4, 4:-4], ref[..., 4:-4, 4:-4], atol=1e-3, rtol=0)
        torch.manual_seed(0)
        flipped = augment.random_flip(ours.repeat(50, 1, 1, 1))  # each sample itself or its mirror image, p 0.5
        mirrored = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, ours.repeat(50, 1, 1, 1))]
        same = [torch.equal(f, o) for f, o in zip(flipped, ours.repeat(50, 1, 1, 1))]
        self.assertTrue(all(m or s for m, s in zip(mirrored, same)))
        self.assertAlmostEqual(sum(mirrored) / len(mirrored), 0.5, delta=0.1)
        torch.manual_seed(0)  # the CPU's indexing and the GPU's where: the same samples, bit for bit
        flip = torch.rand(300) < 0.5
        self.assertTrue(torch.equal(flipped, torch.where(flip.view(-1, 1, 1, 1), ours.repeat(50, 1, 1, 1).flip(-1),
                                                         ours.repeat(50, 1, 1, 1))))
        x = torch.rand(4, 3, 8, 8)
        before = x.clone()
        augment.random_flip(x)
        self.assertTrue(torch.equal(x, before))  # a new tensor: the caller's batch is left as it was

    def test_colour_ops(self):
        f = torch.tensor([0.6, 1.4, 1.0, 0.2, 1.9, 0.9])
        for ours, ref in ((augment.adjust_brightness, TF.adjust_brightness), (augment.adjust_contrast,
                                                                              TF.adjust_contrast),
                          (augment.adjust_saturation, TF.adjust_saturation)):
            want = torch.stack([ref(img, float(v)) for img, v in zip(self.x, f)])
            torch.testing.assert_close(ours(self.x, f), want, atol=1e-5, rtol=0, msg=ref.__name__)
        hue = torch.tensor([-0.1, 0.05, 0.0, 0.1, -0.03, 0.07])
        want = torch.stack([TF.adjust_hue(img, float(h)) for img, h in zip(self.x, hue)])
        torch.testing.assert_close(augment.adjust_hue(self.x, hue), want, atol=1e-4, rtol=0)
        sigma = torch.tensor([0.3, 0.8, 1.5, 2.0, 0.1, 1.0])
        want = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s)] * 2) for img, s in zip(self.x, sigma)])
        torch.testing.assert_close(augment.gaussian_blur(self.x, sigma, 5), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(augment.grayscale(self.x), TF.rgb_to_grayscale(self.x, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(augment.solarize(self.x, torch.full((6,), 0.5)), TF.solarize(self.x, 0.5))

    def test_level_ops_on_uint8(self):
        as_u8 = lambda y: (y * 255).round().to(torch.uint8)  # noqa: E731
        torch.testing.assert_close(as_u8(augment.equalize(self.x)), TF.equalize(self.u8))
        torch.testing.assert_close(as_u8(augment.posterize(self.x, torch.full((6,), 3))), TF.posterize(self.u8, 3))
        torch.testing.assert_close(as_u8(augment.autocontrast(self.x)), TF.autocontrast(self.u8), atol=1, rtol=0)
        torch.testing.assert_close(as_u8(augment.solarize_levels(self.x, torch.full((6,), 100.0))),
                                   TF.solarize(self.u8, 100))
        for factor in (0.1, 1.9):  # PIL's Sharpness, through torchvision's tensor port of it
            want = TF.adjust_sharpness(self.x, factor)
            torch.testing.assert_close(augment.sharpness(self.x, torch.full((6,), factor)), want, atol=1e-5, rtol=0)

    def test_center_crop_is_timms_eval_transform(self):
        u8 = images(4, 28)
        want = torch.stack([TF.center_crop(TF.resize(img.float(), 36, TF.InterpolationMode.BICUBIC, antialias=True), 32)
                            for img in u8]) / 255
        torch.testing.assert_close(augment.center_crop(u8, 32), want.clamp(0, 1), atol=1e-4, rtol=0)


class TestSampling(unittest.TestCase):
    def test_rrc_params_follow_torchvision_rules(self):
        torch.manual_seed(0)
        top, left, h, w = augment.rrc_params(20000, 48, 64, (0.08, 1.0))
        self.assertTrue(bool(((top >= 0) & (left >= 0) & (top + h <= 48) & (left + w <= 64)).all()))
        area = (h * w).float() / (48 * 64)
        self.assertGreaterEqual(area.min().item(), 0.08 * 0.9)  # rounding of w and h
        ratio = (w.float() / h.float())
        self.assertTrue(bool(((ratio > 0.7) & (ratio < 1.45)).all()))
        # the same distribution as torchvision's RandomResizedCrop.get_params (first fitting try of 10)
        from torchvision.transforms import RandomResizedCrop
        ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 48, 64), [0.08, 1.0], [3 / 4, 4 / 3])
                            for _ in range(20000)]).float()
        for ours, theirs in ((torch.log(ratio), torch.log(ref[:, 3] / ref[:, 2])), (area, ref[:, 2] * ref[:, 3] / 3072),
                             ((left + w / 2).float(), ref[:, 1] + ref[:, 3] / 2)):
            self.assertAlmostEqual(ours.mean().item(), theirs.mean().item(), delta=0.03 * theirs.std().item() + 0.01)
            self.assertAlmostEqual(ours.std().item(), theirs.std().item(), delta=0.05 * theirs.std().item())

    def test_the_per_sample_box_follows_torchvisions_rule_too(self):
        import random
        from torchvision.transforms import RandomResizedCrop
        rng, img = random.Random(0), torch.zeros(3, 300, 400)
        ours = [augment.rrc_box(rng, 300, 400, (0.08, 1.0)) for _ in range(3000)]
        torch.manual_seed(0)
        ref = [RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)]
        for k in range(4):  # top, left, h, w: the same distribution (means within 3%)
            a, b = (sum(box[k] for box in boxes) / len(boxes) for boxes in (ours, ref))
            self.assertAlmostEqual(a / b, 1.0, delta=0.03, msg=k)
        self.assertTrue(all(0 <= t <= 300 - h and 0 <= lft <= 400 - w for t, lft, h, w in ours))
        self.assertEqual(augment.rrc_box(rng, 100, 1000, (0.9, 1.0)), (0, 433, 100, 133))  # too wide: centred 4:3

    def test_rrc_falls_back_to_the_centre_crop(self):
        top, left, h, w = augment.rrc_params(50, 10, 100, (0.9, 1.0))  # 10:1 never fits a ratio of 3/4..4/3
        self.assertEqual((h.unique().tolist(), w.unique().tolist()), ([10], [13]))  # largest crop at ratio 4/3
        self.assertEqual((top.unique().tolist(), left.unique().tolist()), ([0], [43]))

    def test_per_sample_draws(self):
        torch.manual_seed(0)
        u8 = images(64, 32)
        out = augment.random_resized_crop(u8, 16, (0.08, 1.0))
        self.assertEqual(out.shape, (64, 3, 16, 16))
        self.assertGreater(out.std(0).mean().item(), 0.05)  # different crops per sample
        torch.manual_seed(1)
        top, left, h, w = augment.rrc_params(64, 32, 32, (0.08, 1.0))
        ref = torch.stack([TF.resized_crop(img.float(), int(t), int(lft), int(hh), int(ww), [16, 16],
                                           TF.InterpolationMode.BICUBIC, antialias=False)
                           for img, t, lft, hh, ww in zip(u8, top, left, h, w)]) / 255
        torch.manual_seed(1)
        ours = augment.random_resized_crop(u8, 16, (0.08, 1.0))  # each sample's own box, torchvision's resize
        self.assertLess((ours - ref.clamp(0, 1)).abs().mean().item(), 0.02)
        views = augment.byol_view(out, 1.0, 1.0)
        self.assertEqual(views.shape, out.shape)
        self.assertTrue(bool(((views >= 0) & (views <= 1)).all()))


class TestLoaders(unittest.TestCase):
    def test_memory_loader_is_indices_over_a_device_tensor_cut_when_read(self):
        ds, _ = build_dataset("embedded", "", True, subset=100)
        torch.manual_seed(0)
        batches = list(Loader(ds, 32, True, 0, CPU, [(16, (0.08, 1.0)), (12, "center")]))
        self.assertEqual(len(batches), 3)  # drop_last
        crops, labels = batches[0]
        before = torch.get_rng_state()
        first = crops[0]  # the box is drawn here, when the stage reads the view, not when the loader yields it
        self.assertFalse(torch.equal(before, torch.get_rng_state()))
        self.assertEqual((first.dtype, first.shape, crops[1].shape), (torch.float32, (32, 3, 16, 16), (32, 3, 12, 12)))
        self.assertTrue(bool((first >= 0).all() and (first <= 1).all()))
        self.assertTrue(torch.equal(crops[1], augment.center_crop(crops.images, 12)))  # the eval view: centre crop
        seen = torch.cat([b[1] for b in batches])
        self.assertEqual(len(seen), 96)
        torch.manual_seed(0)
        again = torch.cat([b[1] for b in Loader(ds, 32, True, 0, CPU, [(16, "center")])])
        self.assertTrue(torch.equal(seen, again))  # the order comes from torch's RNG: resumable

    def test_files_are_cropped_in_the_workers_by_torchvisions_rule(self):
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as root:
            for split in ("train", "val"):
                for c in ("a", "b"):
                    os.makedirs(os.path.join(root, split, c))
                    for i in range(4):  # smooth photos-like content, ImageNet-like sizes
                        base = rng.integers(0, 255, (12, 16, 3)).astype(np.uint8)
                        img = Image.fromarray(base).resize((320 - 40 * i, 240 + 20 * i), Image.BICUBIC)
                        img.save(os.path.join(root, split, c, f"{i}.jpg"), quality=95)
            ds, _ = build_dataset("imagefolder", root, True)
            crops = [(48, (0.08, 1.0)), (24, (0.05, 0.4))]
            outs = []
            # the boxes come from seeds the training process draws, not from the workers
            for workers in (0, 2):
                torch.manual_seed(0)
                outs.append([v for cut, _ in Loader(ds, 4, True, workers, CPU, crops) for v in cut])
            self.assertEqual([tuple(v.shape) for v in outs[0]], [(4, 3, 48, 48), (4, 3, 24, 24)] * 2)
            for other in outs[1:]:
                self.assertEqual(len(other), len(outs[0]))
                self.assertTrue(all(torch.equal(a, b) for a, b in zip(outs[0], other)))
            self.assertEqual(outs[0][0].dtype, torch.float32)
            for seed in range(20):  # each crop is torchvision's RandomResizedCrop of the PIL image, for its box
                path = ds.samples[seed % len(ds)][0]
                full = Image.open(path).convert("RGB")
                ours = data.crop_pil(Image.open(path), seed, crops)
                for k, (size, _) in enumerate(crops):
                    top, left, h, w = augment.crop_box(seed, k, full.height, full.width, crops[k])
                    ref = TF.pil_to_tensor(TF.resized_crop(full, top, left, h, w, [size, size],
                                                            TF.InterpolationMode.BICUBIC))
                    diff = (ours[k].float() - ref.float()).abs()
                    self.assertLess(diff.mean().item(), 2.0, (seed, k))  # draft decode and box filter: a level or two
            torch.manual_seed(0)  # the eval crop in the workers is timm's centre crop
            cut, _ = next(iter(Loader(build_dataset("imagefolder", root, False)[0], 4, False, 0, CPU,
                                      [(32, "center")])))
            whole = [TF.pil_to_tensor(Image.open(p).convert("RGB")) for p, _ in build_dataset("imagefolder", root,
                                                                                              False)[0].samples[:4]]
            diff = (cut[0] - torch.cat([augment.center_crop(img[None], 32) for img in whole])).abs()
            self.assertLess(diff.mean().item(), 0.01)

    def test_file_loader_decodes_in_workers(self):
        with tempfile.TemporaryDirectory() as root:
            for split in ("train", "val"):
                for c in ("a", "b"):
                    os.makedirs(os.path.join(root, split, c))
                    for i in range(3):
                        Image.new("RGB", (20 + i, 17), (i * 60, 0, 200)).save(os.path.join(root, split, c, f"{i}.jpg"))
            ds, classes = build_dataset("imagefolder", root, False)
            crops, labels = next(iter(Loader(ds, 4, False, 1, CPU, [(16, "center")])))
            self.assertEqual(classes, 2)
            self.assertEqual([tuple(c.shape) for c in crops], [(4, 3, 16, 16)])
            self.assertEqual(labels.tolist(), [0, 0, 0, 1])
            figs, names = figure_images(ds, 2, 16, CPU)  # figures: the eval view, cut as the workers cut it
            self.assertEqual(names, ["a", "b"])  # one of each class first, named by its folder
            self.assertEqual(figs.shape, (2, 3, 16, 16))
            torch.testing.assert_close(figs[0], crops[0][0], rtol=0, atol=0)  # the workers' cut of the same image


class TestAccumulation(unittest.TestCase):
    def test_two_half_batches_make_one_full_batch_step(self):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dict(TINY, subset=16, mode="scratch", mixup=0.0, randaug_magnitude=0, crop_min_scale=1.0)
            out = {}
            # no flips, and whole-image crops whatever the draws: every run sees the same 16 images, once
            with quiet(), mock.patch.object(augment, "random_flip", lambda x: x):
                for name, batch, accum in (("full", 16, 1), ("accum", 8, 2), ("two_steps", 8, 1)):
                    finetune.main(finetune.Config(**{**cfg, "batch_size_per_gpu": batch, "accum_steps": accum,
                                                     "out_dir": os.path.join(tmp, name)}))
                    out[name] = load_ckpt(os.path.join(tmp, name, "ckpt.pt"))
        self.assertEqual([out[k]["step"] for k in ("full", "accum", "two_steps")], [1, 1, 2])
        for k, v in out["full"]["model"].items():  # K accumulated half-batches = one full batch, same lr
            torch.testing.assert_close(out["accum"]["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        gap = max((out["accum"]["model"][k] - v).abs().max().item() for k, v in out["full"]["model"].items())
        differ = max((out["two_steps"]["model"][k] - v).abs().max().item() for k, v in out["full"]["model"].items())
        self.assertGreater(differ, 100 * gap)  # while two plain half-batch steps land elsewhere


if __name__ == "__main__":
    unittest.main()
