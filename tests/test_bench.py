"""bench.py: each stage end to end, its loading alone and its data path alone (no model), written to JSON."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

from study import bench
from tests.helpers import quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestBench(unittest.TestCase):
    def test_stage_rows_end_to_end_and_data_path(self):
        with tempfile.TemporaryDirectory() as tmp, quiet():
            out = os.path.join(tmp, "bench.json")
            bench.main(bench.Config(stages="mae,finetune,dino", stage_model="micro", stage_img_size=16, stage_patch=4,
                                    stage_batch=16, stage_epochs=1, stage_subset=64, num_workers=0, model_steps=False,
                                    out=out))
            rows = {r["what"]: r for r in json.load(open(out))}
        for stage in ("mae", "finetune", "dino"):
            e2e, load, data = (rows[f"{stage} {w} (embedded)"] for w in ("end to end", "loading alone",
                                                                         "data path alone"))
            self.assertGreater(e2e["imgs_per_s"], 0)
            self.assertGreater(e2e["peak_mem_mb"], 0)
            # each row measured (how they compare is a speed, which a loaded machine may reorder: no test of it)
            self.assertGreater(data["imgs_per_s"], 0)
            self.assertGreater(load["imgs_per_s"], 0)
            self.assertAlmostEqual(data["share_of_step"], e2e["imgs_per_s"] / data["imgs_per_s"], places=2)

    def test_make_jpegs_into_a_folder_that_holds_files_is_one_line(self):  # the documented command, typed twice
        with tempfile.TemporaryDirectory() as tmp:
            open(os.path.join(tmp, "kept.jpg"), "w").close()
            run = subprocess.run([sys.executable, "-m", "study.bench", "--stages=mae", "--data=imagefolder",
                                  f"--data_root={tmp}", "--make_jpegs=3", "--model_steps=false"], cwd=ROOT,
                                 capture_output=True, text=True)
            self.assertEqual(os.listdir(tmp), ["kept.jpg"])
        self.assertEqual(run.returncode, 2, run.stderr)
        self.assertEqual(run.stderr.strip().splitlines(), [
            f"bench.py: error: --make_jpegs writes a new folder, and {tmp} is not empty: drop --make_jpegs to measure "
            "the images already there, or give another --data_root (see --help)"])

    def test_files_report_one_worker_cores_rate_and_the_cores_a_step_needs(self):
        with tempfile.TemporaryDirectory() as tmp, quiet():
            out = os.path.join(tmp, "bench.json")
            bench.main(bench.Config(stages="mae", data="imagefolder", data_root=os.path.join(tmp, "jpegs"),
                                    make_jpegs=24, stage_model="micro", stage_img_size=32, stage_patch=4, stage_batch=8,
                                    stage_epochs=1, num_workers=1, model="micro", img_size=32, patch_size=4,
                                    batch_size=8, steps=1, out=out))
            rows = {r["what"]: r for r in json.load(open(out))}
        worker = rows["mae one worker core (imagefolder)"]
        self.assertGreater(worker["imgs_per_s"], 0)
        self.assertAlmostEqual(worker["cores_to_feed_this_step"],
                               rows["mae end to end (imagefolder)"]["imgs_per_s"] / worker["imgs_per_s"], delta=0.1)
        step = rows["mae model step"]
        self.assertAlmostEqual(step["worker_cores_to_feed"], step["imgs_per_s"] / worker["imgs_per_s"], delta=0.1)

    def test_pack_measures_the_store_beside_the_files_and_their_ratios(self):
        with tempfile.TemporaryDirectory() as tmp, quiet():
            out = os.path.join(tmp, "bench.json")
            bench.main(bench.Config(stages="mae", data="imagefolder", data_root=os.path.join(tmp, "jpegs"),
                                    make_jpegs=12, pack=True, fidelity_sides="256,1000", stage_model="micro",
                                    stage_img_size=32, stage_patch=4, stage_batch=8, stage_epochs=1, num_workers=1,
                                    model_steps=False, rounds=2, out=out))
            rows = json.load(open(out))
        what = {r["what"]: r for r in rows}  # of the second pair, where there are two
        self.assertGreater(what["pack (data/pack.py)"]["imgs_per_s"], 0)
        pairs = [r for r in rows if r["what"] == "mae store / files"]
        self.assertEqual([r["round"] for r in pairs], [1, 2])
        median = what["mae store / files, median of 2 pairs"]
        for row in ("one worker core", "end to end"):
            self.assertAlmostEqual(median[f"{row} ratio"], sum(r[f"{row} ratio"] for r in pairs) / 2, delta=0.01)
        for source in ("imagefolder", "packed"):
            for row in ("end to end", "loading alone", "data path alone", "one worker core"):
                self.assertGreater(what[f"mae {row} ({source})"]["imgs_per_s"], 0)
        ratio = what["mae store / files"]
        for row in ("one worker core", "end to end"):  # the ratio of the two rows measured in this run
            self.assertAlmostEqual(ratio[f"{row} ratio"], what[f"mae {row} (packed)"]["imgs_per_s"]
                                   / what[f"mae {row} (imagefolder)"]["imgs_per_s"], delta=0.02)
        at256, whole = what["store at 256 px against the files"], what["store at 1000 px against the files"]
        self.assertGreater(at256["rrc_mean_abs_diff"], 0)  # resized once: a little is lost
        self.assertLess(at256["rrc_mean_abs_diff"], 3)
        self.assertLess(at256["centre_mean_abs_diff"], 0.5)  # 256 is the eval view's own resize
        # kept at their own size (every image is smaller than 1000 px): the files' pixels, but for JPEG's draft decode
        self.assertLess(whole["rrc_mean_abs_diff"], at256["rrc_mean_abs_diff"])
        self.assertGreater(whole["bytes_per_image"], at256["bytes_per_image"])


if __name__ == "__main__":
    unittest.main()
