"""reproduce.py: --quick runs every step and writes the report; a second call skips finished runs; a deleted run is
redone to the same number (deterministic); other settings in the same folder are refused; the verdict rules."""
import json
import os
import shutil
import tempfile
import unittest

import reproduce
from common import RunError
from tests.helpers import quiet

CLAIMS = ("## Claim 1", "## Claim 2", "## Claim 3", "## Claim 4")
FIGURES = ("curves.png", "knn.png", "dino_loss.png", "layers.png", "transfer.png", "attn_distance.png", "cka_mae_vs_supervised.png",
           "recon_mae.png", "recon_dmae.png", "attn_maps_mae.png", "attn_maps_mocov3.png", "attn_maps_dmae.png",
           "attn_maps_supervised.png")


class TestReproduce(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        cls.cfg = reproduce.Config(quick=True, out_dir=cls.tmp)
        with quiet():
            cls.results = reproduce.main(cls.cfg)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_quick_study_runs_every_step_and_writes_the_report(self):
        runs = reproduce.study(self.cfg)
        self.assertEqual(set(self.results), {r.name for r in runs})
        for r in runs:  # each run left its result in its folder
            self.assertTrue(os.path.exists(reproduce.result_path(r)), r.name)
        report = open(os.path.join(self.tmp, "REPORT.md")).read()
        for claim in CLAIMS:
            self.assertIn(claim, report)
        self.assertIn("Verdict", report)
        for fig in FIGURES:
            self.assertGreater(os.path.getsize(os.path.join(self.tmp, "figures", fig)), 1000, fig)
        # every fine-tuning run logged one top-1 per epoch; the layer study covers K = 0 .. depth
        self.assertEqual(len(self.results["scratch_s0"]["curve"]), 1)
        self.assertEqual(len(self.results["scratch_long_s0"]["curve"]), 2)
        self.assertEqual([r.cfg.reinit_from_block for r in runs if r.name.startswith("mae_keep")], [0, 1, -1])  # depth 2

    def test_second_call_skips_and_a_deleted_run_is_redone_to_the_same_number(self):
        shutil.rmtree(os.path.join(self.tmp, "runs", "mae_ft_s0"))
        with quiet():
            again = reproduce.main(self.cfg)
        for name, res in self.results.items():
            self.assertEqual(again[name]["config"], res["config"], name)
            if name != "mae_ft_s0":  # untouched: read back, not re-run
                self.assertEqual(again[name]["seconds"], res["seconds"], name)
        self.assertEqual(again["mae_ft_s0"]["curve"], self.results["mae_ft_s0"]["curve"])  # deterministic re-run

    def test_other_settings_in_the_same_folder_are_refused(self):
        with self.assertRaisesRegex(RunError, "other settings .*patch_size 7 -> 14"):
            reproduce.run_all(reproduce.study(reproduce.Config(quick=True, out_dir=self.tmp, patch_size=14)), self.cfg)


class TestVerdicts(unittest.TestCase):
    def test_compare_needs_twice_the_standard_error(self):
        self.assertEqual(reproduce.compare([70, 71, 72], [60, 61, 62]), ">")
        self.assertEqual(reproduce.compare([60, 61, 62], [70, 71, 72]), "<")
        self.assertEqual(reproduce.compare([70, 75, 65], [69, 74, 64]), "≈")  # 1 point apart, std 5

    def test_verdict_words(self):
        self.assertEqual(reproduce.verdict([">", ">"], ">>"), "**reproduced**")
        self.assertEqual(reproduce.verdict([">", "≈"], ">>"), "**mixed**")
        self.assertEqual(reproduce.verdict(["<", "≈"], ">>"), "**not reproduced**")
        self.assertEqual(reproduce.verdict(["≈", "≈"], ">>"), "**not shown** (within noise)")

    def test_bad_seeds_are_one_clear_error(self):
        with self.assertRaisesRegex(ValueError, "comma-separated integers"):
            reproduce.Config(seeds="0,one")


if __name__ == "__main__":
    unittest.main()
