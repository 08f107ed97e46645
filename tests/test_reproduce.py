"""reproduce.py: --quick runs every step and writes the report; a second call skips finished runs; a deleted run is
redone to the same number (deterministic); other settings in the same folder are refused; the verdict rules."""
import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from flags import parse_config
from study import report
from study.report import layer_decays
from study import reproduce
from common import RunError
from tests.helpers import TIMEOUT, quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLAIMS = ("## Claim 1", "## Claim 2", "## Claim 3", "## Claim 4")
FIGURES = ("curves.png", "knn.png", "dino_loss.png", "layers.png", "transfer.png", "attn_distance.png",
           "cka_mae_vs_supervised.png", "recon_mae.png", "recon_dmae.png", "attn_maps_mae.png", "attn_maps_mocov3.png",
           "attn_maps_dmae.png",
           "attn_maps_supervised.png")


def clone_of_this_tree(dest):
    """A git repository at dest holding this working tree's files (tracked, and untracked but not ignored): what a
    fresh clone of the submitted code holds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)


class TestReproduce(unittest.TestCase):
    """The README's `python reproduce.py --quick`, typed in a fresh clone; then the study read back in-process."""

    @classmethod
    def setUpClass(cls):
        cls.clone, cls.cwd = tempfile.mkdtemp(), os.getcwd()
        clone_of_this_tree(cls.clone)
        cls.typed = subprocess.run([sys.executable, "-m", "study.reproduce", "--quick"], cwd=cls.clone,
                                   capture_output=True, text=True, timeout=4 * TIMEOUT)
        os.chdir(cls.clone)  # the study's folders are relative, as typed: out/quick/runs/<run>
        cls.tmp = os.path.join(cls.clone, "out", "quick")
        cls.cfg = reproduce.Config(quick=True)
        with quiet():
            cls.results, _ = reproduce.run_all(reproduce.study(cls.cfg), cls.cfg)  # every run finished: read back

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls.cwd)
        shutil.rmtree(cls.clone, ignore_errors=True)

    def test_the_typed_quick_study_leaves_git_status_clean(self):
        self.assertEqual(self.typed.returncode, 0, self.typed.stderr[-3000:])
        self.assertEqual(self.cfg.out_dir, "out/quick")
        status = subprocess.run(["git", "status", "--porcelain"], cwd=self.clone, capture_output=True, text=True)
        self.assertEqual(status.stdout, "")  # results/REPORT.md and its figures untouched; out/ is ignored
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "REPORT.md")))

    def test_quick_study_runs_every_step_and_writes_the_report(self):
        runs = reproduce.study(self.cfg)
        self.assertEqual(set(self.results), {r.name for r in runs})
        for r in runs:  # each run left its result in its folder
            self.assertTrue(os.path.exists(os.path.join(r.folder, "result.json")), r.name)
        report = open(os.path.join(self.tmp, "REPORT.md")).read()
        for claim in CLAIMS:
            self.assertIn(claim, report)
        self.assertIn("Verdict", report)
        self.assertIn("layer decay: MAE, MoCo-v3 and D-MAE 0.85, DINO 0.75, none from scratch", report)  # the runs'
        moved = [dict(self.results[r.name], tags=r.tags) for r in runs]  # as the report reads them
        moved = [dict(r, config=dict(r["config"], layer_decay=0.75)) if r["tags"].get("method") == "mocov3" else r
                 for r in moved]  # as the paper's presets run MoCo-v3
        self.assertEqual(layer_decays(moved), "MAE and D-MAE 0.85, MoCo-v3 and DINO 0.75, none from scratch")
        for fig in FIGURES:
            self.assertGreater(os.path.getsize(os.path.join(self.tmp, "figures", fig)), 1000, fig)
        # every fine-tuning run logged one top-1 per epoch; the layer study covers K = 0 .. depth
        self.assertEqual(len(self.results["scratch_s0"]["curve"]), 1)
        self.assertEqual(len(self.results["scratch_long_s0"]["curve"]), 2)
        keep = [r.cfg.reinit_from_block for r in runs if r.tags.get("eval") == "keep" and r.tags["method"] == "mae"]
        self.assertEqual(keep, [0, 1, -1])  # depth 2: K = 0, 1, 2

    def test_second_call_skips_and_a_deleted_run_is_redone_to_the_same_number(self):
        shutil.rmtree(os.path.join(self.tmp, "runs", "mae_ft_s0"))
        with quiet():
            again = reproduce.main(self.cfg)
        for name, res in self.results.items():
            self.assertEqual(again[name]["config"], res["config"], name)
            if name != "mae_ft_s0":  # untouched: read back, not re-run
                self.assertEqual(again[name]["seconds"], res["seconds"], name)
        self.assertEqual(again["mae_ft_s0"]["curve"], self.results["mae_ft_s0"]["curve"])  # deterministic re-run

    def test_a_run_done_by_its_own_command_is_adopted_from_its_log(self):
        runs = {r.name: r for r in reproduce.study(self.cfg)}
        for name in ("dino_s0", "mae_lin_s0", "mae_knn_s0"):
            path = os.path.join(runs[name].folder, "result.json")
            with open(path) as f:
                kept = f.read()
            os.remove(path)  # as if run by hand: only its log or knn.json
            try:
                adopted = reproduce.finished(runs[name])
            finally:  # the other tests read the study's own result
                with open(path, "w") as f:
                    f.write(kept)
            self.assertTrue(adopted["adopted"], name)
            for key in ("loss", "losses", "teacher_entropy", "top1", "curve"):
                self.assertEqual(adopted.get(key), self.results[name].get(key), f"{name}: {key}")
        run = runs["dino_s0"]  # a run by hand with another setting is not this run
        paths = [os.path.join(run.folder, f) for f in ("result.json", "config.json")]
        kept = [open(p).read() for p in paths]
        try:
            os.remove(paths[0])
            with open(paths[1], "w") as f:
                json.dump(dict(json.loads(kept[1]), ema_momentum=0.5), f)
            self.assertIsNone(reproduce.finished(run))
        finally:
            for p, text in zip(paths, kept):
                with open(p, "w") as f:
                    f.write(text)

    def test_other_settings_in_the_same_folder_are_refused(self):
        with self.assertRaisesRegex(RunError, "other settings .*patch_size 7 -> 14"):
            reproduce.run_all(reproduce.study(reproduce.Config(quick=True, out_dir=self.tmp, patch_size=14)), self.cfg)


class TestReportHeader(unittest.TestCase):
    def test_the_regenerate_command_names_the_flags_the_study_ran_with(self):
        self.assertEqual(report.given(reproduce.Config()), "")
        self.assertEqual(report.given(reproduce.Config(seeds="0,1", dino_sweep=True)), " --seeds=0,1 --dino_sweep=true")
        self.assertEqual(report.given(reproduce.Config(quick=True)), " --quick")  # what --quick fills is not typed
        config = parse_config(reproduce.Config, report.given(reproduce.Config(seeds="0,1", finetune_lr=0.01)).split())
        self.assertEqual((config.seeds, config.finetune_lr), ("0,1", 0.01))  # the command parses back to the study


class TestWhereRunsGo(unittest.TestCase):
    """The launcher: each run pinned to its own device(s), DDP runs under torchrun, and no run outlives the study."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def some_runs(self, names, **kw):  # the quick study's runs of these names (their dependencies among them)
        cfg = reproduce.Config(quick=True, out_dir=self.tmp, **kw)
        runs = [r for r in reproduce.study(cfg) if r.name in names]
        with quiet():
            results, _ = reproduce.run_all(runs, cfg)
        return runs, results

    def test_a_failed_run_stops_the_study_saying_why(self):
        cfg = reproduce.Config(quick=True, out_dir=self.tmp)
        run = next(r for r in reproduce.study(cfg) if r.name == "mae_knn_s0")
        run.cfg.ckpt, run.deps = os.path.join(self.tmp, "gone.pt"), ()  # its checkpoint is not there
        with quiet(), self.assertRaises(RunError) as raised:
            reproduce.run_all([run], cfg)
        self.assertRegex(str(raised.exception), r"^run mae_knn_s0 failed \(exit 1, its last error: common.MissingFile: "
                                                r"checkpoint not found: .*gone.pt\): see .*mae_knn_s0/output.log; "
                                                r"finished runs")
        log = os.path.join(self.tmp, "torchrun.log")  # a rank's traceback, then torchrun's own summary
        with open(log, "w") as f:
            f.write('[rank1]: Traceback (most recent call last):\n[rank1]:   File "finetune.py", line 9, in <module>\n'
                    "[rank1]:     main()\n[rank1]: RuntimeError: Connection closed by peer\n"
                    "Traceback (most recent call last):\n  File \"run.py\", line 9, in <module>\n"
                    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
                    "====================\n")
        self.assertEqual(reproduce.why_it_failed(log), ", its last error: RuntimeError: Connection closed by peer")

    def test_ddp_runs_go_under_torchrun_with_world_size_2(self):
        runs, results = self.some_runs(("mae_s0", "random_knn_s0", "mae_ft_s0"), gpus_per_run=2)  # DDP or not
        for r in runs:
            self.assertEqual(results[r.name]["world_size"], 2 if r.ddp else 1, r.name)
        self.assertGreater(results["mae_s0"]["loss"], 0)
        self.assertGreater(results["mae_ft_s0"]["top1"], 0)
        self.assertEqual(results["mae_s0"]["config"]["batch_size_per_gpu"], 200)  # the study's (global) batch
        spec = json.load(open(os.path.join(self.tmp, "runs", "mae_s0", "run.json")))
        self.assertEqual(spec["config"]["batch_size_per_gpu"], 100)  # each of the 2 ranks took half

    def test_concurrent_runs_get_different_devices(self):
        runs, results = self.some_runs(("mae_s0", "mocov3_s0", "scratch_s0", "random_knn_s0"), gpus="0,1")
        spans = [(results[r.name]["started"], results[r.name]["ended"], results[r.name]["devices"]) for r in runs]
        self.assertEqual({d for *_, devs in spans for d in devs}, {"0", "1"})  # both devices were used
        overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
        self.assertTrue(overlapping)  # two at a time
        for a, b in overlapping:
            self.assertFalse(set(a[2]) & set(b[2]), (a, b))

    def test_a_killed_study_leaves_no_run_behind(self):
        study = subprocess.Popen([sys.executable, "-m", "study.reproduce", "--quick", f"--out_dir={self.tmp}"],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + TIMEOUT  # generous: a loaded laptop starts a run slowly
        while not running(self.tmp) and time.time() < deadline:
            time.sleep(0.2)
        self.assertTrue(running(self.tmp), "no run started")
        study.send_signal(signal.SIGKILL)
        study.wait()
        deadline = time.time() + TIMEOUT
        while running(self.tmp) and time.time() < deadline:
            time.sleep(0.2)
        self.assertEqual(running(self.tmp), [])


def running(out_dir):
    """pids of processes running a run of the study in out_dir."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if f"run-one {out_dir}".encode() in open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" "):
                pids.append(pid)
    return pids


class TestPresetsAndPlan(unittest.TestCase):
    def test_the_paper_preset_is_the_papers_recipe(self):  # PAPER §2.1-§3.3, values
        cfg = reproduce.Config(preset="paper", gpus="")
        runs = {r.name: r.cfg for r in reproduce.study(cfg)}
        mae, moco, ft = runs["mae_s0"], runs["mocov3_s0"], runs["mae_ft_s0"]
        self.assertEqual((mae.model, mae.img_size, mae.patch_size, mae.num_heads), ("tiny", 224, 16, 12))
        self.assertEqual((mae.epochs, mae.warmup_epochs, mae.batch_size_per_gpu, mae.crop_min_scale),
                         (400, 40, 4096, 0.08))
        self.assertAlmostEqual(mae.base_lr * mae.batch_size_per_gpu / 256, 2.4e-3)  # 1.5e-4 x 4096 / 256
        self.assertEqual((mae.mask_ratio, mae.decoder_dim, mae.decoder_depth, mae.weight_decay), (0.75, 96, 1, 0.05))
        self.assertEqual((moco.epochs, moco.batch_size_per_gpu, moco.head_hidden_dim, moco.head_out_dim),
                         (400, 1024, 4096, 256))
        self.assertAlmostEqual(moco.base_lr * moco.batch_size_per_gpu / 256, 6e-4)
        self.assertEqual((moco.temperature, moco.ema_momentum, moco.weight_decay), (0.2, 0.99, 0.1))
        self.assertEqual((ft.epochs, ft.warmup_epochs, ft.batch_size_per_gpu, ft.base_lr, ft.layer_decay),
                         (300, 5, 1024, 1e-3, 0.85))
        self.assertEqual((ft.mixup, ft.cutmix, ft.randaug_magnitude, ft.drop_path, ft.label_smoothing, ft.min_lr),
                         (0.2, 0.0, 10, 0.0, 0.0, 1e-6))
        self.assertEqual((runs["mocov3_ft_s0"].layer_decay, runs["mocov3_keep0_s0"].layer_decay), (0.75, 0.75))
        self.assertEqual(runs["dmae_s0"].alpha_attn, 1.0)
        self.assertEqual(runs["dmae_s0"].attn_layers, "-1")  # the last layer's attention
        tr = runs["mae_flowers102_s0"]
        self.assertEqual((tr.optimizer, tr.weight_decay, tr.clip_grad, tr.layer_decay, tr.epochs, tr.warmup_epochs),
                         ("sgd", 0, 1.0, 0.75, 50, 10))
        self.assertAlmostEqual(tr.base_lr * tr.batch_size_per_gpu / 256, 0.1)
        self.assertEqual((tr.mixup, tr.randaug_magnitude, tr.crop_min_scale), (0, 0, 0.08))
        dino = runs["dino_s0"]
        self.assertEqual((dino.head_out_dim, dino.head_hidden_dim, dino.local_crops), (65536, 2048, 8))
        self.assertEqual((dino.batch_size_per_gpu, dino.ema_momentum, dino.base_lr, dino.teacher_temp), (1024, 0.996,
                                                                                                         5e-4, 0.07))

    def test_the_cpu_study_fine_tunes_mocov3_at_its_own_layer_decay(self):  # both claim 1's and claim 2's fine-tunes
        decays = lambda **kw: {r.name: r.cfg.layer_decay for r in reproduce.study(reproduce.Config(**kw))
                               if r.name in ("mae_ft_s0", "dmae_ft_s0", "mocov3_ft_s0", "dino_ft_s0", "mae_keep2_s0",
                                             "mocov3_keep2_s0")}
        self.assertEqual(decays(), dict(mae_ft_s0=0.85, dmae_ft_s0=0.85, mocov3_ft_s0=0.85, dino_ft_s0=0.75,
                                        mae_keep2_s0=0.85, mocov3_keep2_s0=0.85))
        self.assertEqual(decays(moco_layer_decay=0.75), dict(mae_ft_s0=0.85, dmae_ft_s0=0.85, mocov3_ft_s0=0.75,
                                                             dino_ft_s0=0.75, mae_keep2_s0=0.85, mocov3_keep2_s0=0.75))

    def test_dinos_sweep_joins_the_study_when_asked(self):
        sweep = lambda **kw: [r.name for r in reproduce.study(reproduce.Config(**kw)) if r.tags.get("sweep")]
        self.assertEqual(sweep(dino_sweep=True), ["dino_b256_s0", "dino_b256t04_s0", "dino_b64_s0"])
        self.assertEqual(sweep(), [])

    def test_each_runs_own_command_gives_exactly_its_settings(self):  # what a cluster user hands to their scheduler
        for cfg in (reproduce.Config(), reproduce.Config(preset="fewgpu", gpus="")):
            for run in reproduce.study(cfg):
                launcher, script, *flags = reproduce.command(run, cfg).split(" ")
                stage = importlib.import_module(script.removesuffix(".py"))
                parsed = reproduce.settings(reproduce.Run(run.name, parse_config(stage.Config, flags)))
                self.assertEqual(parsed, reproduce.settings(run), run.name)

    def test_the_plan_prints_every_run_with_hours_and_its_own_command(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            total, hours = reproduce.main(reproduce.Config(preset="fewgpu", gpus="0,1,2,3", gpus_per_run=4,
                                                           plan=True))
        lines = out.getvalue().splitlines()
        runs = reproduce.study(reproduce.Config(preset="fewgpu", gpus="0,1,2,3", gpus_per_run=4))
        for r in runs:
            self.assertTrue(any(line.startswith(r.name + " ") for line in lines), r.name)
        mae = next(line for line in lines if line.startswith("mae_s0 "))
        self.assertIn("torchrun --nproc_per_node=4 pretrain_mae.py", mae)
        self.assertIn("--batch_size_per_gpu=1024", mae)  # 4096 over 4 GPUs
        self.assertIn("--epochs=100", mae)
        # MAE-Tiny 100 epochs of ImageNet at 31,100 img/s: 1.14 GPU-hours
        self.assertAlmostEqual(float(mae.split()[1]), 100 * 1281167 / 31100 / 3600, places=2)
        self.assertGreater(hours, total / 4)  # wall-clock on 4 GPUs: no faster than never idle
        self.assertLess(hours, 30)  # the preset's promise: about a day


class TestVerdicts(unittest.TestCase):
    def test_compare_needs_twice_the_standard_error(self):
        self.assertEqual(report.compare([70, 71, 72], [60, 61, 62]), ">")
        self.assertEqual(report.compare([60, 61, 62], [70, 71, 72]), "<")
        self.assertEqual(report.compare([70, 75, 65], [69, 74, 64]), "≈")  # 1 point apart, std 5

    def test_verdict_words(self):
        self.assertEqual(report.verdict([">", ">"], ">>"), "**reproduced**")
        self.assertEqual(report.verdict([">", "≈"], ">>"), "**mixed**")
        self.assertEqual(report.verdict(["<", "≈"], ">>"), "**not reproduced**")
        self.assertEqual(report.verdict(["≈", "≈"], ">>"), "**not shown** (within noise)")

    def test_bad_seeds_are_one_clear_error(self):
        with self.assertRaisesRegex(ValueError, "comma-separated integers"):
            reproduce.Config(seeds="0,one")



class TestTypedAsAScript(unittest.TestCase):
    def test_a_study_file_typed_as_a_script_says_how_to_run_it(self):  # the stages are one folder up from study/
        for path, module in (("study/reproduce.py", "study.reproduce"), ("study/bench.py", "study.bench")):
            run = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=TIMEOUT)
            self.assertEqual(run.returncode, 1, run.stderr)
            self.assertEqual(run.stderr.strip().splitlines(), [f"{path} is part of the study package: run it from "
                                                               f"the project's folder as python -m {module}"])


if __name__ == "__main__":
    unittest.main()
