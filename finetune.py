r"""Fine-tune, linear-probe or train from scratch: any checkpoint of ours (MAE, MoCo-v3, DINO, D-MAE) or none.

The paper's "improved" ViT-Tiny recipe (PAPER §3.1): AdamW, lr = 1e-3 x batch/256, layer-wise lr decay 0.85
(0.75 for MoCo-v3), weight decay 0.05, warm-up + cosine to 1e-6, mixup 0.2, no cutmix, RandAugment m10, crops of
8-100% of the area, no label smoothing, no drop path, mean-pooled patch tokens -> LayerNorm -> linear head.
The defaults are that recipe for the main job's 6,000 small images, with four changes (each flag's help names the
paper's value): 20 epochs, base lr 4e-3, no mixup or RandAugment, crops of 80-100% (at 32 px the paper's
regularisation and 8% crops keep a short run below what a logistic regression on the pixels gets; pixels.py).
The GPU command below passes the paper's values.
Transfer to small datasets (PAPER §3.3) uses --optimizer=sgd --weight_decay=0 --clip_grad=1 --layer_decay=0.75
--mixup=0 --randaug_magnitude=0.

    python finetune.py                                   # CPU: fine-tune out/mae/ckpt.pt on the embedded data
    python finetune.py --mode=scratch --out_dir=out/scratch     # the supervised baseline
    torchrun --nproc_per_node=8 finetune.py --init_ckpt=out/mae_tiny/ckpt.pt --model=tiny --img_size=224 \
        --patch_size=16 --data=imagefolder --data_root=/imagenet --epochs=300 --warmup_epochs=5 \
        --batch_size_per_gpu=128 --num_workers=10 --base_lr=1e-3 --mixup=0.2 --randaug_magnitude=10 \
        --crop_min_scale=0.08    # the paper's 300-epoch recipe, global batch 1024
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
from checkpoint import RunFolder, load_ckpt
from common import (EpochSteps, all_reduce_sum, autocast_ctx, check_finite, cosine_schedule, make_scaler,
                    optimizer_step, param_groups, print0, seed_everything, set_lr, setup_dist, steps_in_epoch, wrap)
from data import Loader, build_dataset
from flags import TrainFlags, check, check_config, cli
from model import create_vit, vit_heads
from weights import pretrained_vit, vit_spec


@dataclass
class Config(TrainFlags):  # + the data and run flags every training stage shares
    mode: str = "finetune"  # finetune (all weights) | linear (frozen backbone, train the head) | scratch (no init)
    init_ckpt: str = "out/mae/ckpt.pt"  # checkpoint to start from (ours or a timm ViT state dict); unused for scratch
    init_key: str = "model"  # which weights in the checkpoint: model, or teacher (DINO's EMA teacher)
    reinit_from_block: int = -1  # re-initialise blocks >= this index after loading (layer-importance study); -1 = off
    eval_only: bool = False  # only evaluate init_ckpt (a fine-tuned checkpoint) and exit
    # data
    img_size: int = 32  # input side in pixels; the paper: 224 (small transfer images are upsampled to it)
    # model
    model: str = ""  # ViT size: micro | mini | cpu | tiny | small | base; "" = init_ckpt's own (scratch: cpu)
    num_heads: int = 0  # attention heads; 0 = init_ckpt's (ours), else the size's default (timm vit_tiny needs 3)
    drop_path: float = 0.0  # stochastic depth at the last block; impr. recipe 0.0, MAE-default 0.1
    # optimisation
    epochs: int = 20  # the paper: 300 on ImageNet
    warmup_epochs: int = 1  # the paper: 5
    batch_size_per_gpu: int = 128  # global batch = this x world size x accum_steps; the paper: 1024
    optimizer: str = "adamw"  # adamw | sgd (Nesterov, momentum 0.9: the transfer recipe)
    base_lr: float = 4e-3  # lr = base_lr x global batch / 256; the paper: 1e-3
    min_lr: float = 1e-6  # cosine floor
    weight_decay: float = 0.05  # not on biases/norms/tokens
    layer_decay: float = 0.85  # lr x decay^(depth+1-layer_id) per block; 0.75 for MoCo-v3; 1 = off; none from scratch
    clip_grad: float = 0.0  # max grad norm; 0 = off (transfer recipe: 1.0)
    # regularisation
    mixup: float = 0.0  # mixup alpha; 0 = off (the paper's impr. recipe: 0.2)
    cutmix: float = 0.0  # cutmix alpha; 0 = off (MAE-default 1.0); with mixup, one of the two per batch
    label_smoothing: float = 0.0  # impr. recipe 0.0, MAE-default 0.1
    randaug_magnitude: int = 0  # RandAugment magnitude, timm's semantics (2 ops, p 0.5 each); 0 = off; the paper: 10
    randaug_std: float = 0.5  # per-op normal jitter of the magnitude (timm's mstd; the paper: 0.5)
    crop_min_scale: float = 0.8  # RandomResizedCrop lower area bound; the paper: 0.08 (at 32 px it cuts items apart)
    hflip: bool = True  # random horizontal flips; false for digits and text, whose meaning a mirror changes
    # run
    out_dir: str = "out/finetune"  # ckpt.pt (latest), best.pt, log.jsonl, config.json

    def __post_init__(self):
        check_config(self, reinit_from_block=">=-1", drop_path="[0,1)", min_lr=">=0", layer_decay="(0,1]",
                     clip_grad=">=0", mixup=">=0", cutmix=">=0", label_smoothing="[0,1)", randaug_magnitude="[0,10]",
                     randaug_std=">=0", crop_min_scale="(0,1]")
        check(self.mode in ("finetune", "linear", "scratch"), f"mode must be finetune|linear|scratch, got {self.mode}")
        check(self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, got {self.optimizer!r}")


def layer_id(name, depth):
    """MAE-Lite's layer ids for lr decay (PAPER §3.1): embeddings 0, blocks.k -> k+1, everything after -> depth+1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def timm_init(vit):
    """DeiT / timm 0.4.12 initialisation, for the from-scratch baseline (the paper's 75.8 is DeiT-Tiny trained with
    that code): trunc_normal(0.02) Linear weights (the head too), zero biases, trunc_normal(0.02) cls token and a
    learned position embedding drawn the same way, PyTorch's default for the patch conv."""
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    vit.patch_embed.proj.reset_parameters()
    with torch.no_grad():
        nn.init.trunc_normal_(vit.cls_token, std=0.02)
        nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    return vit


def views(cfg):  # the one view the loader cuts: RandomResizedCrop, scale crop_min_scale..1, bicubic
    return [(cfg.img_size, (cfg.crop_min_scale, 1.0))]


def train_transform(cfg):
    """timm's fine-tuning train transform after the crop, on the device: flip (unless --hflip=false), RandAugment
    with timm's semantics (the paper's rand-m10-mstd0.5-inc1), ImageNet normalisation. No colour jitter (timm ignores
    it when RandAugment is on), no random erasing (the impr. recipe)."""
    def transform(crops):
        x = augment.random_flip(crops[0]) if cfg.hflip else crops[0]
        if cfg.randaug_magnitude > 0:
            x = augment.rand_augment(x, cfg.randaug_magnitude, cfg.randaug_std)
        return augment.normalize(x)
    return transform


def make_mixer(cfg, num_classes):
    """Mixup and / or CutMix on the batch, one of them per batch when both are on (timm's switch prob 0.5); None
    when both are off. mix(images, labels) -> (mixed images, soft targets (B, classes))."""
    import torchvision.transforms.v2 as v2  # only here: torchvision's import costs every command seconds
    mixers = [v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup > 0 else []
    mixers += [v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix > 0 else []
    return v2.RandomChoice(mixers) if mixers else None


@torch.no_grad()
def evaluate(model, loader, device):
    """Top-1 / top-5 accuracy in %, summed over ranks (DistributedSampler pads a few repeats onto the last ranks),
    on the loader's eval view (timm's: shorter side to img_size / 0.875, centre crop)."""
    model.eval()
    counts = torch.zeros(3, device=device)  # correct@1, correct@5 (top-5 of more than 5 classes only), seen
    for crops, labels in loader:
        with autocast_ctx(device):
            logits = model(augment.normalize(crops[0]))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    c1, c5, n = all_reduce_sum(counts).tolist()
    return 100 * c1 / n, 100 * c5 / n


def main(cfg):
    # --- setup ---
    rank, world, device = setup_dist()
    master = rank == 0
    seed_everything(cfg.seed + rank)
    init = load_ckpt(cfg.init_ckpt, "init_ckpt") if cfg.mode != "scratch" or cfg.eval_only else None
    if init is not None:  # the size and heads the checkpoint records (ours), or what its weights say (others)
        size, heads, _ = vit_spec(init, cfg.init_ckpt, cfg.init_key, cfg.model, cfg.num_heads,
                                  ("--model", "--num_heads", "--init_key"), verbose=master)
        if master and size != cfg.model:
            print(f"init_ckpt {cfg.init_ckpt} holds a {size} ViT: --model={size}")
        cfg = replace(cfg, model=size, num_heads=heads)
    cfg = replace(cfg, model=cfg.model or "cpu", num_heads=vit_heads(cfg.model or "cpu", cfg.num_heads))
    # --eval_only writes nothing, anywhere; a run never writes over the checkpoint it starts from
    with RunFolder(cfg, rank, inputs=[cfg.init_ckpt if init is not None else ""], active=not cfg.eval_only) as run:

        # --- data --- (validation first: a bad val file stops the run before any training)
        val_set, num_classes = build_dataset(cfg.data, cfg.data_root, False, classes=cfg.classes)
        val_loader = Loader(val_set, cfg.batch_size_per_gpu, False, cfg.num_workers, device,
                            [(cfg.img_size, "center")])
        if not cfg.eval_only:  # batches cut to the view; the augmentation runs on the device, batched
            train_set, _ = build_dataset(cfg.data, cfg.data_root, True, cfg.subset, cfg.classes)
            loader = Loader(train_set, cfg.batch_size_per_gpu, True, cfg.num_workers, device, views(cfg))
            transform = train_transform(cfg)
            mix = make_mixer(cfg, num_classes)

        # --- model ---
        shape = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=num_classes,
                     drop_path=cfg.drop_path, global_pool=True, learn_pos_embed=True)
        if init is not None:
            raw_model, _ = pretrained_vit(cfg.init_ckpt, cfg.init_key, cfg.model, cfg.num_heads, verbose=master,
                                          ckpt=init, **shape)
        else:  # the from-scratch baseline is DeiT-Tiny trained with timm's code: timm's init, learned pos_embed
            raw_model = timm_init(create_vit(cfg.model, cfg.num_heads, **shape))
        if cfg.reinit_from_block >= 0:  # keep only the lower layers' pre-training ("lower layers matter more")
            for blk in raw_model.blocks[cfg.reinit_from_block:]:
                blk.apply(raw_model._init_weights)
        if cfg.mode == "linear":  # only the head learns; fc_norm stays at (1, 0): a parameter-free normalisation
            for name, p in raw_model.named_parameters():
                p.requires_grad = name.startswith("head.")
        raw_model.to(device)

        if cfg.eval_only:
            top1, top5 = evaluate(raw_model, val_loader, device)
            print0(f"eval {cfg.init_ckpt}: top-1 {top1:.2f}" + (f" top-5 {top5:.2f}" if num_classes > 5 else ""))
            return top1, top5

        # --- optimizer & schedule ---
        global_batch = cfg.batch_size_per_gpu * world * cfg.accum_steps
        lr = cfg.base_lr * global_batch / 256
        depth = raw_model.depth
        decay = 1.0 if cfg.mode == "scratch" else cfg.layer_decay  # DeiT's from-scratch recipe has no layer decay
        groups = param_groups(raw_model, cfg.weight_decay,
                              lambda name: decay ** (depth + 1 - layer_id(name, depth)))
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        scaler = make_scaler(device)
        steps_per_epoch = steps_in_epoch(loader, cfg.accum_steps)
        lr_schedule = cosine_schedule(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, lr,
                                      cfg.min_lr)
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        print0(f"{cfg.mode}: {trainable / 1e6:.2f}M trainable, global batch {global_batch}, lr {lr:.2e}, "
               f"{num_classes} classes, {len(train_set)} train images")

        # --- resume ---
        ckpt = run.start(rank, lr_schedule, model=raw_model, optimizer=optimizer, scaler=scaler)
        best, best_top1 = (ckpt.get("best"), ckpt["best_top1"]) if ckpt else (None, 0.0)
        model = wrap(raw_model, world, cfg.compile)

        # --- train loop ---
        for epoch in range(run.start_epoch, cfg.epochs):
            model.train()
            steps = EpochSteps(loader, epoch, steps_per_epoch, cfg, model)
            for step, sync, (crops, labels) in steps:
                set_lr(optimizer, lr_schedule[step])
                imgs = transform(crops)
                if mix is not None:
                    imgs, targets = mix(imgs, labels)  # soft targets (B, classes)
                else:
                    targets = F.one_hot(labels, num_classes).float()
                with autocast_ctx(device):
                    logits = model(imgs)
                # cross_entropy takes soft targets; smoothing mixes them with the uniform distribution
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
                steps.add(loss=check_finite(loss, epoch, step))
                scaler.scale(loss / cfg.accum_steps).backward()
                if sync:
                    optimizer_step(optimizer, scaler, raw_model, cfg.clip_grad)
            row = steps.row(global_batch, lr=lr_schedule)

            # --- eval ---
            top1, top5 = evaluate(model, val_loader, device)
            is_best = top1 > best_top1 or not run.history  # the first epoch of a run is its best so far
            best_top1 = top1 if is_best else best_top1
            top5_part = {"top5": top5} if num_classes > 5 else {}  # top-5 of 5 classes or fewer says nothing
            row.update(top1=top1, **top5_part, best_top1=best_top1)

            # --- save --- best.pt, then ckpt.pt (with the best weights and every log row), then log.jsonl: after a
            # kill at any point the checkpoint and log never claim a best that best.pt lacks; resume re-derives both
            if is_best:
                best = dict(model={k: v.detach().clone() for k, v in raw_model.state_dict().items()},
                            epoch=epoch + 1, top1=top1, top5=top5, config=asdict(cfg))
            run.save_epoch(row, best=best, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                           scaler=scaler.state_dict(), best_top1=best_top1)
            print0(f"ep {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} top-1 {top1:.2f} " + (f"top-5 {top5:.2f} "
                   if top5_part else "") + f"(best {best_top1:.2f}) {row['imgs_per_s']:.0f} img/s")  # once saved
        if best is not None and run.start_epoch < cfg.epochs:
            print0(f"best top-1 {best_top1:.2f} at epoch {best['epoch']} (chosen on the test images: the last epoch "
                   f"is the unbiased number) -> {cfg.out_dir}/best.pt")
    return best_top1


if __name__ == "__main__":
    cli(main, Config)
