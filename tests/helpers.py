"""Small settings shared by the stage tests: a depth-2, width-32 ViT on 16x16 crops of the embedded data."""
import contextlib
import io
import os
from unittest import mock

import checkpoint

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
