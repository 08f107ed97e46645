r"""The main job's reference logs (results/reference/), drawn dashed in the curves of a run with its settings
(figures.reference_of). Regenerate them from a finished main job whose folders are given:

    python pretrain_mae.py --out_dir=/tmp/ref/mae && python finetune.py --init_ckpt=/tmp/ref/mae/ckpt.pt \
        --out_dir=/tmp/ref/finetune
    python -m study.reference /tmp/ref/mae /tmp/ref/finetune

Each log is copied as it is; each config gets the main job's own paths (out/mae, out/finetune, out/mae/ckpt.pt), so a
fresh `python pretrain_mae.py && python finetune.py` matches it.
"""
import json
import os
import sys

from checkpoint import read_log, write_text
from figures import REFERENCE_DIR

MAIN_JOB_PATHS = {"mae": dict(out_dir="out/mae"), "finetune": dict(out_dir="out/finetune", init_ckpt="out/mae/ckpt.pt")}


def main(mae_dir, finetune_dir=""):
    """Copy each finished folder's log and config; an empty folder name leaves that stage's reference as it is."""
    os.makedirs(REFERENCE_DIR, exist_ok=True)
    for name, folder in (("mae", mae_dir), ("finetune", finetune_dir)):
        if not folder:
            continue
        rows = read_log(folder)
        if not rows:
            sys.exit(f"study.reference: {folder} has no log.jsonl: pass the main job's finished folders")
        with open(os.path.join(folder, "config.json")) as f:
            config = dict(json.load(f), **MAIN_JOB_PATHS[name])
        if rows[-1]["epoch"] != config["epochs"]:
            sys.exit(f"study.reference: {folder} holds {rows[-1]['epoch']} of {config['epochs']} epochs: finish it "
                     "first")
        write_text(os.path.join(REFERENCE_DIR, f"{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        write_text(os.path.join(REFERENCE_DIR, f"{name}.config.json"), json.dumps(config, indent=2) + "\n")
        print(f"wrote {REFERENCE_DIR}/{name}.jsonl and {name}.config.json ({len(rows)} epochs of {folder})")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m study.reference MAE_DIR [FINETUNE_DIR] (a finished main job's folders)")
    main(*sys.argv[1:])
