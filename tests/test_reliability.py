"""Reliability: every kill point resumes into agreeing files, one run per folder, only the same run resumes, bad
checkpoints / data / flags are one clear line."""
import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch
from PIL import Image

import analyze
import checkpoint
import data
import distill
import finetune
from flags import parse_config
import pretrain_contrastive as pc
import pretrain_mae
from checkpoint import load_ckpt
from common import BadData, RunError
from tests.helpers import TIMEOUT, TINY, quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def make_image_folder(root, train_classes, val_classes, per_class=4):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                Image.new("RGB", (20, 20), (40 * c, 10 * i, 0)).save(os.path.join(root, split, name, f"{i}.png"))


class KilledAt(Exception):
    pass


class TestKillPoints(unittest.TestCase):
    """Kill the run just before each file it writes (best.pt, ckpt.pt, log.jsonl, every epoch), resume, and check
    that best.pt, ckpt.pt and log.jsonl agree with each other and with an uninterrupted run."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.cfg = dict(TINY, mode="scratch", epochs=2, warmup_epochs=1, mixup=0.2, randaug_magnitude=10,
                       crop_min_scale=0.08)  # the paper's augmentation, whose draws a resume must restore too
        with quiet():
            finetune.main(finetune.Config(**cls.cfg, out_dir=cls.path("straight")))
        cls.straight = log_rows(cls.path("straight"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def path(cls, *names):
        return os.path.join(cls.tmp.name, *names)

    def run_killed_before_write(self, k, out_dir):
        """Run finetune, killed just before its k-th file write; then resume it. Returns the writes seen."""
        writes = []
        real_save, real_log = checkpoint.save_ckpt, checkpoint.write_log

        def guard(real, name):
            def write(*args):
                writes.append(name)
                if len(writes) == k + 1:
                    raise KilledAt(name)
                return real(*args)
            return write

        with quiet(), mock.patch.object(checkpoint, "save_ckpt", guard(real_save, "ckpt")), \
                mock.patch.object(checkpoint, "write_log", guard(real_log, "log")):
            with contextlib.suppress(KilledAt):
                finetune.main(finetune.Config(**self.cfg, out_dir=out_dir))
        with quiet():
            finetune.main(finetune.Config(**self.cfg, out_dir=out_dir))
        return writes

    def test_every_kill_point_resumes_into_agreeing_files(self):
        writes = self.run_killed_before_write(10 ** 6, self.path("count"))  # never killed: count the writes
        self.assertGreaterEqual(len(writes), 5)  # best.pt, ckpt.pt, log.jsonl; then ckpt.pt, log.jsonl at least
        for k in range(len(writes)):
            out = self.path(f"kill{k}")
            self.run_killed_before_write(k, out)
            rows, ckpt = log_rows(out), load_ckpt(os.path.join(out, "ckpt.pt"))
            best = load_ckpt(os.path.join(out, "best.pt"))
            self.assertEqual([r["epoch"] for r in rows], [1, 2], f"kill {k}")  # every epoch exactly once
            for a, b in zip(rows, self.straight):  # and the same numbers as the uninterrupted run
                self.assertEqual((a["top1"], a["loss"], a["best_top1"]), (b["top1"], b["loss"], b["best_top1"]))
            self.assertEqual(best["top1"], rows[-1]["best_top1"])  # best.pt is the best the log claims
            self.assertEqual(best["epoch"], ckpt["best"]["epoch"])
            with quiet():
                top1, _ = finetune.main(finetune.Config(**{**self.cfg, "mode": "finetune"}, eval_only=True,
                                                        init_ckpt=os.path.join(out, "best.pt"), out_dir=out))
            self.assertAlmostEqual(top1, rows[-1]["best_top1"], places=4)  # and evaluates to it

    def test_stale_best_is_re_derived_on_resume(self):
        out = self.path("stale")
        cfg = dict(self.cfg, epochs=1, warmup_epochs=0)
        with quiet():
            finetune.main(finetune.Config(**cfg, out_dir=out))
        checkpoint.save_ckpt({"model": {}, "epoch": 0, "top1": 10.4}, os.path.join(out, "best.pt"))  # an older best.pt
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(io.StringIO()):
            finetune.main(finetune.Config(**cfg, out_dir=out))  # resumes a finished run: trains nothing, says so
        self.assertRegex(said.getvalue(), r"ckpt.pt holds a complete run \(1 epochs; the last: loss [\d.]+, .*top1 "
                                          r"[\d.]+.*\): nothing to train; another --out_dir starts a new one")
        best, ckpt = load_ckpt(os.path.join(out, "best.pt")), load_ckpt(os.path.join(out, "ckpt.pt"))
        self.assertEqual((best["epoch"], best["top1"]), (1, ckpt["best_top1"]))
        self.assertEqual(sorted(best["model"]), sorted(ckpt["model"]))

    def test_mae_log_keeps_every_epoch_after_a_kill_before_the_log(self):
        out = self.path("mae")
        cfg = pretrain_mae.Config(**{**TINY, "epochs": 2, "warmup_epochs": 1, "out_dir": out})
        calls = []

        def kill_first_log(*args):
            calls.append(1)
            raise KilledAt

        with quiet(), mock.patch.object(checkpoint, "write_log", kill_first_log), contextlib.suppress(KilledAt):
            pretrain_mae.main(cfg)
        self.assertFalse(os.path.exists(os.path.join(out, "log.jsonl")))  # the row of epoch 1 was never written
        with quiet():
            pretrain_mae.main(cfg)
        self.assertEqual([r["epoch"] for r in log_rows(out)], [1, 2])


class TestOutDir(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.out = os.path.join(self.tmp.name, "run")

    def tearDown(self):
        self.tmp.cleanup()

    def mae(self, **kw):
        return pretrain_mae.Config(**{**TINY, "out_dir": self.out, **kw})

    def test_second_run_in_the_same_folder_is_refused_and_a_dead_lock_is_not(self):
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                                   "import checkpoint; lock = checkpoint.lock_out_dir(sys.argv[2]); "
                                   "print('locked', flush=True); time.sleep(3600)", ROOT, self.out],
                                  stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(holder.stdout.readline().strip(), "locked")
            with self.assertRaisesRegex(RunError, f"out_dir {self.out} is in use by pid {holder.pid}"):
                pretrain_mae.main(self.mae())
            self.assertFalse(os.path.exists(os.path.join(self.out, "config.json")))  # refused before writing
        finally:
            holder.kill()  # kill -9: the OS drops its lock
            holder.wait()
        with quiet():
            pretrain_mae.main(self.mae())
        self.assertTrue(os.path.exists(os.path.join(self.out, "ckpt.pt")))

    def test_temporary_checkpoint_name_is_unique_per_process(self):
        seen = []
        real = os.replace
        with mock.patch.object(checkpoint.os, "replace", lambda a, b: (seen.append(a), real(a, b))):
            checkpoint.save_ckpt({"x": 1}, os.path.join(self.tmp.name, "c.pt"))
        self.assertIn(str(os.getpid()), seen[0])

    def test_disk_full_keeps_the_previous_checkpoint_and_no_partial_file(self):
        path = os.path.join(self.tmp.name, "ckpt.pt")
        checkpoint.save_ckpt({"epoch": 1}, path)
        with mock.patch.object(checkpoint.os, "fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
            with self.assertRaisesRegex(BadData, f"no space left on device while writing {path}"):
                checkpoint.save_ckpt({"epoch": 2, "w": torch.zeros(1000)}, path)
        self.assertEqual(sorted(os.listdir(self.tmp.name)), ["ckpt.pt"])  # the partial .tmp is gone
        self.assertEqual(load_ckpt(path), {"epoch": 1})

    def test_resume_refuses_another_run_and_accepts_a_longer_one(self):
        with quiet():
            pretrain_mae.main(self.mae())
        config = open(os.path.join(self.out, "config.json")).read()
        for kw, diff in [(dict(mask_ratio=0.6), "mask_ratio 0.75 -> 0.6"), (dict(model="cpu"),
                                                                            "model 'micro' -> 'cpu'"),
                         (dict(img_size=32), "img_size 16 -> 32"), (dict(norm_pix_loss=False), "norm_pix_loss True")]:
            with self.assertRaisesRegex(RunError, diff) as e:
                pretrain_mae.main(self.mae(**kw))
            self.assertIn("--resume=false", str(e.exception))
            self.assertEqual(open(os.path.join(self.out, "config.json")).read(), config)  # untouched
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            pretrain_mae.main(self.mae(epochs=2, num_workers=1))
        self.assertIn("resume: epochs changed from 1 to 2; the schedules are recomputed for 2 epochs", out.getvalue())
        self.assertEqual([r["epoch"] for r in log_rows(self.out)], [1, 2])
        # the same code: no note, one script copy, both rows name it
        self.assertNotIn("code changed", out.getvalue())
        self.assertEqual([f for f in os.listdir(self.out) if f.endswith(".py")], ["pretrain_mae.py"])
        self.assertEqual(len({r["code"] for r in log_rows(self.out)}), 1)
        with quiet():
            pretrain_mae.main(self.mae(mask_ratio=0.5, resume=False))  # starting over is allowed
        self.assertEqual(load_ckpt(os.path.join(self.out, "ckpt.pt"))["config"]["mask_ratio"], 0.5)

    def test_finished_finetune_then_scratch_in_the_same_folder_is_refused(self):
        cfg = dict(TINY, mode="scratch", out_dir=self.out)
        elsewhere = os.path.join(self.tmp.name, "init.pt")
        with quiet():
            finetune.main(finetune.Config(**cfg))
            checkpoint.save_ckpt(load_ckpt(os.path.join(self.out, "ckpt.pt")), elsewhere)
            with self.assertRaisesRegex(RunError, "holds a finetune.py run with other settings: .*mode 'scratch' -> "
                                                  "'linear'"):
                finetune.main(finetune.Config(**{**cfg, "mode": "linear", "init_ckpt": elsewhere}))
            with self.assertRaisesRegex(RunError, "which this run reads; finetune.py would write over it"):
                finetune.main(finetune.Config(**{**cfg, "mode": "linear", "init_ckpt": os.path.join(self.out,
                                                                                                    "ckpt.pt")}))

    def test_eval_only_writes_nothing_and_builds_no_training_data(self):
        with quiet():
            finetune.main(finetune.Config(**TINY, mode="scratch", out_dir=self.out))
        before = {f: os.path.getmtime(os.path.join(self.out, f)) for f in os.listdir(self.out)}
        real = finetune.build_dataset

        def val_only(name, root, train, *a, **kw):
            assert not train, "eval_only built the training set"
            return real(name, root, train, *a, **kw)

        with quiet(), mock.patch.object(finetune, "build_dataset", val_only):
            finetune.main(finetune.Config(**TINY, eval_only=True, init_ckpt=os.path.join(self.out, "best.pt"),
                                          out_dir=self.out))
        self.assertEqual({f: os.path.getmtime(os.path.join(self.out, f)) for f in os.listdir(self.out)}, before)


class TestBadCheckpoints(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.empty = os.path.join(self.tmp.name, "empty.pt")
        open(self.empty, "wb").close()
        self.truncated = os.path.join(self.tmp.name, "trunc.pt")
        torch.save({"model": {"w": torch.randn(5000)}}, self.truncated)
        data = open(self.truncated, "rb").read()
        open(self.truncated, "wb").write(data[:len(data) // 2])

    def tearDown(self):
        self.tmp.cleanup()

    def test_each_loader_names_the_file(self):
        for bad in (self.empty, self.truncated):
            with self.assertRaisesRegex(BadData, f"{bad} cannot be read .*delete it"):
                finetune.main(finetune.Config(**TINY, init_ckpt=bad, out_dir=os.path.join(self.tmp.name, "ft")))
            with self.assertRaisesRegex(BadData, f"teacher checkpoint {bad} cannot be read"):
                distill.load_teacher(distill.Config(**TINY, teacher_ckpt=bad), torch.device("cpu"))
            with self.assertRaisesRegex(BadData, f"{bad} cannot be read"):
                analyze.main(analyze.Config(ckpt=bad, out_dir=os.path.join(self.tmp.name, "an")))
        out = os.path.join(self.tmp.name, "mae")
        os.makedirs(out)
        os.replace(self.truncated, os.path.join(out, "ckpt.pt"))  # the out_dir's own checkpoint
        with self.assertRaisesRegex(BadData, "out_dir's checkpoint .*ckpt.pt cannot be read"):
            pretrain_mae.main(pretrain_mae.Config(**TINY, out_dir=out))

    def test_command_line_says_one_line_and_never_weights_only_false(self):
        run = subprocess.run([sys.executable, "finetune.py", f"--init_ckpt={self.empty}",
                              f"--out_dir={self.tmp.name}/cli"], cwd=ROOT, capture_output=True, text=True,
                             timeout=TIMEOUT)
        self.assertEqual(run.returncode, 2)
        lines = run.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, run.stderr)
        self.assertIn(self.empty, lines[0])
        self.assertNotIn("weights_only", run.stderr)

    def test_a_pickled_class_is_refused_by_name(self):
        path = os.path.join(self.tmp.name, "obj.pt")
        torch.save({"model": {}, "parser": __import__("argparse").ArgumentParser}, path)
        with self.assertRaisesRegex(BadData, "argparse.ArgumentParser.*refused for safety"):
            load_ckpt(path)


class TestData(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = os.path.join(self.tmp.name, "data")

    def tearDown(self):
        self.tmp.cleanup()

    def test_val_classes_that_differ_from_train_are_refused(self):
        make_image_folder(self.root, ["cat", "dog", "eel"], ["cat", "eel", "fox"])
        with self.assertRaisesRegex(BadData, r"only in train: \['dog'\], only in val: \['fox'\]"):
            data.build_dataset("imagefolder", self.root, False)

    def test_sixteen_bit_png_is_scaled_not_clipped(self):
        path = os.path.join(self.tmp.name, "g16.png")
        Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
        self.assertEqual(data.eval_view(path, 8)[:, 3, 3].tolist(), [127, 127, 127])  # mid-grey, not white

    def test_decompression_bomb_names_the_file(self):
        path = os.path.join(self.tmp.name, "big.png")
        Image.new("RGB", (300, 300)).save(path)
        with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 1000):
            with self.assertRaisesRegex(BadData, "unreadable image file: .*big.png"):
                data.eval_view(path, 8)

    def test_subset_is_class_balanced_and_seeded(self):
        make_image_folder(self.root, ["a", "b", "c"], ["a", "b", "c"], per_class=6)
        ds, _ = data.build_dataset("imagefolder", self.root, True, subset=6)
        self.assertEqual(sorted(ds.labels), [0, 0, 1, 1, 2, 2])
        again, _ = data.build_dataset("imagefolder", self.root, True, subset=6)
        self.assertEqual(ds.samples, again.samples)
        emb, _ = data.build_dataset("embedded", "", True, subset=100)
        self.assertEqual(torch.bincount(emb.labels).tolist(), [10] * 10)

    def test_corrupt_val_image_stops_before_training(self):
        make_image_folder(self.root, ["a", "b"], ["a", "b"], per_class=8)
        open(os.path.join(self.root, "val", "b", "broken.png"), "wb").write(b"\x89PNG not an image")
        steps = []
        with mock.patch.object(finetune, "check_finite", lambda loss, *a: steps.append(1) or loss.item()):
            with self.assertRaisesRegex(BadData, "broken.png"):
                finetune.main(finetune.Config(**{**TINY, "data": "imagefolder", "data_root": self.root, "subset": 0,
                                                 "mode": "scratch", "out_dir": os.path.join(self.tmp.name, "o")}))
        self.assertEqual(steps, [])


# bad values per stage: every one must end in a usage error naming its flag
SHARED = [("patch_size", "0"), ("num_workers", "-1"), ("subset", "-5"), ("base_lr", "inf"), ("base_lr", "0"),
          ("batch_size_per_gpu", "0"), ("epochs", "0"), ("warmup_epochs", "-1"), ("img_size", "0"), ("seed", "-1"),
          ("weight_decay", "nan"), ("num_heads", "-2"), ("num_heads", "5")]
BAD = {
    pretrain_mae: SHARED + [("mask_ratio", "0.99"), ("mask_ratio", "nan"), ("decoder_dim", "0"),
                            ("decoder_heads", "0"), ("crop_min_scale", "0"), ("decoder_dim", "30")],
    finetune: SHARED + [("min_lr", "nan"), ("clip_grad", "nan"), ("clip_grad", "-1"), ("layer_decay", "0"),
                        ("drop_path", "1"), ("mixup", "-0.1"), ("label_smoothing", "1"), ("randaug_magnitude", "11"),
                        ("randaug_std", "-1"), ("reinit_from_block", "-2"), ("crop_min_scale", "1.5")],
    pc: SHARED + [("temperature", "0"), ("ema_momentum", "1"), ("teacher_temp", "-1"), ("local_crop_size", "-1"),
                  ("head_out_dim", "0"), ("clip_grad", "nan"), ("weight_decay_end", "-0.5"), ("center_momentum", "2")],
    distill: [("alpha_attn", "-1"), ("alpha_hidden", "nan"), ("teacher_num_heads", "-1"), ("mask_ratio", "0.99"),
              ("patch_size", "0")],
    analyze: [("patch_size", "0"), ("num_images", "0"), ("batch_size", "2"), ("num_heads", "-1")],
}


class TestBadFlags(unittest.TestCase):
    def test_every_bad_value_is_one_usage_line_naming_its_flag(self):
        for stage, table in BAD.items():
            extra = ["--teacher_ckpt=t.pt"] if stage is distill else []
            for flag, value in table:
                err = io.StringIO()
                with contextlib.redirect_stderr(err), self.assertRaises(SystemExit, msg=(stage.__name__, flag)):
                    parse_config(stage.Config, extra + [f"--{flag}={value}"])
                lines = err.getvalue().strip().splitlines()
                self.assertEqual(len(lines), 1, (stage.__name__, flag, lines))
                self.assertIn(flag, lines[0], (stage.__name__, flag, lines))

    def test_good_defaults_still_parse(self):
        for stage in BAD:
            parse_config(stage.Config, ["--teacher_ckpt=t.pt"] if stage is distill else [])


if __name__ == "__main__":
    unittest.main()
