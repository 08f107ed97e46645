"""Training-step throughput (img/s) and peak memory of the shared ViT and of the MAE step.

One optimizer step = forward + backward + AdamW update on random images, bf16 autocast on CUDA, fp32 on CPU.
Measured after warm-up steps; CUDA timings are synchronised. timm's ViT-Tiny is measured beside ours when timm
is installed (optional). Speed targets are checked here, never in the tests.

    python bench.py                                  # CPU: cpu-sized ViT at 32 px, and ViT-Tiny at 224 px
    python bench.py --model=tiny --img_size=224 --patch_size=16 --batch_size=256 --steps=20     # on a GPU
"""
import json
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import autocast_ctx, check, check_ranges, cli
from model import VIT_SIZES, create_vit
from pretrain_mae import MAE, Config as MAEConfig


@dataclass
class Config:
    model: str = ""  # one size to measure; empty = cpu at 32 px and tiny at 224 px
    img_size: int = 224  # input side, when model is given
    patch_size: int = 16  # patch side, when model is given
    num_heads: int = 0  # attention heads; 0 = the size's default (timm's vit_tiny has 3)
    batch_size: int = 0  # images per step; 0 = 256 on CUDA, 32 on CPU
    steps: int = 5  # timed steps after 2 warm-up steps
    compile: bool = False  # torch.compile the model first (CUDA)
    out: str = ""  # also write the results to this JSON file

    def __post_init__(self):
        check_ranges(self, img_size=">0", patch_size=">0", num_heads=">=0", batch_size=">=0", steps=">0")
        check(self.img_size % self.patch_size == 0, f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        check(not self.model or self.model in VIT_SIZES, f"model must be one of {sorted(VIT_SIZES)}, got {self.model!r}")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide high-water mark (Linux: KiB)


def time_steps(model, step_fn, batch, img_size, steps, device, compile_):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fn = torch.compile(model) if compile_ else model
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(2 + steps):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast_ctx(device):
            loss = step_fn(fn, imgs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), peak_memory_mb(device)


def classify(model, imgs, labels):
    return F.cross_entropy(model(imgs).float(), labels)


def mae_step(model, imgs, labels):
    return model(imgs)[0]


def main(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = cfg.batch_size or (256 if device.type == "cuda" else 32)
    sizes = [(cfg.model, cfg.img_size, cfg.patch_size)] if cfg.model else [("cpu", 32, 4), ("tiny", 224, 16)]
    results = []
    for size, img, patch in sizes:
        vit = create_vit(size, cfg.num_heads, img_size=img, patch_size=patch).to(device)
        mae = MAE(MAEConfig(model=size, num_heads=cfg.num_heads, img_size=img, patch_size=patch)).to(device)
        runs = [("vit", vit, classify), ("mae", mae, mae_step)]
        try:
            import timm  # optional reference point, never a requirement

            if size == "tiny" and img == 224:
                runs.append(("timm vit_tiny_patch16_224", timm.create_model("vit_tiny_patch16_224").to(device), classify))
        except ImportError:
            pass
        for name, model, fn in runs:
            ips, mem = time_steps(model, fn, batch, img, cfg.steps, device, cfg.compile)
            row = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
                       model=size, what=name, img_size=img, batch=batch, imgs_per_s=round(ips, 1), peak_mem_mb=round(mem))
            results.append(row)
            print(f"{row['device']:>24} {size:>5} {name:>26} {img}px batch {batch}: {ips:8.1f} img/s, "
                  f"peak memory {mem:7.0f} MB")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    cli(main, Config)
