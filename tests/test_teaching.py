"""A teacher's kit, through the commands a user types: every run draws its curves, analyze.py --runs overlays runs of
one kind, the main job's reference logs fit its defaults, and every command of docs/EXERCISES.md runs at micro size."""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import unittest
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from unittest import mock

import torch

import augment
import figures
import finetune
import pretrain_mae
from checkpoint import load_ckpt, read_log
from data import build_dataset, figure_images
from model import unpatchify
from study import reference
from tests.helpers import TIMEOUT, project_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--model=micro", "--img_size=16", "--patch_size=4", "--subset=32", "--batch_size_per_gpu=16",
         "--warmup_epochs=0", "--num_workers=0"]


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


class TestCurves(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.runs = [os.path.join(cls.tmp.name, name) for name in ("a", "b")]
        for out, ratio in zip(cls.runs, ("0.75", "0.5")):
            result = run("pretrain_mae.py", *MICRO, "--epochs=2", f"--mask_ratio={ratio}", f"--out_dir={out}")
            assert result.returncode == 0, result.stderr

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_a_run_draws_its_curves_and_records_them_for_resume_false(self):
        self.assertGreater(os.path.getsize(os.path.join(self.runs[0], "curves.png")), 1000)
        self.assertIn("curves.png", load_ckpt(os.path.join(self.runs[0], "ckpt.pt"))["files"])

    def test_short_epochs_redraw_every_few_seconds_and_always_after_the_last(self):
        cfg = pretrain_mae.Config(model="micro", img_size=16, patch_size=4, subset=32, batch_size_per_gpu=16,
                                  warmup_epochs=0, num_workers=0, epochs=3, out_dir=os.path.join(self.tmp.name, "few"))
        drawn = []
        with mock.patch("checkpoint.CURVES_EVERY_S", 1e9), contextlib.redirect_stdout(io.StringIO()), \
                mock.patch.object(figures, "run_curves", lambda stage, out, rows, *a: drawn.append(len(rows))):
            pretrain_mae.main(cfg)
        self.assertEqual(drawn, [1, 3])  # the first epoch, then none until the last, drawn with all its rows

    def test_the_overlay_draws_two_runs_and_refuses_what_it_cannot_compare(self):
        out = os.path.join(self.tmp.name, "overlay")
        result = run("analyze.py", f"--runs={','.join(self.runs)}", f"--out_dir={out}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"wrote {out}/curves.png", result.stdout)
        self.assertIn(f"{self.runs[1]} (mask_ratio=0.5)", result.stdout)  # each run named by what sets it apart
        self.assertGreater(os.path.getsize(os.path.join(out, "curves.png")), 1000)
        empty = os.path.join(self.tmp.name, "empty")
        os.makedirs(empty)
        result = run("analyze.py", f"--runs={self.runs[0]},{empty}", f"--out_dir={out}")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertIn(f"{empty} has no log.jsonl", result.stderr)
        other = os.path.join(self.tmp.name, "ft")  # a fine-tuning run's folder, as finetune.py writes it
        os.makedirs(other)
        with open(os.path.join(other, "config.json"), "w") as f:
            json.dump(asdict(finetune.Config()), f)
        with open(os.path.join(other, "log.jsonl"), "w") as f:
            f.write(json.dumps(dict(epoch=1, step=1, loss=2.0, lr=1e-3, top1=10.0, top5=50.0)) + "\n")
        result = run("analyze.py", f"--runs={self.runs[0]},{other}", f"--out_dir={out}")
        self.assertEqual(result.returncode, 2)
        self.assertIn("different stages", result.stderr)

    def test_the_reference_is_drawn_only_for_the_main_jobs_settings(self):
        rows = [dict(epoch=1, step=1, loss=1.0, lr=1e-3)]
        config = asdict(pretrain_mae.Config())
        if figures.reference_of("pretrain_mae", config) is None:
            self.skipTest("no reference log committed")
        self.assertIsNone(figures.reference_of("pretrain_mae", dict(config, mask_ratio=0.5)))
        self.assertIsNotNone(figures.reference_of("pretrain_mae", dict(config, out_dir="elsewhere", num_workers=0)))
        figures.run_curves("pretrain_mae", "out/mae", rows, config, os.path.join(self.tmp.name, "ref.png"))


    def test_the_reference_is_regenerated_from_finished_folders_with_the_main_jobs_paths(self):
        ref_dir = os.path.join(self.tmp.name, "reference")
        with mock.patch.object(reference, "REFERENCE_DIR", ref_dir), contextlib.redirect_stdout(io.StringIO()):
            reference.main(self.runs[0], self.runs[1])
        self.assertEqual(open(os.path.join(ref_dir, "mae.jsonl")).read(),
                         "".join(json.dumps(r) + "\n" for r in read_log(self.runs[0])))
        config = json.load(open(os.path.join(ref_dir, "finetune.config.json")))
        self.assertEqual((config["out_dir"], config["init_ckpt"], config["mask_ratio"]), ("out/finetune",
                                                                                          "out/mae/ckpt.pt", 0.5))


class TestFiguresReadRight(unittest.TestCase):
    def test_a_grey_set_is_grey_in_every_row_of_the_reconstruction_figure(self):
        cfg = pretrain_mae.Config(model="micro", img_size=16, patch_size=4)
        mae = pretrain_mae.MAE(cfg).eval()
        dataset, _ = build_dataset("embedded", "", False, 64, "")
        imgs = augment.normalize(figure_images(dataset, 4, 16, torch.device("cpu"))[0])
        rows = figures.reconstruction_rows(mae, imgs)
        _, mask, *_ = mae.encode_decode(imgs, generator=torch.Generator().manual_seed(0))
        removed = unpatchify(mask[..., None].expand(-1, -1, 16 * 3), 4, 4)[:, 0] > 0  # (B, H, W) the scored pixels
        self.assertEqual(len(rows), 5)
        for label, x in rows:
            spread = (x.amax(1) - x.amin(1))[removed]  # colour = channels apart
            with self.subTest(row=label):
                self.assertLess(spread.max().item(), 1e-5)
        colour = augment.normalize(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
        self.assertGreater((figures.reconstruction_rows(mae, colour)[2][1].std(1)).max().item(), 0.05)  # colour stays

    def test_a_model_against_itself_is_said_to_be_no_finding(self):
        with tempfile.TemporaryDirectory() as tmp:
            result = run("pretrain_mae.py", *MICRO, "--epochs=1", f"--out_dir={tmp}/mae")
            self.assertEqual(result.returncode, 0, result.stderr)
            result = run("analyze.py", f"--ckpt={tmp}/mae/ckpt.pt", "--num_images=32", "--batch_size=32",
                         f"--out_dir={tmp}/analyze")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn("CKA diagonal", result.stdout)
            self.assertIn("compared with itself", result.stdout)


class TestReferenceLogs(unittest.TestCase):
    def test_the_committed_reference_has_the_main_jobs_settings(self):
        committed = 0
        mae = asdict(pretrain_mae.Config())  # finetune.py takes its model and heads from out/mae/ckpt.pt, as here
        for stage, cfg in (("pretrain_mae", pretrain_mae.Config()),
                           ("finetune", finetune.Config(model=mae["model"], num_heads=mae["num_heads"]))):
            name = figures.REFERENCES[stage]
            path = os.path.join(figures.REFERENCE_DIR, f"{name}.config.json")
            if not os.path.exists(path):
                continue
            committed += 1
            with self.subTest(stage=stage):
                self.assertIsNotNone(figures.reference_of(stage, asdict(cfg)), f"the main job's {stage}.py defaults "
                                     f"differ from {path}: regenerate the reference (study/reference.py)")
        if not committed:
            self.skipTest("no reference log committed")


# micro flags appended to each exercise command (the last value of a flag wins), per script
TRAIN_MICRO = MICRO[:2] + ["--img_size=16", "--patch_size=4", "--subset=32", "--batch_size_per_gpu=16", "--epochs=1",
                           "--warmup_epochs=0", "--num_workers=0"]
EXERCISE_MICRO = {"pretrain_mae.py": TRAIN_MICRO, "pretrain_contrastive.py": TRAIN_MICRO,
                  "finetune.py": TRAIN_MICRO, "distill.py": TRAIN_MICRO,
                  "knn.py": ["--img_size=16", "--patch_size=4", "--subset=32", "--batch_size=16", "--num_workers=0"],
                  "analyze.py": ["--num_images=32", "--batch_size=16", "--num_map_images=2"]}


EXERCISES = os.path.join(ROOT, "docs", "EXERCISES.md")


def exercises(path=EXERCISES):
    """docs/EXERCISES.md as [(title, edits [(file, how, anchor, code)], commands [argv])], in the file's order."""
    found = []
    for section in re.split(r"^## ", open(path).read(), flags=re.M)[1:]:
        edits = [(f, how, anchor.strip(), code) for f, how, anchor, code in re.findall(
            r"<!-- edit: (\S+) \| (insert before|replace) \| (.+?) -->\n```python\n(.*?)```", section, re.S)]
        commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                    for line in block.splitlines() if line.startswith("python ")]
        found.append((section.splitlines()[0], edits, commands))
    return found


class TestExercises(unittest.TestCase):
    def test_every_exercise_runs_at_micro_size_with_its_code_change(self):
        listed = [e for e in exercises() if e[2]]
        self.assertGreaterEqual(len(listed), 8)
        with tempfile.TemporaryDirectory() as tmp:
            projects = []
            for i, (title, edits, _) in enumerate(listed):
                project = ROOT
                if edits:  # the student's change, made in their own copy
                    project = project_copy(os.path.join(tmp, f"project{i}"))
                    for name, how, anchor, code in edits:
                        path = os.path.join(project, name)
                        source = open(path).read()
                        self.assertIn(anchor, source, f"exercise {title!r}: its anchor is gone from {name}")
                        new = code + anchor if how == "insert before" else code.rstrip("\n")
                        with open(path, "w") as f:
                            f.write(source.replace(anchor, new, 1))
                projects.append(project)

            def run(i):  # an exercise's commands in their order, as a student types them in one folder
                done = []
                for argv in listed[i][2]:
                    result = subprocess.run([sys.executable, os.path.join(projects[i], argv[1]), *argv[2:],
                                             *EXERCISE_MICRO[argv[1]]], cwd=tmp, capture_output=True, text=True,
                                            timeout=TIMEOUT)
                    done.append((listed[i][0], argv, result))
                return done
            # the first exercise alone (later ones fine-tune its out/ex/mae), then the rest two at a time (2 cores)
            with ThreadPoolExecutor(2) as pool:
                done = run(0) + [x for ran in pool.map(run, range(1, len(listed))) for x in ran]
            self.assertEqual(len(done), sum(len(c) for *_, c in listed))
            for title, argv, result in done:
                with self.subTest(exercise=title, command=" ".join(argv)):
                    self.assertEqual(argv[0], "python")
                    self.assertEqual(result.returncode, 0, result.stderr[-2000:])


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


class TestDocs(unittest.TestCase):
    def test_the_readme_is_a_front_page(self):
        text = open(os.path.join(ROOT, "README.md")).read()
        self.assertLessEqual(len(text), 15000)
        self.assertRegex(text, r"!\[[^\]]+\]\([^)]+\.png\)")  # one figure
        for name in os.listdir(os.path.join(ROOT, "docs")):
            if name.endswith(".md"):
                self.assertIn(f"](docs/{name})", text)  # the table of contents lists every doc

    def test_every_relative_link_of_the_readme_and_docs_resolves(self):
        files = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", n)
                                                    for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                    if n.endswith(".md")]
        checked = 0
        for path in files:
            text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)  # code blocks hold no links
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+://|mailto:", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
                with self.subTest(doc=os.path.relpath(path, ROOT), link=target):
                    self.assertTrue(os.path.exists(dest), f"{target}: no such file")
                    if anchor:
                        headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", open(dest).read(), flags=re.S),
                                              re.M)
                        self.assertIn(anchor, [slug(h) for h in headings], f"{target}: no such heading")
                checked += 1
        self.assertGreater(checked, 20)

    def test_every_stage_model_and_common_read_in_one_sitting(self):  # STYLE §1: at most 300 lines each
        stages = [f for f in os.listdir(ROOT)
                  if f.endswith(".py") and "cli(main, Config)" in open(os.path.join(ROOT, f)).read()]
        self.assertGreaterEqual(len(stages), 7)
        for name in stages + ["model.py", "common.py"]:
            with open(os.path.join(ROOT, name)) as f:
                self.assertLessEqual(len(f.readlines()), 300, name)
