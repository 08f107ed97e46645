"""Small settings shared by the stage tests: a depth-2, width-32 ViT on 16x16 crops of the embedded data."""
import contextlib
import io
import os
import shutil
from unittest import mock

import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The limit on any subprocess a test waits for: a hang, never the machine's speed (a newcomer's loaded laptop runs at
# a tenth of a free CPU's speed; a 60-second limit failed there)
TIMEOUT = 3600
TINY = dict(model="micro", img_size=16, patch_size=4, subset=64, batch_size_per_gpu=16, epochs=1, warmup_epochs=0,
            num_workers=0)


@contextlib.contextmanager
def quiet():
    """Silence the stages' progress output inside a test."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def tiny_mae(folder):
    """A one-epoch micro MAE pre-trained quietly in folder/mae: (its folder, its checkpoint's path)."""
    import pretrain_mae
    out = os.path.join(folder, "mae")
    with quiet():
        pretrain_mae.main(pretrain_mae.Config(**TINY, out_dir=out))
    return out, os.path.join(out, "ckpt.pt")


def crash_then_resume(stage, cfg):
    """Run stage.main(cfg), killed right after its first checkpoint is written, then run it again (it resumes).
    Returns what the second run returns."""
    real_save, saved = checkpoint.save_ckpt, []

    def save_then_crash(obj, path):
        real_save(obj, path)
        saved.append(obj["epoch"])
        raise KeyboardInterrupt

    with quiet():
        with mock.patch.object(checkpoint, "save_ckpt", save_then_crash):
            try:
                stage.main(cfg)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the run was not interrupted")
        assert saved == [1], f"expected to be killed after epoch 1, got {saved}"
        return stage.main(cfg)


def project_copy(dest):
    """The project's modules and stages copied to dest (its data folder linked): a student's copy to edit."""
    os.makedirs(dest)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), dest)
    os.symlink(os.path.join(ROOT, "data"), os.path.join(dest, "data"))
    return dest
