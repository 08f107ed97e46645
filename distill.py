r"""D-MAE: MAE pre-training of a small student plus attention distillation from a frozen, larger teacher (PAPER §4).

The teacher (MAE-Base in the paper; here any larger checkpoint of ours, or an MAE/timm ViT state dict) sees exactly
the student's visible patches. The student's last-layer pre-softmax attention scores (B, Hs, N, N) are mixed into
the teacher's heads by a learned 1x1 convolution and matched to the teacher's with MSE, weight 1.0:
    loss = MAE loss + alpha_attn * MSE(adapter(student scores), teacher scores) [+ alpha_hidden * feature MSE]
Everything else (data, schedule, checkpoints, reconstructions) is pretrain_mae.py's, reused as it is.

    python pretrain_mae.py --model=tiny --out_dir=out/mae_teacher      # CPU: a larger teacher first (slower)
    python distill.py --teacher_ckpt=out/mae_teacher/ckpt.pt           # then the cpu-sized student
    torchrun --nproc_per_node=8 distill.py --teacher_ckpt=mae_base_1600e.pth --teacher_model=base --model=tiny \
        --img_size=224 --patch_size=16 --data=imagefolder --data_root=/imagenet --epochs=400 --warmup_epochs=40 \
        --batch_size_per_gpu=512 --base_lr=1.5e-4 --crop_min_scale=0.08     # the paper's D-MAE-Tiny recipe
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_mae
from checkpoint import load_ckpt
from common import print0, seed_everything, setup_dist
from flags import check, check_config, cli, int_list, note
from model import VIT_SIZES
from weights import pretrained_vit, vit_spec


@dataclass
class Config(pretrain_mae.Config):
    teacher_ckpt: str = ""  # frozen teacher checkpoint (required): ours, or an MAE/timm ViT state dict
    teacher_model: str = ""  # teacher ViT size; empty = the teacher checkpoint's own (its config, or its weights)
    teacher_num_heads: int = 0  # teacher heads; 0 = from its checkpoint's config, else the size's default (MAE-Base 12)
    teacher_key: str = "model"  # which weights in the teacher checkpoint
    attn_layers: str = "-1"  # comma-separated block indices whose attention is distilled (-1 = last); "" = none
    hidden_layers: str = ""  # comma-separated hidden-state indices 0..depth for feature distillation; "" = none
    alpha_attn: float = 1.0  # weight of the attention loss (the paper: 1.0)
    alpha_hidden: float = 1.0  # weight of the feature loss
    out_dir: str = "out/distill"  # ckpt.pt, log.jsonl, config.json, recon_eNNN.png (epochs 1, 2, 4, ..., last)

    def __post_init__(self):
        super().__post_init__()
        check_config(self, teacher_num_heads=">=0", alpha_attn=">=0", alpha_hidden=">=0")
        check(self.teacher_ckpt, "distill.py needs --teacher_ckpt (e.g. from: python pretrain_mae.py --model=tiny "
                                 "--out_dir=out/mae_teacher)")
        check(not self.teacher_model or self.teacher_model in VIT_SIZES,
              f"teacher_model must be one of {sorted(VIT_SIZES)}, got {self.teacher_model!r}")
        attn, hidden = int_list(self.attn_layers, "--attn_layers"), int_list(self.hidden_layers, "--hidden_layers")
        check(attn or hidden, "nothing to distill: set attn_layers")


def load_teacher(cfg, device, verbose=True):
    """The frozen teacher: its size and heads from its checkpoint (or --teacher_model / --teacher_num_heads), on the
    student's patch grid, so both see the same visible patches (another patch size is one line)."""
    flags, ckpt = ("--teacher_model", "--teacher_num_heads", "--teacher_key"), load_ckpt(cfg.teacher_ckpt,
                                                                                         "teacher checkpoint")
    _, _, patch = vit_spec(ckpt, cfg.teacher_ckpt, cfg.teacher_key, cfg.teacher_model, cfg.teacher_num_heads, flags,
                           verbose=False)
    check(patch == cfg.patch_size, f"the teacher {cfg.teacher_ckpt} cuts {patch}-px patches and the student "
                                   f"{cfg.patch_size}-px ones: both must see the same patches; "
                                   f"pass --patch_size={patch}")
    teacher, _ = pretrained_vit(cfg.teacher_ckpt, cfg.teacher_key, cfg.teacher_model, cfg.teacher_num_heads, flags,
                                verbose, ckpt, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0)
    if verbose:
        print0(f"teacher {cfg.teacher_ckpt}: {teacher.embed_dim} wide, {teacher.depth} deep, {teacher.num_heads} heads")
        student, sizes = VIT_SIZES[cfg.model], list(VIT_SIZES)
        if teacher.embed_dim <= student["embed_dim"] and teacher.depth <= student["depth"]:
            larger = sizes[sizes.index(cfg.model) + 1:][:1]  # the next size up, if any
            note(f"the teacher ({teacher.embed_dim} wide, {teacher.depth} deep) is no larger than the student "
                 f"--model={cfg.model} ({student['embed_dim']} wide, {student['depth']} deep): D-MAE distils a larger "
                 "teacher (the paper: MAE-Base into ViT-Tiny). This run goes on"
                 + "".join(f"; a larger teacher: python pretrain_mae.py --model={m} --patch_size={cfg.patch_size} "
                           "--out_dir=out/mae_teacher" for m in larger))
    return teacher.to(device).eval().requires_grad_(False)


class DistilledMAE(pretrain_mae.MAE):
    def __init__(self, cfg, teacher):  # the teacher sizes the adapters; forward is given it at every step
        super().__init__(cfg)
        self.attn_ids = int_list(cfg.attn_layers, "--attn_layers")
        self.hidden_ids = int_list(cfg.hidden_layers, "--hidden_layers")
        depth = min(self.encoder.depth, teacher.depth)
        for i in self.attn_ids:
            check(-depth <= i < depth, f"attention layer {i} is outside the student ({self.encoder.depth}) or "
                                       f"teacher ({teacher.depth})")
        for i in self.hidden_ids:
            check(0 <= i <= depth, f"hidden layer {i} is outside 0..depth")
        # 1x1 conv over heads: learns which student heads mix into each teacher head (PAPER §4, no bias)
        self.attn_adapters = nn.ModuleList(nn.Conv2d(self.encoder.num_heads, teacher.num_heads, 1, bias=False)
                                           for _ in self.attn_ids)
        self.hidden_adapters = nn.ModuleList(nn.Linear(self.encoder.embed_dim, teacher.embed_dim, bias=False)
                                             for _ in self.hidden_ids)

    def forward(self, imgs, teacher):
        want_attn, want_hidden = bool(self.attn_ids), bool(self.hidden_ids)
        pred, mask, ids_keep, attns, hiddens = self.encode_decode(imgs, want_attn, want_hidden)
        loss_mae = pretrain_mae.mae_loss(imgs, pred, mask, self.cfg.patch_size, self.cfg.norm_pix_loss)
        with torch.no_grad():  # the student's ids_keep: the teacher sees exactly the same visible patches
            _, t_attns, t_hiddens = teacher.forward_features(imgs, ids_keep, want_attn, want_hidden)
        zero = loss_mae.new_zeros(())
        loss_attn = sum((F.mse_loss(ad(attns[i]).float(), t_attns[i].float())  # (B, Ht, N, N), cls row/col included
                         for ad, i in zip(self.attn_adapters, self.attn_ids)), zero)
        loss_hidden = sum((F.mse_loss(ad(hiddens[i]).float(), t_hiddens[i].float())
                           for ad, i in zip(self.hidden_adapters, self.hidden_ids)), zero)
        loss = loss_mae + self.cfg.alpha_attn * loss_attn + self.cfg.alpha_hidden * loss_hidden
        return loss, dict(mae=loss_mae.detach(), attn=loss_attn.detach(), hidden=loss_hidden.detach())


def main(cfg):
    # seeded here so the teacher, then the student, draw their initial weights as every D-MAE run has (the student's
    # init follows the teacher's); pretrain_mae.main seeds again for the data and the masks
    rank, _, device = setup_dist()
    seed_everything(cfg.seed + rank)
    teacher = load_teacher(cfg, device, verbose=rank == 0)
    return pretrain_mae.main(cfg, DistilledMAE(cfg, teacher), teacher)  # its run folder never takes the teacher's


if __name__ == "__main__":
    cli(main, Config)
