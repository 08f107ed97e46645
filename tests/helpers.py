"""Small settings shared by the stage tests: a depth-2, width-32 ViT on 16x16 crops of the embedded data."""
import contextlib
import io

TINY = dict(model="micro", img_size=16, patch_size=4, subset=64, batch_size_per_gpu=16, epochs=1, warmup_epochs=0,
            num_workers=0)


@contextlib.contextmanager
def quiet():
    """Silence the stages' progress output inside a test."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
