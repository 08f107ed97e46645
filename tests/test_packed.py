"""The packed store (data/pack.py, --data=packed): crops from the store against crops from the files at the same boxes,
exact resume and worker-count independence, the device path (forced on the CPU) against the workers', two gloo ranks
reading disjoint shares, an interrupted pack, and every bad store through the command a user types."""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import augment
import data
import pretrain_mae
import store as store_module  # `store` names a test's store
from checkpoint import load_ckpt
from common import BadData, MissingFile
from study import reproduce
from study.bench import make_jpegs
from tests.helpers import TINY, crash_then_resume, quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("pack", os.path.join(ROOT, "data", "pack.py"))  # the command's module
pack = sys.modules["pack"] = importlib.util.module_from_spec(_spec)  # its pool's workers find `pack.decode` there
_spec.loader.exec_module(pack)

CPU = torch.device("cpu")
PACKED = dict(TINY, data="packed", subset=0)  # the micro MAE of the stage tests, on a store


def pack_command(root, out, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "pack.py"), f"--data_root={root}",
                           f"--out_dir={out}", *flags], cwd=ROOT, capture_output=True, text=True)


def stage_command(store, out_dir, *flags):
    return subprocess.run([sys.executable, "pretrain_mae.py", "--model=micro", "--img_size=16", "--epochs=1",
                           "--warmup_epochs=0", "--batch_size_per_gpu=8", "--data=packed", f"--data_root={store}",
                           f"--out_dir={out_dir}", *flags], cwd=ROOT, capture_output=True, text=True)


class StoreTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        """JPEGs at ImageNet's sizes (375x500 to 480x640, bench.make_jpegs), 3 classes, packed once by the command."""
        cls.tmp = tempfile.mkdtemp()
        cls.jpegs, cls.store = os.path.join(cls.tmp, "jpegs"), os.path.join(cls.tmp, "store")
        make_jpegs(cls.jpegs, 24, classes=3, copies=2)
        cls.packed = pack_command(cls.jpegs, cls.store)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)


class TestPackAndRead(StoreTest):
    def test_pack_says_its_size_first_then_writes_a_store_every_stage_reads(self):
        self.assertEqual(self.packed.returncode, 0, self.packed.stderr)
        first, *_, last = self.packed.stdout.strip().splitlines()
        self.assertRegex(first, r"^packing 48 train \+ 24 val images of 3 classes, shorter side 256 px, on \d+ cores: "
                                r"about \d+\.\d\d GB")
        self.assertIn(f"wrote {self.store}", last)
        self.assertFalse(os.path.exists(self.store + ".partial"))
        with open(os.path.join(self.store, "meta.json")) as f:
            meta = json.load(f)
        self.assertEqual((meta["version"], meta["short_side"], meta["classes"], meta["images"]),
                         (store_module.STORE_VERSION, 256, ["c0", "c1", "c2"], dict(train=48, val=24)))
        for train in (True, False):
            files, _ = data.build_dataset("imagefolder", self.jpegs, train)
            store, classes = data.build_dataset("packed", self.store, train)
            self.assertEqual((classes, len(store), store.labels.tolist()), (3, len(files), files.labels))
            for i in (0, 5):  # each image's own aspect ratio, its shorter side 256
                with Image.open(files.samples[i][0]) as img:
                    self.assertEqual(tuple(store.shapes[i].tolist()[::-1]), store_module.stored_size(*img.size, 256))
                    self.assertEqual(min(store.shapes[i].tolist()), 256)

    def test_store_crops_match_file_crops_at_the_same_boxes(self):
        """The tolerance README states: mean |difference| under 3 levels for RandomResizedCrop 224 (0.08-1), under 0.5
        for the eval centre crop (the store's 256 is its resize)."""
        files, _ = data.build_dataset("imagefolder", self.jpegs, False)
        store, _ = data.build_dataset("packed", self.store, False)
        views = [(224, (0.08, 1.0)), (224, "center")]
        diffs = [[], []]
        for i in range(len(files)):
            height, width = Image.open(files.samples[i][0]).size[::-1]
            h, w = store.shapes[i].tolist()
            stored = Image.fromarray(store.image(i).numpy())
            for seed in range(3):
                from_file = files.crops(i, seed, views)
                for k, view in enumerate(views):  # the file's box, in the store's pixels
                    top, left, bh, bw = augment.crop_box(seed, k, height, width, view)
                    sy, sx = h / height, w / width
                    cut = TF.pil_to_tensor(stored.resize((224, 224), Image.BICUBIC, box=(
                        left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)))
                    diffs[k].append((cut.float() - from_file[k].float()).abs().mean().item())
        self.assertLess(sum(diffs[0]) / len(diffs[0]), 3.0)
        self.assertLess(sum(diffs[1]) / len(diffs[1]), 0.5)
        self.assertGreater(sum(diffs[0]) / len(diffs[0]), 0)  # a resample loses something: the check can fail

    def test_the_workers_resize_a_store_box_as_pil_does(self):
        """The workers cut a store with torch's uint8 kernel (4x PIL's speed): PIL's filter, to the rounding."""
        store, _ = data.build_dataset("packed", self.store, True)
        views = [(224, (0.08, 1.0)), (64, (0.2, 1.0)), (224, "center"), (112, "center")]
        diffs = []
        for i in range(0, len(store), 3):
            h, w = store.shapes[i].tolist()
            stored = Image.fromarray(store.image(i).numpy())
            for k, (crop, view) in enumerate(zip(store.crops(i, i, views), views)):
                top, left, bh, bw = (round(v) for v in augment.crop_box(i, k, h, w, view))
                pil = TF.pil_to_tensor(stored.resize((view[0], view[0]), Image.BICUBIC,
                                                     box=(left, top, left + bw, top + bh)))
                self.assertEqual((crop.shape, crop.dtype), (pil.shape, pil.dtype))
                diffs.append((crop.float() - pil.float()).abs().mean().item())
        self.assertLess(sum(diffs) / len(diffs), 0.05)

    def test_the_device_resize_weighs_pixels_as_torchs_antialiased_bicubic(self):
        """cut_on_device's batched products, per sample size: torch's interpolate(antialias=True), shrinking (the
        kernel widened) and enlarging, the taps past each sample's size dropped."""
        g = torch.Generator().manual_seed(0)
        sizes = torch.tensor([3, 17, 32, 33, 80, 224, 301])
        rows = torch.rand(len(sizes), 301, generator=g) * 255
        for out_size in (16, 32, 224):
            weights = store_module.resize_weights(sizes, out_size, 301, CPU)
            self.assertEqual(weights.shape, (len(sizes), out_size, 301))
            for b, size in enumerate(sizes.tolist()):
                ref = F.interpolate(rows[b, :size].view(1, 1, 1, size), (1, out_size), mode="bicubic",
                                    antialias=True, align_corners=False).flatten()
                torch.testing.assert_close(weights[b] @ rows[b], ref, atol=1e-3, rtol=0)
                self.assertEqual(weights[b, :, size:].abs().sum().item(), 0)

    def test_workers_cut_the_same_crops_whatever_their_number_and_the_device_path_the_same_boxes(self):
        store, _ = data.build_dataset("packed", self.store, True)
        views = [(32, (0.08, 1.0)), (16, "center")]
        outs = []
        for workers, device_cut, resident in ((0, False, None), (2, False, None), (0, True, True), (2, True, False)):
            torch.manual_seed(0)
            loader = data.Loader(store, 8, True, workers, CPU, views, device_cut=device_cut, resident=resident)
            outs.append([(crops, labels) for crops, labels in loader])
        self.assertEqual(len(outs[0]), 6)
        for other in outs[1:]:
            self.assertEqual([labels.tolist() for _, labels in other], [labels.tolist() for _, labels in outs[0]])
        for (a, _), (b, _) in zip(outs[0], outs[1]):  # the seeds come from the training process: bit for bit
            self.assertTrue(all(torch.equal(x, y) for x, y in zip(a, b)))
        for (a, _), (b, _) in zip(outs[2], outs[3]):  # resident pixels or gathered from the map: the same cut
            self.assertTrue(all(torch.equal(x, y) for x, y in zip(a, b)))
        for (a, _), (b, _) in zip(outs[0], outs[2]):  # uint8 in the workers, floats on the device: the same boxes
            for x, y in zip(a, b):
                self.assertEqual((x.shape, x.dtype), (y.shape, y.dtype))
                self.assertLessEqual(255 * (x - y).abs().max().item(), 1.001)  # a level at most: the rounding
        subset = store.select(torch.arange(5, 21))  # a --subset's pixels alone on the device
        torch.manual_seed(0)
        again = next(iter(data.Loader(subset, 4, False, 0, CPU, views, device_cut=True, resident=True)))
        torch.manual_seed(0)
        mapped = next(iter(data.Loader(subset, 4, False, 0, CPU, views, device_cut=True, resident=False)))
        self.assertTrue(all(torch.equal(x, y) for x, y in zip(again[0], mapped[0])))
        self.assertEqual(again[1].tolist(), store.labels[5:9].tolist())

    def test_a_run_from_the_store_resumes_bit_identical(self):
        cfg = lambda name: pretrain_mae.Config(**dict(PACKED, epochs=2, batch_size_per_gpu=8, num_workers=1),
                                               data_root=self.store, out_dir=self.path(name))
        with quiet():
            pretrain_mae.main(cfg("straight"))
        crash_then_resume(pretrain_mae, cfg("resumed"))
        a, b = (load_ckpt(self.path(f"{n}/ckpt.pt")) for n in ("straight", "resumed"))
        self.assertEqual(a["step"], b["step"])
        for k, v in a["model"].items():
            self.assertTrue(torch.equal(v, b["model"][k]), k)
        self.assertEqual([r["loss"] for r in a["log"]], [r["loss"] for r in b["log"]])

    def test_a_run_from_the_files_resumes_bit_identical_with_workers(self):
        # persistent workers draw their base seed once: it must not come from the run's RNG, which a resume restores
        cfg = lambda name: pretrain_mae.Config(**dict(PACKED, data="imagefolder", epochs=3, batch_size_per_gpu=8,
                                                      num_workers=1), data_root=self.jpegs, out_dir=self.path(name))
        with quiet():
            pretrain_mae.main(cfg("files_straight"))
        crash_then_resume(pretrain_mae, cfg("files_resumed"))
        a, b = (load_ckpt(self.path(f"{n}/ckpt.pt")) for n in ("files_straight", "files_resumed"))
        self.assertEqual([r["loss"] for r in a["log"]], [r["loss"] for r in b["log"]])
        for k, v in a["model"].items():
            self.assertTrue(torch.equal(v, b["model"][k]), k)

    def test_classes_select_and_relabel_and_figures_cut_the_eval_view(self):
        names = self.path("two.txt")
        with open(names, "w") as f:
            f.write("c2\nc0\n")
        ds, classes = data.build_dataset("packed", self.store, True, classes=names, subset=10)
        self.assertEqual((classes, ds.names, len(ds)), (2, ["c2", "c0"], 10))
        whole, _ = data.build_dataset("packed", self.store, True)
        for i in range(len(ds)):  # c2 -> 0, c0 -> 1: the list's order, as --data=imagefolder
            original = int(whole.labels[(whole.starts == ds.starts[i]).nonzero()[0, 0]])
            self.assertEqual(int(ds.labels[i]), {2: 0, 0: 1}[original])
        figs, labels = data.figure_images(ds, 2, 16, CPU)
        self.assertEqual((figs.shape, labels), ((2, 3, 16, 16), ["c2", "c0"]))


class TestTwoRanks(StoreTest):
    def test_two_gloo_ranks_read_disjoint_shares(self):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        out = self.path("ranks")
        os.makedirs(out)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(ROOT, "tests", "packed_ddp_worker.py"), self.store, out], env=env,
                             capture_output=True, text=True, cwd=ROOT)
        self.assertEqual(run.returncode, 0, run.stdout[-2000:] + run.stderr[-3000:])
        read = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
        for epoch in range(2):
            a, b = (set(read[r][epoch]) for r in range(2))
            self.assertEqual(len(a), 24)  # 48 images, batch 8 a rank: 3 batches each
            self.assertFalse(a & b)  # disjoint shares, together the whole split
            self.assertEqual(a | b, set(range(48)))
        self.assertNotEqual(read[0][0], read[0][1])  # set_epoch: another shuffle


class TestInterruptedPack(StoreTest):
    def test_an_interrupted_pack_leaves_no_store_and_resumes(self):
        out = self.path("again")
        real, calls = pack.pack_split, []

        def stop_at_val(split, *args):  # Ctrl-C once train/ is packed
            calls.append(split)
            if split == "val":
                raise KeyboardInterrupt
            return real(split, *args)

        with quiet(), mock.patch.object(pack, "pack_split", stop_at_val), self.assertRaises(KeyboardInterrupt):
            pack.main(pack.Config(data_root=self.jpegs, out_dir=out))
        self.assertEqual(calls, ["train", "val"])
        self.assertFalse(os.path.exists(out))  # never a store that reads as complete
        for root in (out, out + ".partial"):
            with self.assertRaisesRegex(BadData, f"half-written store .*run data/pack.py again with --out_dir={out}, "
                                                 "it resumes$"):  # the advice followed below
                data.build_dataset("packed", root, True)
        kept = os.stat(os.path.join(out + ".partial", "train.pixels")).st_mtime_ns
        run = pack_command(self.jpegs, out)  # the same command: train/ kept, val/ packed, renamed
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("train: packed by an earlier, interrupted run; kept", run.stdout)
        self.assertEqual(os.stat(os.path.join(out, "train.pixels")).st_mtime_ns, kept)
        for name in ("train.pixels", "val.pixels"):  # the same bytes as a pack that was never stopped
            with open(os.path.join(out, name), "rb") as a, open(os.path.join(self.store, name), "rb") as b:
                self.assertEqual(a.read(), b.read())
        refused = pack_command(self.jpegs, out)
        self.assertEqual((refused.returncode, refused.stderr.strip().splitlines()), (2, [
            f"pack.py: error: {out} exists; give --out_dir a new folder (a store is written once)"]))

    def test_an_undecodable_file_is_named_and_no_store_written(self):
        root, out = self.path("bad_jpegs"), self.path("bad_store")
        shutil.copytree(self.jpegs, root)
        with open(os.path.join(root, "val", "c1", "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not a JPEG after all")
        run = pack_command(root, out)
        self.assertEqual(run.returncode, 2)
        lines = run.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, run.stderr)
        self.assertIn("broken.jpg", lines[0])
        self.assertIn("unreadable.txt", lines[0])
        self.assertFalse(os.path.exists(out))
        # the file removed, the same command finishes the store, without the earlier list of bad files
        os.remove(os.path.join(root, "val", "c1", "broken.jpg"))
        self.assertEqual(pack_command(root, out).returncode, 0)
        self.assertFalse(os.path.exists(os.path.join(out, "unreadable.txt")))


class TestPlan(StoreTest):
    def test_the_in100_plan_on_packed_stores_has_no_run_bound_by_its_data(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # ImageNet-100's store (not here: its nominal size), flowers' store
            reproduce.main(reproduce.Config(preset="in100", seeds="0", gpus="", plan=True, data="packed",
                                            data_root=self.path("in100.store"), transfer_data="packed",
                                            transfer_root=self.store))
        lines = out.getvalue().splitlines()
        runs = [x for x in lines if " GPU-h " in x]
        self.assertEqual(len(runs), 37)  # a seed's 35 and the 2 raw-pixel floors
        self.assertTrue(all("data: store, cut on the GPU" in x for x in runs))
        self.assertIn("data path: 0 of 37 runs need more worker cores per GPU than their --num_workers=10 to keep up",
                      lines)
        self.assertFalse([x for x in lines if "pack" in x and "data/pack.py" in x])

    def test_the_plan_on_an_image_folder_says_to_pack_first_with_its_disk_and_time(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            reproduce.main(reproduce.Config(preset="in100", seeds="0", gpus="", plan=True))
        n = 126689 + 5000  # ImageNet-100's train and val images
        self.assertIn("  pack the ImageNet folder first: python data/pack.py --data_root=/imagenet "
                      f"--classes=imagenet100 --out_dir=STORE ({n:,} images, about {n * 256 * 341 * 3 / 1e9:.0f} "
                      f"GB, about {n / (reproduce.PACK_SPEED * 16) / 60:.0f} min on 16 cores at "
                      f"{reproduce.PACK_SPEED} img/s a core), then --data=packed --data_root=STORE: the batches are "
                      "cut on the GPU",
                      out.getvalue().splitlines())
        self.assertIn("--transfer_data=flowers102: pack it too (python data/pack.py --data=flowers102", out.getvalue())


class TestBadStores(StoreTest):
    def broken(self, name):
        root = self.path(name)
        shutil.copytree(self.store, root)
        return root

    def assert_one_line(self, store, expected, *flags):
        out_dir = self.path("never")
        run = stage_command(store, out_dir, *flags)
        self.assertEqual(run.returncode, 2, run.stderr)
        lines = run.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, run.stderr)
        self.assertRegex(lines[0], "^pretrain_mae.py: error: " + expected)
        self.assertFalse(os.path.exists(out_dir))  # nothing written

    def test_each_bad_store_is_one_line_through_the_stage_command(self):
        other = self.broken("v0")
        with open(os.path.join(other, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(other, "meta.json"), "w") as f:
            json.dump(dict(meta, version=0), f)
        self.assert_one_line(other, f"{other} is a store of format version 0, this code reads version 1: pack its "
                                    "images again into a new store")
        cut = self.broken("truncated")
        with open(os.path.join(cut, "train.pixels"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 1000)
        self.assert_one_line(cut, f"{cut}: train.pixels holds .* bytes where its index says .*: a truncated or "
                                  "half-written store")
        half = self.broken("half.partial")
        os.remove(os.path.join(half, "meta.json"))
        self.assert_one_line(half, f"{half} is a half-written store \\(its pack was interrupted\\): run data/pack.py "
                                   f"again with --out_dir={half.removesuffix('.partial')}, it resumes")
        damaged = self.broken("damaged")
        os.remove(os.path.join(damaged, "meta.json"))
        self.assert_one_line(damaged, f"{damaged} holds a store's pixels but no meta.json \\(pack.py writes it "
                                      "last\\): a damaged store; pack its images again")
        names = self.path("classes.txt")
        with open(names, "w") as f:
            f.write("c0\nn01440764\n")
        self.assert_one_line(self.store, f"class n01440764 of {names} is not in the store {self.store}, which holds 3 "
                                         "classes", f"--classes={names}")
        self.assert_one_line(self.jpegs, f"{self.jpegs} is not a packed store \\(no meta.json\\): pack it first, "
                                         f"python data/pack.py --data_root={self.jpegs} --out_dir=STORE, then")
        self.assert_one_line("", "--data=packed needs --data_root: a store written by python data/pack.py")

    def test_a_missing_split_or_class_in_process(self):
        gone = self.broken("no_val")
        os.remove(os.path.join(gone, "val.index.pt"))
        with self.assertRaisesRegex(BadData, "the val split is missing or unreadable"):
            data.build_dataset("packed", gone, False)
        with self.assertRaisesRegex(MissingFile, "--classes file not found"):
            data.build_dataset("packed", self.store, True, classes=self.path("nope.txt"))


if __name__ == "__main__":
    unittest.main()
