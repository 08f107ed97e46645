r"""MAE pre-training of a plain ViT, with the MAE-Lite light decoder (PAPER §1.2, §2.1).

Random masking keeps exactly (1 - mask_ratio) of the patches per image; the encoder sees only those plus cls;
a 1-block, 96-wide decoder fills in mask tokens and predicts pixels; the loss is MSE on the removed patches
against per-patch normalised pixels (norm-pix). After epochs 1, 2, 4, 8, ... and the last, the master draws a
reconstruction grid.

    python pretrain_mae.py                                   # CPU: cpu-sized ViT on the embedded data, minutes
    python pretrain_mae.py --model=tiny --img_size=224 --patch_size=16 --data=imagefolder --data_root=/imagenet
    torchrun --nproc_per_node=8 pretrain_mae.py --model=tiny --img_size=224 --patch_size=16 --data=imagefolder \
        --data_root=/imagenet --epochs=400 --warmup_epochs=40 --batch_size_per_gpu=512 --base_lr=1.5e-4 \
        --crop_min_scale=0.08 --num_workers=10      # the paper's recipe: global batch 4096, lr 2.4e-3
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import augment
import figures
from checkpoint import RunFolder
from common import (EpochSteps, autocast_ctx, check_finite, cosine_schedule, epoch_line, make_scaler, optimizer_step,
                    param_groups, print0, seed_everything, set_lr, setup_dist, steps_in_epoch, wrap)
from data import Loader, build_dataset, figure_images
from flags import TrainFlags, check, check_config, cli
from model import Block, ViT, create_vit, patchify, sincos_pos_embed, vit_heads


@dataclass
class Config(TrainFlags):  # + the data and run flags every training stage shares
    # data
    img_size: int = 32  # input side in pixels; the paper: 224
    crop_min_scale: float = 0.2  # RandomResizedCrop lower area bound; MAE-Lite: 0.08, MAE: 0.2
    # model
    model: str = "cpu"  # ViT size: micro | mini | cpu | tiny | small | base
    num_heads: int = 0  # attention heads; 0 = the size's default (cpu 6, tiny/small/base 12 as MAE-Lite)
    mask_ratio: float = 0.75  # fraction of patches removed, in (0, 1)
    decoder_dim: int = 96  # MAE-Lite: 96 (original MAE: 512)
    decoder_depth: int = 1  # MAE-Lite: 1 (original MAE: 8)
    decoder_heads: int = 3  # MAE-Lite: 3 (original MAE: 16)
    norm_pix_loss: bool = True  # predict per-patch normalised pixels (MAE §4, on in MAE-Lite); see recon figures
    # optimisation
    epochs: int = 20  # the paper: 400
    warmup_epochs: int = 2  # linear lr warm-up; the paper: 40
    batch_size_per_gpu: int = 256  # global batch = this x world size x accum_steps; the paper: 4096 in all
    base_lr: float = 1.5e-3  # lr = base_lr x global batch / 256; the paper: 1.5e-4 (short CPU runs like more)
    weight_decay: float = 0.05  # AdamW, not on biases/norms/tokens
    # run
    out_dir: str = "out/mae"  # ckpt.pt, log.jsonl, config.json, recon_eNNN.png (epochs 1, 2, 4, ..., last)

    def __post_init__(self):
        check_config(self, crop_min_scale="(0,1]", mask_ratio="(0,1)", decoder_dim=">0", decoder_depth=">=0",
                     decoder_heads=">0")
        num_patches = (self.img_size // self.patch_size) ** 2
        keep = int(num_patches * (1 - self.mask_ratio))
        check(0 < keep < num_patches, f"mask_ratio {self.mask_ratio} keeps {keep} of the {num_patches} patches of this "
                                      "grid; it must keep at least one and remove at least one")
        check(self.decoder_dim % self.decoder_heads == 0 and self.decoder_dim % 4 == 0,
              f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads {self.decoder_heads} and by 4")
        self.num_heads = vit_heads(self.model, self.num_heads)  # resolved, so checkpoints record the real count


# --- MAE: masking -> encoder (visible patches) -> decoder -> loss on the removed patches (models_mae.py's order) ---
def random_masking(batch, num_patches, mask_ratio, device, generator=None):
    """MAE §3 per-sample random masking by argsort of uniform noise; every sample keeps exactly the same count.

    Returns ids_keep (B, K) of the visible patches, mask (B, L) with 1 = removed, and ids_restore (B, L)
    that puts [visible, removed] tokens back in raster order.
    """
    num_keep = int(num_patches * (1 - mask_ratio))  # int(), as MAE: 58 of 196 at 0.7 (round() would keep 59)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the lowest-noise patches are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_keep] = 0
    return ids_shuffle[:, :num_keep], torch.gather(mask, 1, ids_restore), ids_restore


class MAEDecoder(nn.Module):
    """MAE decoder. MAE-Lite (PAPER §1.2): 1 block of width 96 with 3 heads; the original MAE: 8 x 512, 16 heads."""

    def __init__(self, grid, patch_size, in_chans, encoder_dim, dim=96, depth=1, num_heads=3, mlp_ratio=4.0):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid), persistent=False)  # fixed, as in MAE
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size ** 2 * in_chans)
        self.apply(ViT._init_weights)  # MAE initialises the decoder as the encoder
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, ids_restore):
        """latent (B, 1+K, De) from the encoder -> per-patch pixel predictions (B, L, p*p*C)."""
        x = self.embed(latent)
        B, L = ids_restore.shape
        masks = self.mask_token.expand(B, L - (x.shape[1] - 1), -1)
        x_ = torch.cat([x[:, 1:], masks], dim=1)  # [visible, removed] without cls
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # back to raster order
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed  # cls back at index 0
        for blk in self.blocks:
            x, _ = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # drop the cls prediction


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

    def forward(self, imgs, teacher=None):
        """The loss and a dict of extra numbers to log (none for plain MAE; distill.py's D-MAE has a teacher)."""
        pred, mask, *_ = self.encode_decode(imgs)
        return mae_loss(imgs, pred, mask, self.cfg.patch_size, self.cfg.norm_pix_loss), {}


def views(cfg):  # MAE's one view, cut by the loader: RandomResizedCrop, scale crop_min_scale..1, bicubic
    return [(cfg.img_size, (cfg.crop_min_scale, 1.0))]


def augment_batch(crops):
    """MAE's only augmentation after its crop, on the device: a horizontal flip, then ImageNet normalisation."""
    return augment.normalize(augment.random_flip(crops[0]))


def main(cfg, mae=None, teacher=None):
    """Train. distill.py reuses this loop with its MAE subclass and frozen teacher, passed to forward (as
    pretrain_contrastive.py passes its EMA teacher): never a submodule, so never trained, saved or wrapped by DDP."""
    # --- setup ---
    rank, world, device = setup_dist()
    master = rank == 0
    seed_everything(cfg.seed + rank)
    with RunFolder(cfg, rank, inputs=[getattr(cfg, "teacher_ckpt", "")]) as run:  # never over distill's teacher

        # --- data --- (batches cut to MAE's view on the device or by the workers; flip, normalise: batched)
        dataset, _ = build_dataset(cfg.data, cfg.data_root, True, cfg.subset, cfg.classes)
        loader = Loader(dataset, cfg.batch_size_per_gpu, True, cfg.num_workers, device, views(cfg))
        view_imgs = augment.normalize(figure_images(dataset, 8, cfg.img_size, device)[0])

        # --- model ---
        raw_model = (mae or MAE(cfg)).to(device)
        print0(f"encoder {sum(p.numel() for p in raw_model.encoder.parameters()) / 1e6:.2f}M params, "
               f"decoder {sum(p.numel() for p in raw_model.decoder.parameters()) / 1e6:.2f}M")

        # --- optimizer & schedule ---
        global_batch = cfg.batch_size_per_gpu * world * cfg.accum_steps
        lr = cfg.base_lr * global_batch / 256
        optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
        scaler = make_scaler(device)
        steps_per_epoch = steps_in_epoch(loader, cfg.accum_steps)
        total_steps = cfg.epochs * steps_per_epoch
        lr_schedule = cosine_schedule(total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        print0(f"global batch {global_batch}, lr {lr:.2e}, {steps_per_epoch} steps/epoch, {total_steps} steps")

        # --- resume ---
        run.start(rank, lr_schedule, model=raw_model, optimizer=optimizer, scaler=scaler)
        model = wrap(raw_model, world, cfg.compile)

        # --- train loop ---
        for epoch in range(run.start_epoch, cfg.epochs):
            model.train()
            steps = EpochSteps(loader, epoch, steps_per_epoch, cfg, model)
            for step, sync, (crops, _) in steps:
                set_lr(optimizer, lr_schedule[step])
                imgs = augment_batch(crops)
                with autocast_ctx(device):
                    loss, extra = model(imgs, teacher)
                loss_value = check_finite(loss, epoch, step)
                scaler.scale(loss / cfg.accum_steps).backward()
                if sync:
                    optimizer_step(optimizer, scaler, raw_model)
                steps.add(loss=loss_value, **{k: v.item() for k, v in extra.items()})  # distill.py's loss parts
                steps.show(f"loss {loss_value:.4f} lr {lr_schedule[step]:.1e}")
            row = steps.row(global_batch, lr=lr_schedule)

            # --- eval: reconstructions of 8 training images (MAE has no accuracy to measure while pre-training) ---
            if master and ((epoch + 1) & epoch == 0 or epoch + 1 == cfg.epochs):  # epochs 1, 2, 4, 8, ..., last
                raw_model.eval()
                figures.save_reconstructions(raw_model, view_imgs, f"{type(raw_model).__name__} reconstructions of "
                                             f"8 training images (centre crops), {cfg.out_dir} epoch {epoch + 1}",
                                             run.output(f"recon_e{epoch + 1:03d}.png"))

            # --- save --- (the log rows travel in the checkpoint: log.jsonl is rewritten from them, never behind)
            run.save_epoch(row, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                           scaler=scaler.state_dict())
            print0(epoch_line(row, cfg.epochs))  # once saved: a Ctrl-C after this line loses no epoch
    return raw_model


if __name__ == "__main__":
    cli(main, Config)
