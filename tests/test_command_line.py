"""Every promise through the command a user types: `python <stage>.py ...` as a subprocess, where the stage's module
is __main__ (in-process tests see `pretrain_mae`). Following any message's advice leaves every other run's files
byte-identical; a run that fails leaves its folder byte-identical; Ctrl-C is one line that says how to resume;
the README's "Your own images" commands work as written."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch
from PIL import Image

from checkpoint import load_ckpt, read_log, save_ckpt
from data import build_dataset
from tests.helpers import TIMEOUT, project_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--model=micro", "--img_size=16", "--patch_size=4", "--subset=64", "--batch_size_per_gpu=16", "--epochs=1",
         "--warmup_epochs=0", "--num_workers=0"]


def stage(script, *flags, cwd):
    """`python <script> <flags>` in cwd, as typed; output to pipes (not a terminal)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT)


def folder_bytes(folder):
    """{file: sha256} of everything under folder: byte-identical means equal."""
    out = {}
    for here, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def one_line_error(test, result, pattern):
    """The run failed with exit 2 and a single line on stderr that matches pattern, no traceback."""
    test.assertEqual(result.returncode, 2, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    test.assertEqual(len(lines), 1, result.stderr)
    test.assertRegex(lines[0], pattern)
    return lines[0]


class TestCommandLine(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        done = stage("pretrain_mae.py", *MICRO, "--out_dir=mae", cwd=cls.dir)
        assert done.returncode == 0, done.stderr
        cls.mae = os.path.join(cls.dir, "mae")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def copy_of_mae(self, name):
        shutil.copytree(self.mae, os.path.join(self.dir, name))
        return os.path.join(self.dir, name)

    def test_a_checkpoint_records_its_stage_by_file_name(self):
        self.assertEqual(load_ckpt(os.path.join(self.mae, "ckpt.pt"))["stage"], "pretrain_mae")  # not __main__

    def test_another_stage_never_writes_over_a_run_even_following_the_advice(self):
        old = self.copy_of_mae("old_layout")  # written by bfbdbd2 as `python pretrain_mae.py`: stage "__main__"
        ckpt = load_ckpt(os.path.join(old, "ckpt.pt"))
        save_ckpt(dict(ckpt, stage="__main__"), os.path.join(old, "ckpt.pt"))
        for folder, flags in ((self.mae, ("false",)), (old, ("true", "false"))):
            before = folder_bytes(folder)
            for resume in flags:
                result = stage("finetune.py", "--mode=scratch", *MICRO, f"--out_dir={folder}", f"--resume={resume}",
                               cwd=self.dir)
                line = one_line_error(self, result, "holds a pretrain_mae.py run .*finetune.py will not write over "
                                                    "it: pass another --out_dir")
                self.assertNotIn("--resume=false", line)  # no advice that would write over it
                self.assertEqual(folder_bytes(folder), before)
        mae_before = folder_bytes(self.mae)
        result = stage("finetune.py", "--mode=scratch", *MICRO, "--out_dir=scratch", cwd=self.dir)  # the advice
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(folder_bytes(self.mae), mae_before)

    def test_a_failed_run_leaves_its_folder_byte_identical(self):
        target = self.copy_of_mae("mae_as_distill_target")  # an MAE run with the same settings as the student
        before = folder_bytes(target)
        result = stage("distill.py", f"--teacher_ckpt={self.mae}/ckpt.pt", *MICRO, f"--out_dir={target}",
                       cwd=self.dir)
        line = one_line_error(self, result, "holds a pretrain_mae.py run .*distill.py will not write over it")
        self.assertNotIn("--resume=false", line)
        self.assertEqual(folder_bytes(target), before)
        # the same stage, a checkpoint that does not fit (a weight removed): refused before anything is written
        broken = self.copy_of_mae("broken")
        ckpt = load_ckpt(os.path.join(broken, "ckpt.pt"))
        ckpt["model"].pop("encoder.cls_token")
        save_ckpt(ckpt, os.path.join(broken, "ckpt.pt"))
        before = folder_bytes(broken)
        result = stage("pretrain_mae.py", *MICRO, f"--out_dir={broken}", "--epochs=2", cwd=self.dir)
        one_line_error(self, result, f"{broken}/ckpt.pt does not fit this run's model .*pass another --out_dir, or "
                                     "--resume=false to start that run over")
        self.assertEqual(folder_bytes(broken), before)  # config.json and the script copy untouched
        # other settings in a run of the same stage: one line, nothing written
        result = stage("pretrain_mae.py", *MICRO, f"--out_dir={broken}", "--mask_ratio=0.5", cwd=self.dir)
        one_line_error(self, result, "holds a pretrain_mae.py run with other settings: mask_ratio 0.75 -> 0.5")
        self.assertEqual(folder_bytes(broken), before)
        # following that advice starts that run over, and touches nothing else
        mae_before = folder_bytes(self.mae)
        result = stage("pretrain_mae.py", *MICRO, f"--out_dir={broken}", "--mask_ratio=0.5", "--resume=false",
                       cwd=self.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(load_ckpt(os.path.join(broken, "ckpt.pt"))["config"]["mask_ratio"], 0.5)
        self.assertEqual(folder_bytes(self.mae), mae_before)

    def test_a_run_refused_in_a_new_folder_leaves_no_folder(self):
        result = stage("finetune.py", *MICRO, "--init_ckpt=missing.pt", "--out_dir=never", cwd=self.dir)
        one_line_error(self, result, "init_ckpt not found: missing.pt")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "never")))

    def test_before_the_main_job_the_default_checkpoint_says_how_to_make_it(self):
        for script in ("finetune.py", "analyze.py"):  # both read out/mae/ckpt.pt unless told otherwise
            result = stage(script, *(MICRO if script == "finetune.py" else []), "--out_dir=never", cwd=self.dir)
            one_line_error(self, result, "not found: out/mae/ckpt.pt: run python pretrain_mae.py first")

    def test_a_near_miss_flag_is_a_typo_not_an_abbreviation(self):
        result = stage("pretrain_mae.py", *MICRO, "--epoch=2", "--out_dir=never", cwd=self.dir)
        one_line_error(self, result, "unrecognized arguments: --epoch=2; --epoch: did you mean --epochs\\?")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "never")))

    def test_another_stages_flag_names_the_stage_it_belongs_to(self):
        result = stage("finetune.py", *MICRO, "--mask_ratio=0.9", "--out_dir=never", cwd=self.dir)
        one_line_error(self, result, "--mask_ratio is a flag of pretrain_mae.py, distill.py, not of finetune.py")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "never")))
        result = stage("pretrain_mae.py", *MICRO, "--layer_decay=0.75", "--out_dir=never", cwd=self.dir)  # not a typo
        one_line_error(self, result, "--layer_decay is a flag of finetune.py, not of pretrain_mae.py \\(see --help\\)")

    def test_a_bad_flag_is_the_only_line_even_where_a_valid_config_would_print_a_note(self):
        result = stage("pretrain_mae.py", "--epochs=1", "--mask_ratio=1.5", "--out_dir=never", cwd=self.dir)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().splitlines(), ["pretrain_mae.py: error: --mask_ratio must be in (0,1), "
                                                              "got 1.5 (see --help)"])  # no warm-up note before it
        result = stage("pretrain_mae.py", *MICRO, "--epochs=1", "--warmup_epochs=2", "--out_dir=never", cwd=self.dir)
        self.assertIn("note: --warmup_epochs 2 is longer than --epochs 1", result.stderr)  # valid: the note is said
        shutil.rmtree(os.path.join(self.dir, "never"), ignore_errors=True)

    def test_a_teacher_on_other_patches_names_the_patch_size_and_a_small_one_is_noted(self):
        teacher = f"--teacher_ckpt={self.mae}/ckpt.pt"  # micro, 4-px patches
        flags = [f for f in MICRO if not f.startswith(("--patch_size", "--warmup_epochs"))]  # a warm-up note due
        result = stage("distill.py", teacher, *flags, "--patch_size=8", "--out_dir=dmae8", cwd=self.dir)
        one_line_error(self, result, f"the teacher {self.mae}/ckpt.pt cuts 4-px patches and the student 8-px ones: "
                                     "both must see the same patches; pass --patch_size=4$")
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)  # the refused run: no note first
        self.assertFalse(os.path.exists(os.path.join(self.dir, "dmae8")))
        result = stage("distill.py", teacher, *flags, "--patch_size=4", "--out_dir=dmae4", cwd=self.dir)  # the advice
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("note: --warmup_epochs 2 is longer than --epochs 1", result.stderr)  # the run started: said
        self.assertIn("note: the teacher (32 wide, 2 deep) is no larger than the student --model=micro (32 wide, "
                      "2 deep): D-MAE distils a larger teacher (the paper: MAE-Base into ViT-Tiny). This run goes on; "
                      "a larger teacher: python pretrain_mae.py --model=mini --patch_size=4 --out_dir=out/mae_teacher",
                      result.stderr)

    def test_a_run_folder_given_for_its_checkpoint_names_the_file(self):
        result = stage("knn.py", f"--ckpt={self.mae}", "--subset=64", cwd=self.dir)
        one_line_error(self, result, f"checkpoint {self.mae} is a folder, not a file: pass {self.mae}/ckpt.pt$")

    def test_too_few_images_for_a_cka_batch_names_a_batch_that_fits_and_it_does(self):
        flags = (f"--ckpt={self.mae}/ckpt.pt", "--num_images=10", "--num_map_images=2", "--out_dir=an_few")
        result = stage("analyze.py", *flags, cwd=self.dir)
        one_line_error(self, result, "--num_images 10 is fewer than one CKA batch of 128: pass --batch_size=5 "
                                     "\\(at least 4\\), or more images")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "an_few")))
        followed = stage("analyze.py", *flags, "--batch_size=5", cwd=self.dir)
        self.assertEqual(followed.returncode, 0, followed.stderr)
        result = stage("analyze.py", f"--ckpt={self.mae}/ckpt.pt", "--num_images=4000", "--batch_size=1024",
                       "--out_dir=an_few2", cwd=self.dir)  # the split is smaller than asked: 1,000 test images
        one_line_error(self, result, "the test split has 1000 images, fewer than one CKA batch of 1024: pass "
                                     "--batch_size=500 \\(at least 4\\)")

    def test_a_mistyped_key_names_the_flag_and_the_closest_key(self):
        ckpt = load_ckpt(os.path.join(self.mae, "ckpt.pt"))
        two = os.path.join(self.dir, "two_keys.pt")
        torch.save({"model": ckpt["model"], "teacher": ckpt["model"], "epoch": 1}, two)
        result = stage("finetune.py", *MICRO, f"--init_ckpt={two}", "--init_key=techer", "--out_dir=ft_key",
                       cwd=self.dir)
        one_line_error(self, result, "has no 'techer' weights \\(its weights: model, teacher\\): did you mean "
                                     "--init_key=teacher\\?")

    def test_a_new_head_is_said_in_plain_words(self):
        result = stage("finetune.py", *MICRO, f"--init_ckpt={self.mae}/ckpt.pt", "--out_dir=ft_words", cwd=self.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("backbone weights loaded; new: a 10-class head, fc_norm", result.stdout)
        self.assertNotIn("missing", result.stdout + result.stderr)
        self.assertRegex(result.stdout.strip().splitlines()[-1], r"^best top-1 \d+\.\d\d at epoch 1 \(chosen on "
                         r"the test images: the last epoch is the unbiased number\) -> ft_words/best\.pt$")

    def test_ctrl_c_is_one_line_and_the_same_command_resumes(self):
        cmd = [sys.executable, os.path.join(ROOT, "pretrain_mae.py"), *MICRO, "--epochs=400", "--out_dir=stopped"]
        last = None
        for attempt in range(2):
            proc = subprocess.Popen(cmd, cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            seen = []
            for line in proc.stdout:  # two epochs printed: both are saved (a line comes after its save)
                seen.append(line)
                if sum(s.startswith("ep ") for s in seen) == 2:
                    break
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=TIMEOUT)
            self.assertEqual(proc.returncode, 130, err)
            self.assertNotIn("Traceback", err)
            lines = [line for line in err.splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, err)
            found = re.search(r"stopped by Ctrl-C; stopped/ckpt.pt holds epoch (\d+) of 400: the same command "
                              r"resumes from epoch (\d+)", lines[0])
            self.assertTrue(found, lines[0])
            self.assertEqual(int(found.group(2)), int(found.group(1)) + 1)
            if attempt:
                self.assertIn(f"resumed from stopped/ckpt.pt: epoch {last} of 400 done, on from epoch {last + 1}",
                              "".join(seen))
            last = int(found.group(1))

    def test_two_images_of_the_same_name_get_two_figures(self):
        for cls in ("a", "b"):
            os.makedirs(os.path.join(self.dir, "val", cls), exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 60 if cls == "a" else 200, np.uint8)).save(
                os.path.join(self.dir, "val", cls, "000.jpg"))
        result = stage("analyze.py", f"--ckpt={self.mae}/ckpt.pt", "--image=val/a/000.jpg", "--image=val/b/000.jpg",
                       "--out_dir=figs", cwd=self.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        written = sorted(os.listdir(os.path.join(self.dir, "figs")))
        self.assertEqual(written, ["a_000_jpg_attention.png", "a_000_jpg_recon.png", "b_000_jpg_attention.png",
                                   "b_000_jpg_recon.png"])


# A student's method through the Method interface: no teacher (a stop-gradient instead), only the defaults it has
SIMSIAM = """
class SimSiam(Method):
    title, defaults = "SimSiam", dict(base_lr=0.05, weight_decay=1e-4, head_hidden_dim=64, head_out_dim=32,
                                      batch_size_per_gpu=16)

    def __init__(self, encoder, cfg):
        super().__init__()
        self.cfg, self.encoder = cfg, encoder
        self.projector = mlp(2, encoder.embed_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=True)
        self.predictor = mlp(2, cfg.head_out_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=False)

    def forward(self, crops, teacher, step):
        z1, z2 = (self.projector(self.encoder(x)) for x in crops)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2, {}


METHODS["simsiam"] = SimSiam


def main(cfg):"""


class TestModifyAndRerun(unittest.TestCase):
    """A student edits a stage in their copy of the project and types the same command again: the run folder records
    which code trained which epoch and never mixes code or settings silently."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.project = project_copy(os.path.join(self.dir, "project"))

    def tearDown(self):
        self.tmp.cleanup()

    def typed(self, script, *flags):
        return subprocess.run([sys.executable, os.path.join(self.project, script), *flags], cwd=self.dir,
                              capture_output=True, text=True, timeout=TIMEOUT)

    def edit(self, script, old, new):
        path = os.path.join(self.project, script)
        source = open(path).read()
        self.assertIn(old, source)
        with open(path, "w") as f:
            f.write(source.replace(old, new, 1))
        return source, source.replace(old, new, 1)

    def test_edited_code_never_touches_a_finished_run_and_is_recorded_in_a_longer_one(self):
        first = self.typed("pretrain_mae.py", *MICRO, "--out_dir=run")
        self.assertEqual(first.returncode, 0, first.stderr)
        run = os.path.join(self.dir, "run")
        old_code = load_ckpt(os.path.join(run, "ckpt.pt"))["code"]["hash"]
        original, edited = self.edit("pretrain_mae.py", "num_keep = int(num_patches * (1 - mask_ratio))",
                                     "num_keep = int(num_patches * (1 - mask_ratio))  # a student's edit")
        before = folder_bytes(run)
        again = self.typed("pretrain_mae.py", *MICRO, "--out_dir=run")  # the finished run: nothing to train
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertRegex(again.stdout, f"run/ckpt.pt holds a complete run .*nothing to train; it was trained by code "
                                       f"{old_code}, not this code")
        self.assertEqual(folder_bytes(run), before)  # every file byte-identical: config.json and script copy too
        longer = self.typed("pretrain_mae.py", *MICRO, "--out_dir=run", "--epochs=2")
        self.assertEqual(longer.returncode, 0, longer.stderr)
        new_code = load_ckpt(os.path.join(run, "ckpt.pt"))["code"]["hash"]
        self.assertNotEqual(new_code, old_code)
        said = [line for line in longer.stdout.splitlines() if "code changed" in line]
        self.assertEqual(said, [f"resume: the code changed since epoch 1 (pretrain_mae.py): code {new_code} trains "
                                f"from epoch 2, code {old_code} trained epoch 1 (log.jsonl's \"code\"); its copy "
                                "is kept as pretrain_mae.e001.py"])
        self.assertEqual(open(os.path.join(run, "pretrain_mae.e001.py")).read(), original)
        self.assertEqual(open(os.path.join(run, "pretrain_mae.py")).read(), edited)
        rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
        self.assertEqual([(r["epoch"], r["code"]) for r in rows], [(1, old_code), (2, new_code)])
        # a longer run says that its schedule is recomputed and what its lr does: it rises again
        found = re.search(r"resume: epochs changed from 1 to 2; the schedules are recomputed for 2 epochs, so from "
                          r"epoch 2 the lr goes from (\S+) \(epoch 1's last step\) to (\S+), then down the new cosine "
                          r"to (\S+) \(to start over instead: --resume=false, or another --out_dir\)", longer.stdout)
        self.assertTrue(found, longer.stdout)
        self.assertEqual(float(found.group(1)), float(f"{rows[0]['lr']:.1e}"))
        self.assertGreater(float(found.group(2)), float(found.group(1)))
        # --resume=false starts over: no earlier code copy, no earlier figure; a file of the user's stays
        open(os.path.join(run, "notes.txt"), "w").write("mine")
        over = self.typed("pretrain_mae.py", *MICRO, "--out_dir=run", "--resume=false")
        self.assertEqual(over.returncode, 0, over.stderr)
        self.assertIn("resume=false: removed the earlier run's ckpt.pt, config.json, curves.png, log.jsonl, "
                      "pretrain_mae.e001.py, pretrain_mae.py, recon_e001.png, recon_e002.png from run; other files are "
                      "kept", over.stdout)
        self.assertEqual(sorted(os.listdir(run)), ["ckpt.pt", "config.json", "curves.png", "log.jsonl", "notes.txt",
                                                   "pretrain_mae.py", "recon_e001.png"])
        self.assertEqual([r["code"] for r in read_log(run)], [new_code])

    def test_resume_false_leaves_no_earlier_figure(self):
        done = self.typed("pretrain_mae.py", *MICRO, "--epochs=4", "--out_dir=run")
        self.assertEqual(done.returncode, 0, done.stderr)
        run = os.path.join(self.dir, "run")
        self.assertIn("recon_e004.png", os.listdir(run))
        open(os.path.join(run, "my_figure.png"), "wb").write(b"not the run's")
        over = self.typed("pretrain_mae.py", *MICRO, "--epochs=1", "--out_dir=run", "--resume=false")
        self.assertEqual(over.returncode, 0, over.stderr)
        self.assertEqual(sorted(f for f in os.listdir(run) if f.endswith(".png")),  # curves.png: the new run's own
                         ["curves.png", "my_figure.png", "recon_e001.png"])

    def test_a_flag_new_since_the_run_was_saved_is_refused(self):
        done = self.typed("pretrain_mae.py", *MICRO, "--out_dir=run")
        self.assertEqual(done.returncode, 0, done.stderr)
        run = os.path.join(self.dir, "run")
        self.edit("pretrain_mae.py", "    mask_ratio: float = 0.75", "    masking: str = 'random'  # random | block\n"
                  "    mask_ratio: float = 0.75")
        before = folder_bytes(run)
        for flags in ((), ("--epochs=2",), ("--masking=block", "--epochs=2")):
            result = self.typed("pretrain_mae.py", *MICRO, "--out_dir=run", *flags)
            value = "'block'" if "--masking=block" in flags else "'random'"
            one_line_error(self, result, f"holds a pretrain_mae.py run with other settings: masking \\(not in its "
                                         f"config\\) -> {value}; pass another --out_dir, or --resume=false to start "
                                         "that run over")
            self.assertEqual(folder_bytes(run), before)

    def test_a_warmup_as_long_as_the_run_is_said(self):
        result = self.typed("pretrain_mae.py", *MICRO, "--epochs=2", "--warmup_epochs=2", "--out_dir=whole_warmup")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("note: --warmup_epochs 2 is the whole run (--epochs 2): the lr rises until the last step and "
                      "never decays", result.stderr)

    def test_a_new_method_without_a_teacher_trains_through_the_command(self):
        self.edit("pretrain_contrastive.py", "\n\ndef main(cfg):", SIMSIAM)
        result = self.typed("pretrain_contrastive.py", *MICRO, "--method=simsiam", "--out_dir=simsiam")
        self.assertEqual(result.returncode, 0, result.stderr)
        epoch = [line for line in result.stdout.splitlines() if line.startswith("ep ")]
        self.assertEqual(len(epoch), 1, result.stdout)
        self.assertNotRegex(epoch[0], r" m [\d.]+ ")  # no momentum: there is no teacher
        ckpt = load_ckpt(os.path.join(self.dir, "simsiam", "ckpt.pt"))
        self.assertNotIn("teacher", ckpt)
        self.assertNotIn("momentum", ckpt["log"][0])
        self.assertIsNone(ckpt["config"]["ema_momentum"])  # a default it does not have stays unset
        self.assertEqual((ckpt["config"]["base_lr"], ckpt["config"]["head_out_dim"]), (0.05, 32))
        text = " ".join(self.typed("pretrain_contrastive.py", "--help").stdout.split())
        for shown in ("MoCo-v3 0.001 / DINO 0.0005 / SimSiam 0.05", "MoCo-v3 256 / DINO 64 / SimSiam 16",
                      "(default: MoCo-v3 0.99 / DINO 0.99)"):  # ema_momentum: SimSiam has none
            self.assertIn(shown, text)

class TestYourOwnImages(unittest.TestCase):
    """The README's "Your own images" commands, as written, on a folder of 90 images (30 per class), with only
    --epochs and --model appended to keep the test short (the last value of a flag wins)."""

    def test_the_readme_commands_work_on_a_small_folder(self):
        readme = open(os.path.join(ROOT, "README.md")).read()
        section = readme.split("## Your own images")[1].split("\n## ")[0]
        commands = [c.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                    for c in re.split(r"\n(?=python )", block.strip())]
        commands = [re.sub(r"\s+#.*$", "", c.strip(), flags=re.M).replace("\n", " ") for c in commands]
        self.assertTrue(any(c.startswith("python pretrain_mae.py") for c in commands), commands)
        with tempfile.TemporaryDirectory() as tmp:
            images, _ = build_dataset("embedded", "", True, 90)
            test_images, _ = build_dataset("embedded", "", False, 30)
            names = {0: "cats", 1: "dogs", 2: "birds"}
            for split, ds in (("train", images), ("val", test_images)):
                for i, (img, y) in enumerate(zip(ds.images, ds.labels.tolist())):
                    folder = os.path.join(tmp, "my_images", split, names[y % 3])
                    os.makedirs(folder, exist_ok=True)
                    Image.fromarray(img.numpy()).convert("RGB").save(os.path.join(folder, f"{i:03d}.jpg"))
            cats = os.path.join(tmp, "my_images/val/cats")
            if not os.path.exists(os.path.join(cats, "001.jpg")):  # the README's example file
                shutil.copyfile(os.path.join(cats, sorted(os.listdir(cats))[0]), os.path.join(cats, "001.jpg"))
            main_job = stage("pretrain_mae.py", "--model=micro", "--epochs=1", "--subset=64", "--batch_size_per_gpu=32",
                           cwd=tmp)  # out/mae, as the main job leaves it
            self.assertEqual(main_job.returncode, 0, main_job.stderr)
            for command in commands:
                script, *flags = command.split()[1:]
                extra = ["--epochs=3"] + (["--model=micro"] if script == "pretrain_mae.py" else [])
                result = stage(script, *flags, *(extra if script != "analyze.py" else []), cwd=tmp)
                self.assertEqual(result.returncode, 0, f"{command}\n{result.stderr[-3000:]}")
            for folder in {re.search(r"--out_dir=(\S+)", c).group(1) for c in commands if "--out_dir" in c}:
                self.assertTrue(os.path.exists(os.path.join(tmp, folder, "ckpt.pt")), folder)
            mae_out = next(re.search(r"--out_dir=(\S+)", c).group(1) for c in commands if "pretrain_mae" in c)
            self.assertEqual(sorted(f for f in os.listdir(os.path.join(tmp, mae_out)) if f.endswith(".png")),
                             ["curves.png", "recon_e001.png", "recon_e002.png", "recon_e003.png"])  # 1, 2, 4, ..., last
            self.assertTrue(os.path.exists(os.path.join(tmp, "out/analyze/001_attention.png")))


if __name__ == "__main__":
    unittest.main()
