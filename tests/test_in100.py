"""ImageNet-100: --classes keeps the listed class folders (labels in the file's order, val/ too, a missing one named
with its folder); the in100 preset against MAE-Lite's and the paper's recipes (PAPER.md), its batches on 1..8 GPUs,
--plan's arithmetic by hand and its totals; old study records still accepted; DINO's per-parameter clip by hand."""
import contextlib
import importlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn as nn
from PIL import Image

import analyze
import data
import distill
import finetune
from flags import parse_config
import knn
import pretrain_contrastive
import pretrain_mae
from study import reproduce
from checkpoint import write_text
from common import BadValue, MissingFile, RunError
from tests.helpers import TINY, quiet, tiny_mae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN100 = open(os.path.join(ROOT, "data", "imagenet100_classes.txt")).read().split()
OTHERS = ["n00000001", "n09999999"]  # synset-like names that are not in the list


def make_folder(root, train_classes, val_classes, per_class=2):
    """Tiny PNGs (8 x 8), one colour per class, under root/{train,val}/<class>/."""
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (20 * c, 5 * i, 0)).save(os.path.join(root, split, name, f"{i}.png"))


class TestClassFilter(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.root = os.path.join(self.tmp, "imagenet")
        # three classes of the list (not in sorted order) and two others, in both splits
        self.mine = [IN100[5], IN100[0], IN100[2]]
        make_folder(self.root, self.mine + OTHERS, self.mine + OTHERS)
        self.list = os.path.join(self.tmp, "classes.txt")
        with open(self.list, "w") as f:
            f.write("\n".join(self.mine) + "\n")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def folders(self, ds):  # {label: class folder} of a FileImages set
        return {y: os.path.basename(os.path.dirname(p)) for p, y in ds.samples}

    def test_only_the_listed_classes_labelled_in_the_files_order_train_and_val(self):
        for train in (True, False):
            ds, classes = data.build_dataset("imagefolder", self.root, train, classes=self.list)
            self.assertEqual(classes, 3)
            self.assertEqual(self.folders(ds), dict(enumerate(self.mine)))  # file order, not sorted order
            self.assertEqual(len(ds), 3 * 2)
        everything, classes = data.build_dataset("imagefolder", self.root, True)  # the default: every folder
        self.assertEqual((classes, len(everything)), (5, 10))
        self.assertEqual(self.folders(everything), dict(enumerate(sorted(self.mine + OTHERS))))

    def test_other_folders_are_not_read_so_they_may_differ_between_splits(self):
        shutil.rmtree(os.path.join(self.root, "val", OTHERS[0]))
        with self.assertRaisesRegex(RunError, "different classes"):  # without a list: labels would shift
            data.build_dataset("imagefolder", self.root, True)
        ds, classes = data.build_dataset("imagefolder", self.root, False, classes=self.list)
        self.assertEqual((classes, self.folders(ds)), (3, dict(enumerate(self.mine))))

    def test_a_missing_class_is_one_line_naming_it_and_the_folder(self):
        # the committed ImageNet-100 list against a folder that holds 3 of its classes: the first missing one named
        first_missing = next(c for c in IN100 if c not in self.mine)
        with self.assertRaises(MissingFile) as e:
            data.build_dataset("imagefolder", self.root, True, classes="imagenet100")
        msg = str(e.exception)
        self.assertIn(first_missing, msg)
        self.assertIn(os.path.join(self.root, "train"), msg)
        self.assertIn("imagenet100_classes.txt", msg)
        self.assertIn("96 more", msg)  # 97 of 100 missing
        self.assertNotIn("\n", msg)
        shutil.rmtree(os.path.join(self.root, "val", self.mine[1]))  # in train/ but not in val/: val/ named
        with self.assertRaisesRegex(MissingFile, f"class {self.mine[1]} of .* is not a folder in .*val"):
            data.build_dataset("imagefolder", self.root, True, classes=self.list)

    def test_bad_lists_and_other_datasets_are_one_clear_error(self):
        with self.assertRaisesRegex(MissingFile, "--classes file not found"):
            data.build_dataset("imagefolder", self.root, True, classes=os.path.join(self.tmp, "nope.txt"))
        with open(self.list, "a") as f:
            f.write(self.mine[0] + "\n")
        with self.assertRaisesRegex(RunError, f"lists {self.mine[0]} more than once"):
            data.build_dataset("imagefolder", self.root, True, classes=self.list)
        with self.assertRaisesRegex(BadValue, "--classes selects class folders of --data=imagefolder"):
            data.build_dataset("embedded", "", True, classes="imagenet100")

    def test_the_list_is_cmcs_imagenet100(self):  # data/README.md: 100 synsets, each once
        self.assertEqual((len(IN100), len(set(IN100))), (100, 100))
        self.assertTrue(all(c.startswith("n") and len(c) == 9 for c in IN100))
        self.assertEqual(data.class_list("imagenet100")[1], IN100)

    def test_every_image_folder_stage_passes_its_classes_to_the_data(self):
        _, ckpt = tiny_mae(self.tmp)
        common = dict(data="imagefolder", data_root=self.root, classes=self.list)

        class Seen(Exception):
            pass

        stages = [(pretrain_mae, pretrain_mae, pretrain_mae.Config(**TINY, **common)),
                  (pretrain_contrastive, pretrain_contrastive, pretrain_contrastive.Config(method="dino", **TINY,
                                                                                          **common)),
                  (distill, pretrain_mae, distill.Config(**TINY, **common, teacher_ckpt=ckpt)),
                  (finetune, finetune, finetune.Config(mode="scratch", **TINY, **common)),
                  (knn, knn, knn.Config(ckpt="random", model="micro", img_size=16, patch_size=4, **common)),
                  (analyze, analyze, analyze.Config(ckpt=ckpt, **common))]
        for stage, reads, cfg in stages:
            if hasattr(cfg, "out_dir"):
                cfg.out_dir = os.path.join(self.tmp, stage.__name__)
            else:
                cfg.out = os.path.join(self.tmp, "knn.json")
            calls = []

            def spy(name, root, train, subset=0, classes=""):
                calls.append(classes)
                raise Seen

            with quiet(), mock.patch.object(reads, "build_dataset", spy), self.assertRaises(Seen):
                stage.main(cfg)
            self.assertEqual(calls, [self.list], stage.__name__)

    def test_a_stage_command_with_a_missing_class_says_so_in_one_line(self):
        with open(self.list, "a") as f:
            f.write("n01234567\n")
        run = subprocess.run([sys.executable, "finetune.py", "--mode=scratch", "--data=imagefolder",
                              f"--data_root={self.root}", f"--classes={self.list}",
                              f"--out_dir={os.path.join(self.tmp, 'ft')}"], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(run.returncode, 2, run.stderr)
        self.assertEqual(run.stderr.strip().splitlines(), [
            f"finetune.py: error: class n01234567 of {self.list} is not a folder in {self.root}/train: check "
            "--data_root and --classes"])


class TestIn100Preset(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = reproduce.Config(preset="in100", gpus="", teacher_ckpt="mae_pretrain_vit_base.pth")
        cls.runs = {r.name: r for r in reproduce.study(cls.cfg)}

    def test_the_preset_is_mae_lites_recipes_on_imagenet100(self):  # PAPER.md §1.1, §2.1-§3.3
        runs, glob = self.runs, lambda c: c.batch_size_per_gpu * c.accum_steps  # the global batch on one GPU
        mae, dmae, moco, dino = (runs[f"{m}_s0"].cfg for m in ("mae", "dmae", "mocov3", "dino"))
        self.assertEqual((mae.model, mae.img_size, mae.patch_size, mae.num_heads), ("tiny", 224, 16, 12))
        for c in (mae, dmae):  # MAE-Lite's MAE-Tiny: 400 epochs at 4096, base lr 1.5e-4, crop 0.08, 40 warm-up
            self.assertEqual((c.epochs, c.warmup_epochs, glob(c), c.crop_min_scale), (400, 40, 4096, 0.08))
            self.assertAlmostEqual(c.base_lr * glob(c) / 256, 2.4e-3)
            self.assertEqual((c.mask_ratio, c.decoder_dim, c.decoder_depth, c.decoder_heads, c.weight_decay,
                              c.norm_pix_loss), (0.75, 96, 1, 3, 0.05, True))
        self.assertEqual((dmae.teacher_ckpt, dmae.teacher_model, dmae.alpha_attn, dmae.attn_layers),
                         ("mae_pretrain_vit_base.pth", "base", 1.0, "-1"))
        self.assertNotIn("teacher", runs)  # a published MAE-Base, none trained here
        self.assertEqual((moco.epochs, moco.warmup_epochs, glob(moco), moco.head_hidden_dim, moco.head_out_dim),
                         (300, 40, 1024, 4096, 256))
        self.assertAlmostEqual(moco.base_lr * glob(moco) / 256, 6e-4)
        self.assertEqual((moco.temperature, moco.ema_momentum, moco.weight_decay), (0.2, 0.99, 0.1))
        self.assertEqual((dino.epochs, glob(dino), dino.head_out_dim, dino.head_hidden_dim, dino.local_crops,
                          dino.local_crop_size), (300, 1024, 65536, 2048, 8, 96))  # DINO's local crops: 96 at 224
        self.assertEqual((dino.ema_momentum, dino.base_lr, dino.teacher_temp, dino.clip_grad), (0.996, 5e-4, 0.07,
                                                                                                3.0))
        scratch, ft = runs["scratch_s0"].cfg, runs["mae_ft_s0"].cfg
        self.assertEqual((scratch.mode, scratch.epochs, glob(scratch)), ("scratch", 300, 1024))
        self.assertEqual((ft.epochs, ft.warmup_epochs, glob(ft), ft.base_lr, ft.layer_decay, ft.min_lr),
                         (100, 5, 1024, 1e-3, 0.85, 1e-6))
        self.assertEqual((ft.mixup, ft.cutmix, ft.randaug_magnitude, ft.drop_path, ft.label_smoothing,
                          ft.crop_min_scale), (0.2, 0.0, 10, 0.0, 0.0, 0.08))
        self.assertEqual(runs["mocov3_ft_s0"].cfg.layer_decay, 0.75)
        self.assertEqual(runs["mae_lin_s0"].cfg.epochs, 50)  # shorter than the 100 of fine-tuning
        keep = sorted((r.cfg.reinit_from_block, r.cfg.epochs) for r in runs.values() if r.tags.get("eval") == "keep"
                      and r.tags["method"] == "mae" and r.tags["seed"] == 0)
        self.assertEqual(keep, [(-1, 20), (0, 20), (3, 20), (6, 20), (9, 20)])  # K = 12 keeps every block
        self.assertFalse([n for n in runs if "long" in n])
        tr = runs["mae_flowers102_s0"].cfg
        self.assertEqual((tr.data, tr.optimizer, tr.weight_decay, tr.clip_grad, tr.layer_decay, tr.epochs),
                         ("flowers102", "sgd", 0, 1.0, 0.75, 50))
        self.assertTrue(tr.hflip)  # flowers, unlike digits, may be mirrored
        self.assertAlmostEqual(tr.base_lr * glob(tr) / 256, 0.1)
        for r in runs.values():  # every ImageNet run reads the 100 classes of the ImageNet-1k folder; transfer: all
            self.assertEqual(r.cfg.classes, "imagenet100" if r.cfg.data == "imagefolder" else "", r.name)
        self.assertEqual(self.cfg.seed_list, [0, 1, 2])

    def test_micro_batches_fit_one_gpu_and_the_global_batch_holds_on_k_gpus(self):
        globals_ = dict(mae_s0=4096, dmae_s0=4096, mocov3_s0=1024, dino_s0=1024, scratch_s0=1024, mae_ft_s0=1024)
        micro = dict(mae_s0=1024, dmae_s0=1024, mocov3_s0=512, dino_s0=256, scratch_s0=1024, mae_ft_s0=1024)
        for k in (1, 2, 4, 8):
            cfg = reproduce.Config(preset="in100", gpus="", gpus_per_run=k, teacher_ckpt="t.pth")
            for name, global_batch in globals_.items():
                run = self.runs[name]
                words = reproduce.command(run, cfg).split(" ")  # what one would run by hand
                launcher, (script, *flags) = words[0], words[2 if k > 1 else 1:]  # torchrun --nproc_per_node=K
                c = parse_config(importlib.import_module(script.removesuffix(".py")).Config, flags)
                self.assertEqual(c.batch_size_per_gpu * c.accum_steps * k, global_batch, (name, k))
                self.assertLessEqual(c.batch_size_per_gpu, micro[name], (name, k))
                self.assertEqual(launcher, "python" if k == 1 else "torchrun")
        self.assertEqual(reproduce.split_batch(4096, 1, 1024), dict(batch_size_per_gpu=1024, accum_steps=4))
        self.assertEqual(reproduce.split_batch(4096, 2, 1024), dict(batch_size_per_gpu=1024, accum_steps=2))
        self.assertEqual(reproduce.split_batch(4096, 8, 1024), dict(batch_size_per_gpu=512, accum_steps=1))
        self.assertEqual(reproduce.split_batch(1000, 1, 256), dict(batch_size_per_gpu=250, accum_steps=4))
        with self.assertRaisesRegex(BadValue, "does not split over 3 processes"):
            reproduce.split_batch(1024, 3, 1024)

    def test_the_teacher_is_required_to_run_not_to_plan(self):
        with self.assertRaisesRegex(BadValue, "--preset=in100 needs --teacher_ckpt"):
            reproduce.Config(preset="in100", gpus="")
        cfg = reproduce.Config(preset="in100", gpus="", plan=True)
        dmae = next(r for r in reproduce.study(cfg) if r.name == "dmae_s0")
        self.assertEqual(dmae.cfg.teacher_ckpt, reproduce.NO_TEACHER)
        out = plan(cfg)[2]
        self.assertIn(f"D-MAE's teacher: {reproduce.NO_TEACHER} above stands for", out)

    def test_nominal_sizes_plan_without_the_data(self):
        self.assertEqual(reproduce.data_size("imagefolder", "", 0, "imagenet100"), (126689, 100))
        self.assertEqual(reproduce.data_size("imagefolder", "", 0), (1281167, 1000))


def plan(cfg):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        total, hours = reproduce.main(cfg)
    return total, hours, out.getvalue()


class TestIn100Plan(unittest.TestCase):
    def test_one_runs_gpu_hours_by_hand(self):
        total, hours, out = plan(reproduce.Config(preset="in100", seeds="0", gpus="", plan=True))
        line = lambda name: next(x for x in out.splitlines() if x.startswith(name + " ")).split()
        # MAE: 400 epochs x 126,689 images / 31,100 img/s (bench.py's compiled MAE-Tiny step) = 0.453 GPU-hours
        self.assertAlmostEqual(float(line("mae_s0")[1]), 400 * 126689 / 31100 / 3600, places=2)
        self.assertAlmostEqual(400 * 126689 / 31100 / 3600, 0.4526, places=4)
        # DINO: 300 x 126,689 / 3,000 img/s = 3.52; fine-tuning: 100 x 126,689 / 12,600 = 0.28
        self.assertAlmostEqual(float(line("dino_s0")[1]), 300 * 126689 / 3000 / 3600, places=2)
        self.assertAlmostEqual(float(line("mae_ft_s0")[1]), 100 * 126689 / 12600 / 3600, places=2)
        # MAE's data path: 31,100 img/s over 265 img/s per worker core = 117 cores per GPU, so 10 bound it
        self.assertEqual(line("mae_s0")[5:7], ["117", "cores/GPU,"])
        self.assertAlmostEqual(float(line("mae_s0")[7]), 400 * 126689 / (10 * 265) / 3600, places=2)
        self.assertIn("data path: 37 of 37 runs need more worker cores per GPU", out)  # 35 + 2 raw-pixel floors

    def test_one_seed_under_12_gpu_hours_three_seeds_under_5_hours_on_8_gpus(self):
        total, hours, _ = plan(reproduce.Config(preset="in100", seeds="0", gpus="0", plan=True))
        self.assertLess(total, 12)
        self.assertAlmostEqual(hours, total, places=6)  # one GPU: never idle
        gpus = ",".join(map(str, range(8)))
        cfg3 = reproduce.Config(preset="in100", gpus=gpus, gpus_per_run=4, plan=True)
        total3, hours3, _ = plan(cfg3)
        # the raw-pixel floors run once whatever the seeds (the analysis figures too, first seed only: a few seconds)
        floors = sum(reproduce.cost(r, cfg3) for r in reproduce.study(cfg3) if r.stage == "pixels") / 3600
        self.assertGreater(floors, 0)
        self.assertAlmostEqual(total3, 3 * (total - floors) + floors, places=2)
        self.assertLess(hours3, 5)
        self.assertGreater(hours3, total3 / 8)


class TestCpuPlanAndOldRecords(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.cfg = reproduce.Config(out_dir=self.tmp, gpus="", plan=True)
        self.runs = {r.name: r for r in reproduce.study(self.cfg)}

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def record(self, run, drop=(), **config):
        """A result.json as the study wrote it before `drop` keys existed."""
        os.makedirs(run.folder, exist_ok=True)
        old = {k: v for k, v in reproduce.settings(run).items() if k not in drop} | config
        write_text(os.path.join(run.folder, "result.json"), json.dumps(dict(name=run.name, config=old, seconds=90.0)))

    def test_the_cpu_plan_prints_cpu_minutes_measured_or_estimated(self):
        self.record(self.runs["mae_s0"], drop=("classes",))
        total, hours, out = plan(self.cfg)
        lines = {x.split()[0]: x.split() for x in out.splitlines() if "CPU-min" in x}
        self.assertEqual(lines["mae_s0"][1:4], ["1.5", "CPU-min", "measured"])  # its 90 s
        self.assertEqual(lines["mocov3_s0"][2:4], ["CPU-min", "~"])
        self.assertGreater(float(lines["mocov3_s0"][1]), 0)
        # MoCo-v3's estimate: 20 epochs x 6,000 images / 300 img/s per core (the mini ViT's) = 6.7 minutes
        self.assertAlmostEqual(float(lines["mocov3_s0"][1]), 20 * 6000 / 300 / 60, places=1)
        self.assertNotIn("GPU-h", out)
        self.assertIn(f"{self.cfg.jobs} runs at a time", out)
        self.assertGreater(total, 1)  # CPU-hours
        self.assertGreater(hours, total / self.cfg.jobs - 1e-9)

    def test_runs_recorded_before_the_classes_flag_are_still_this_run(self):
        run = self.runs["mae_ft_s0"]
        self.record(run, drop=("classes",))
        self.assertEqual(reproduce.finished(run)["seconds"], 90.0)
        self.record(run, classes="other.txt")  # a run on other classes is another run
        with self.assertRaisesRegex(RunError, "other settings .*classes 'other.txt' -> ''"):
            reproduce.finished(run)
        os.remove(os.path.join(run.folder, "result.json"))  # done by hand, on 4 GPUs, before --classes existed
        given = {k: v for k, v in reproduce.settings(run).items() if k != "classes"}
        given.update(batch_size_per_gpu=run.cfg.batch_size_per_gpu // 4)
        with open(os.path.join(run.folder, "config.json"), "w") as f:
            json.dump(given, f)
        with open(os.path.join(run.folder, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(epoch=e + 1, top1=50.0 + e)) + "\n" for e in range(run.cfg.epochs))
        adopted = reproduce.finished(run)
        self.assertTrue(adopted["adopted"])
        self.assertEqual(adopted["top1"], 50.0 + run.cfg.epochs - 1)


class Stepped(Exception):
    pass


class TwoWeights(nn.Module):
    """Stands in for a method's student: two weights with gradient norms 10 and 1, DINO's `last_layer` among them."""

    def __init__(self, clip, freeze_epochs=0):
        super().__init__()
        self.first, self.last_layer = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
        self.cfg = SimpleNamespace(clip_grad=clip, freeze_last_layer_epochs=freeze_epochs)
        self.big, self.small = torch.tensor([[6.0, 0.0], [0.0, 8.0]]), torch.tensor([[0.6, 0.8]])
        self.first.weight.grad, self.last_layer.weight.grad = self.big.clone(), self.small.clone()


class TestDinoClip(unittest.TestCase):
    def test_dino_clips_each_parameter_by_its_own_norm(self):
        m = TwoWeights(3.0)
        pretrain_contrastive.DINO.before_step(m, epoch=0)
        # DINO's clip_gradients: norm 10 > 3 -> scaled by 3 / (10 + 1e-6); norm 1 < 3 -> untouched
        torch.testing.assert_close(m.first.weight.grad, m.big * 3 / (10 + 1e-6))
        self.assertAlmostEqual(m.first.weight.grad.norm().item(), 3.0, places=5)
        torch.testing.assert_close(m.last_layer.weight.grad, m.small)

    def test_mocov3_clips_the_total_norm(self):  # one scale from sqrt(10^2 + 1^2), as fine-tuning's
        m = TwoWeights(3.0)
        pretrain_contrastive.MoCoV3.before_step(m, epoch=0)
        scale = 3 / (math.sqrt(101) + 1e-6)
        torch.testing.assert_close(m.first.weight.grad, m.big * scale)
        torch.testing.assert_close(m.last_layer.weight.grad, m.small * scale)
        self.assertLess(m.last_layer.weight.grad.norm().item(), 0.5)  # the small gradient shrank with the big one

    def test_no_clip_and_dinos_frozen_prototypes(self):
        m = TwoWeights(0.0, freeze_epochs=1)
        pretrain_contrastive.MoCoV3.before_step(m, epoch=0)
        torch.testing.assert_close(m.first.weight.grad, m.big)  # clip_grad 0: untouched
        pretrain_contrastive.DINO.before_step(m, epoch=0)
        torch.testing.assert_close(m.first.weight.grad, m.big)
        self.assertIsNone(m.last_layer.weight.grad)  # the first epoch: the prototypes do not move

    def test_the_train_loop_calls_the_methods_own_hook(self):
        for method, owner in (("dino", pretrain_contrastive.DINO), ("mocov3", pretrain_contrastive.Method)):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = pretrain_contrastive.Config(method=method, **dict(TINY, subset=32), local_crop_size=8,
                                                  out_dir=os.path.join(tmp, "out"))
                with quiet(), mock.patch.object(owner, "before_step", autospec=True, side_effect=Stepped) as hook, \
                        self.assertRaises(Stepped):
                    pretrain_contrastive.main(cfg)
                self.assertEqual(type(hook.call_args.args[0]).__name__, {"dino": "DINO", "mocov3": "MoCoV3"}[method])
                self.assertEqual(hook.call_args.args[1], 0)  # the first epoch


if __name__ == "__main__":
    unittest.main()
