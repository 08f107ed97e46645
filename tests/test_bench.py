"""bench.py: each stage end to end, its loading alone and its data path alone (no model), written to JSON."""
import json
import os
import tempfile
import unittest

import bench
from tests.helpers import quiet


class TestBench(unittest.TestCase):
    def test_stage_rows_end_to_end_and_data_path(self):
        with tempfile.TemporaryDirectory() as tmp, quiet():
            out = os.path.join(tmp, "bench.json")
            bench.main(bench.Config(stages="mae,finetune,dino", stage_model="micro", stage_img_size=16, stage_patch=4,
                                    stage_batch=16, stage_epochs=1, stage_subset=64, num_workers=0, model_steps=False,
                                    out=out))
            rows = {r["what"]: r for r in json.load(open(out))}
        for stage in ("mae", "finetune", "dino"):
            e2e, load, data = (rows[f"{stage} {w}"] for w in ("end to end (embedded)", "loading alone",
                                                              "data path alone"))
            self.assertGreater(e2e["imgs_per_s"], 0)
            self.assertGreater(e2e["peak_mem_mb"], 0)
            # the data path is part of the end-to-end step, so alone it runs faster than the whole step
            self.assertGreater(data["imgs_per_s"], e2e["imgs_per_s"])
            self.assertGreater(load["imgs_per_s"], e2e["imgs_per_s"])
            self.assertAlmostEqual(data["share_of_step"], e2e["imgs_per_s"] / data["imgs_per_s"], places=2)


if __name__ == "__main__":
    unittest.main()
