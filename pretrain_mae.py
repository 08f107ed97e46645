r"""MAE pre-training of a plain ViT, with the MAE-Lite light decoder (PAPER §1.2, §2.1).

Random masking keeps exactly (1 - mask_ratio) of the patches per image; the encoder sees only those plus cls;
a 1-block, 96-wide decoder fills in mask tokens and predicts pixels; the loss is MSE on the removed patches
against per-patch normalised pixels (norm-pix). After each epoch the master writes a reconstruction grid.

    python pretrain_mae.py                                   # CPU: cpu-sized ViT on the embedded data, minutes
    python pretrain_mae.py --model=tiny --img_size=224 --patch_size=16 --data=imagefolder --data_root=/imagenet
    torchrun --nproc_per_node=8 pretrain_mae.py --model=tiny --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --epochs=400 --warmup_epochs=40 --batch_size_per_gpu=512 --base_lr=1.5e-4 \
        --crop_min_scale=0.08 --num_workers=10      # the paper's recipe: global batch 4096, lr 2.4e-3
"""
import contextlib
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image
from tqdm import tqdm

import augment
from common import (autocast_ctx, check, check_finite, check_ranges, cli, cosine_value, gather_rng_states, make_scaler,
                    param_groups, prepare_out_dir, print0, save_ckpt, seed_everything, set_lr, setup_dist, try_resume,
                    unlock_out_dir, write_log)
from data import Loader, build_dataset, first_images
from model import VIT_SIZES, MAEDecoder, create_vit, patchify, random_masking, unpatchify, vit_heads


@dataclass
class Config:
    # data
    data: str = "embedded"  # embedded | mnist | fashion-mnist | imagefolder | cifar10 | cifar100 | flowers102 | pets | aircraft | cars
    data_root: str = ""  # folder of the data (ImageNet: has train/ and val/); unused for embedded
    subset: int = 0  # use only the first N training images (0 = all); for quick checks
    img_size: int = 32  # input side in pixels; the paper: 224
    crop_min_scale: float = 0.2  # RandomResizedCrop lower area bound; MAE-Lite: 0.08, MAE: 0.2
    num_workers: int = 2  # data-loading processes per GPU
    # model
    model: str = "cpu"  # ViT size: cpu | tiny | small | base
    num_heads: int = 0  # attention heads; 0 = the size's default (cpu 6, tiny/small/base 12 as MAE-Lite)
    patch_size: int = 4  # patch side in pixels; the paper: 16
    mask_ratio: float = 0.75  # fraction of patches removed, in (0, 1)
    decoder_dim: int = 96  # MAE-Lite: 96 (original MAE: 512)
    decoder_depth: int = 1  # MAE-Lite: 1 (original MAE: 8)
    decoder_heads: int = 3  # MAE-Lite: 3 (original MAE: 16)
    norm_pix_loss: bool = True  # predict per-patch normalised pixels (MAE §4, on in MAE-Lite)
    # optimisation
    epochs: int = 20  # the paper: 400
    warmup_epochs: int = 2  # linear lr warm-up; the paper: 40
    batch_size_per_gpu: int = 256  # global batch = this x world size x accum_steps; the paper: 4096 in all
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation), to reach the paper's batch
    base_lr: float = 1.5e-3  # lr = base_lr x global batch / 256; the paper: 1.5e-4 (short CPU runs like more)
    weight_decay: float = 0.05  # AdamW, not on biases/norms/tokens
    # run
    out_dir: str = "out/mae"  # ckpt.pt, log.jsonl, config.json, recon_eNNN.png
    resume: bool = True  # continue from out_dir/ckpt.pt if it exists
    seed: int = 0  # each rank uses seed + rank
    compile: bool = False  # torch.compile the model (CUDA)

    def __post_init__(self):
        check_ranges(self, subset=">=0", img_size=">0", crop_min_scale="(0,1]", num_workers=">=0", num_heads=">=0",
                     patch_size=">0", mask_ratio="(0,1)", decoder_dim=">0", decoder_depth=">=0", decoder_heads=">0",
                     epochs=">0", warmup_epochs=">=0", batch_size_per_gpu=">0", accum_steps=">0", base_lr=">0",
                     weight_decay=">=0", seed=">=0")
        check(self.warmup_epochs <= self.epochs, f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        check(self.img_size % self.patch_size == 0,
              f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        num_patches = (self.img_size // self.patch_size) ** 2
        keep = int(num_patches * (1 - self.mask_ratio))
        check(0 < keep < num_patches, f"mask_ratio {self.mask_ratio} keeps {keep} of the {num_patches} patches of this "
                                      "grid; it must keep at least one and remove at least one")
        check(self.decoder_dim % self.decoder_heads == 0 and self.decoder_dim % 4 == 0,
              f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads {self.decoder_heads} and by 4")
        check(self.model in VIT_SIZES, f"model must be one of {sorted(VIT_SIZES)}, got {self.model!r}")
        self.num_heads = vit_heads(self.model, self.num_heads)  # resolved, so checkpoints record the real count


def augment_batch(imgs, cfg):
    """MAE's only augmentation, on a uint8 batch on the device: RandomResizedCrop (scale crop_min_scale..1, bicubic),
    horizontal flip, ImageNet normalisation."""
    return augment.normalize(augment.random_resized_crop(imgs, cfg.img_size, (cfg.crop_min_scale, 1.0)))


def mae_loss(imgs, pred, mask, patch_size, norm_pix):
    """MSE per patch against (optionally per-patch normalised) pixels, averaged over removed patches only (MAE §3)."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


class MAE(nn.Module):
    """encoder (a ViT without head) + decoder; everything MAE-specific in forward is in this file."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = create_vit(cfg.model, cfg.num_heads, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                  num_classes=0)
        self.decoder = MAEDecoder(self.encoder.grid, cfg.patch_size, 3, self.encoder.embed_dim,
                                  cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)

    def encode_decode(self, imgs, return_attn=False, return_hidden=False, generator=None):
        L = self.encoder.grid ** 2
        ids_keep, mask, ids_restore = random_masking(len(imgs), L, self.cfg.mask_ratio, imgs.device, generator)
        latent, attns, hiddens = self.encoder.forward_features(imgs, ids_keep, return_attn, return_hidden)
        pred = self.decoder(latent, ids_restore)
        return pred, mask, ids_keep, attns, hiddens

    def forward(self, imgs):
        """Returns the loss and a dict of extra numbers to log (none for plain MAE)."""
        pred, mask, *_ = self.encode_decode(imgs)
        return mae_loss(imgs, pred, mask, self.cfg.patch_size, self.cfg.norm_pix_loss), {}


@torch.no_grad()
def reconstruction_grid(mae, imgs, seed=0):
    """Rows of (original, masked input, reconstruction with the visible patches pasted in), in [0, 1] pixels."""
    p, grid = mae.cfg.patch_size, mae.encoder.grid
    g = torch.Generator(device=imgs.device).manual_seed(seed)  # same masks every epoch, training RNG untouched
    pred, mask, *_ = mae.encode_decode(imgs, generator=g)
    target = patchify(imgs, p)
    if mae.cfg.norm_pix_loss:  # predictions are in normalised-patch units: undo with the true patch statistics
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    m = mask[..., None]  # (B, L, 1), 1 = removed
    masked = unpatchify(target * (1 - m), p, grid)
    recon = unpatchify(target * (1 - m) + pred * m, p, grid)
    mean = torch.tensor(augment.IMAGENET_MEAN, device=imgs.device)[:, None, None]
    std = torch.tensor(augment.IMAGENET_STD, device=imgs.device)[:, None, None]
    rows = torch.stack([imgs, masked, recon], dim=1).flatten(0, 1) * std + mean
    return rows.clamp(0, 1)


def main(cfg, model=None):
    """Train. `model` lets distill.py reuse this loop with an MAE subclass that adds distillation losses."""
    # --- setup ---
    rank, world, device = setup_dist()
    master = rank == 0
    seed_everything(cfg.seed + rank)
    if master:
        prepare_out_dir(cfg, __file__)

    # --- data --- (uint8 batches on the device; crop, flip and normalise there, batched: augment.py)
    dataset, _ = build_dataset(cfg.data, cfg.data_root, True, cfg.subset)
    loader = Loader(dataset, cfg.batch_size_per_gpu, True, cfg.num_workers, device)
    view_imgs = augment.normalize(augment.center_crop(first_images(dataset, 8, device), cfg.img_size))

    # --- model ---
    raw_model = (model or MAE(cfg)).to(device)
    print0(f"encoder {sum(p.numel() for p in raw_model.encoder.parameters()) / 1e6:.2f}M params, "
           f"decoder {sum(p.numel() for p in raw_model.decoder.parameters()) / 1e6:.3f}M")

    # --- optimizer & schedule ---
    global_batch = cfg.batch_size_per_gpu * world * cfg.accum_steps
    lr = cfg.base_lr * global_batch / 256
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
    scaler = make_scaler(device)
    steps_per_epoch = len(loader) // cfg.accum_steps  # optimizer steps; a last incomplete group is skipped
    check(steps_per_epoch > 0, f"{len(loader)} batches per epoch are fewer than accum_steps {cfg.accum_steps}")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    print0(f"global batch {global_batch}, lr {lr:.2e}, {steps_per_epoch} steps/epoch, {total_steps} steps")

    # --- resume ---
    ckpt = try_resume(cfg, rank, model=raw_model, optimizer=optimizer, scaler=scaler)
    start_epoch, history = (ckpt["epoch"], ckpt["log"]) if ckpt else (0, [])
    model = DDP(raw_model) if world > 1 else raw_model  # wrap last: raw_model stays for saving
    if cfg.compile:
        model = torch.compile(model)

    # --- train loop ---
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        model.train()
        t0, sums, micro_batches = time.time(), {}, steps_per_epoch * cfg.accum_steps
        pbar = tqdm(loader, disable=not master, desc=f"ep {epoch}", leave=False, total=micro_batches)
        for it, (imgs, _) in enumerate(pbar):
            if it == micro_batches:
                break
            step, last_micro = epoch * steps_per_epoch + it // cfg.accum_steps, it % cfg.accum_steps == cfg.accum_steps - 1
            lr_now = cosine_value(step, total_steps, warmup_steps, lr)
            set_lr(optimizer, lr_now)
            imgs = augment_batch(imgs, cfg)
            # gradient accumulation: DDP all-reduces only on the last micro-batch of each optimizer step
            with contextlib.nullcontext() if last_micro or world == 1 else model.no_sync():
                with autocast_ctx(device):
                    loss, extra = model(imgs)
                loss_value = check_finite(loss, epoch, step)
                scaler.scale(loss / cfg.accum_steps).backward()
            if last_micro:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            # epoch means of the loss and of its parts (distill.py returns parts in `extra`)
            sums["loss"] = sums.get("loss", 0.0) + loss_value
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            pbar.set_postfix_str(f"loss {loss_value:.4f} lr {lr_now:.1e}")
        imgs_per_s = steps_per_epoch * global_batch / (time.time() - t0)
        row = dict(epoch=epoch + 1, step=step + 1, lr=lr_now, imgs_per_s=imgs_per_s,
                   **{k: v / micro_batches for k, v in sums.items()})
        parts = " ".join(f"{k} {v / micro_batches:.4f}" for k, v in sums.items() if k != "loss")
        print0(f"ep {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} {parts} lr {lr_now:.1e} {imgs_per_s:.0f} img/s")

        # --- eval: reconstructions (MAE has no accuracy to measure during pre-training) ---
        rng = gather_rng_states()  # collective: every rank calls it
        if master:
            raw_model.eval()
            save_image(reconstruction_grid(raw_model, view_imgs), os.path.join(cfg.out_dir, f"recon_e{epoch + 1:03d}.png"),
                       nrow=6, padding=1)

            # --- save --- (the log rows travel in the checkpoint: log.jsonl is rewritten from them, never behind)
            history.append(row)
            save_ckpt(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                           epoch=epoch + 1, step=step + 1, config=asdict(cfg), rng=rng, log=history),
                      os.path.join(cfg.out_dir, "ckpt.pt"))
            write_log(cfg.out_dir, history)
    if master:
        unlock_out_dir(cfg.out_dir)
    return raw_model


if __name__ == "__main__":
    cli(main, Config)
