"""The one ViT every stage shares (weight files are read by weights.py).

Parameter names follow timm / MAE, so published ViT weights load and ours load elsewhere. With `return_attn=True`
attention hands back every layer's pre-softmax scores (B, H, N, N), with gradients: what the paper distils (§4,
scaled q·kᵀ) and what its analysis re-normalises over patches (§5.2).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# Tiny and Small use 12 heads, as MAE-Lite (PAPER §1.1: "changed to 12 from 3"); "cpu" (0.68M parameters, for the
# embedded 32-px data) keeps MAE-Lite's head width of 16. Heads change no parameter shape (timm's 3-head vit_tiny
# loads silently into 12 heads and computes another function), so our checkpoints carry the count in their config.
VIT_SIZES = {
    "micro": dict(embed_dim=32, depth=2, num_heads=2),  # tests
    "mini": dict(embed_dim=64, depth=4, num_heads=4),  # the study on 2 CPU cores
    "cpu": dict(embed_dim=96, depth=6, num_heads=6),
    "tiny": dict(embed_dim=192, depth=12, num_heads=12),
    "small": dict(embed_dim=384, depth=12, num_heads=12),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def patchify(imgs, p):
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, pixels (row, col, channel) inside."""
    return rearrange(imgs, "B C (h p1) (w p2) -> B (h w) (p1 p2 C)", p1=p, p2=p)


def unpatchify(x, p, h):
    """Inverse of patchify for an h x w grid with h == w."""
    return rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, p1=p, p2=p)


def sincos_pos_embed(dim, grid, cls_token=True):
    """Fixed 2-D sin-cos position embedding (MAE): half the channels encode the row, half the column."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")
    out = [f(pos.flatten()[:, None] * omega) for pos in (xs, ys) for f in (torch.sin, torch.cos)]
    emb = torch.cat(out, dim=1).float()  # (L, D)
    if cls_token:  # MAE gives the cls slot a zero vector
        emb = torch.cat([torch.zeros(1, dim), emb])
    return emb[None]


def resize_pos_embed(pos_embed, grid):
    """Bicubic-resize the patch part of a (1, 1+L, D) embedding to grid x grid (DeiT/MAE fine-tune at new sizes)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    if patches.shape[1] == grid * grid:
        return pos_embed
    patches = rearrange(patches, "1 (h w) D -> 1 D h w", h=math.isqrt(patches.shape[1]))
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, rearrange(patches, "1 D h w -> 1 (h w) D").to(pos_embed.dtype)], dim=1)


def drop_path(x, p, training):
    """Stochastic depth: drop the residual branch for random samples, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= p
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attn=False):
        q, k, v = rearrange(self.qkv(x), "B N (three H Dh) -> three B H N Dh", three=3, H=self.num_heads)
        scores = None
        if return_attn:  # same result as SDPA, but keeps the scores (with grads)
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N), pre-softmax
            x = scores.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "B H N Dh -> B N (H Dh)")), scores


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):  # pre-LN, eps 1e-6 (timm / MAE)
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, return_attn=False):
        y, scores = self.attn(self.norm1(x), return_attn)
        x = x + drop_path(y, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x, scores


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by patch size {self.patch_size}")
        return rearrange(self.proj(x), "B D h w -> B (h w) D")


class ViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, global_pool=False, learn_pos_embed=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # MAE keeps the sin-cos embedding fixed in pre-training; MAE-Lite fine-tuning learns it from there (PAPER §1.3)
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid), requires_grad=learn_pos_embed)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rises linearly
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        # global_pool (MAE fine-tune): mean of patch tokens -> fc_norm -> head; no final norm
        self.global_pool = global_pool
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.embed_dim, self.num_heads, self.depth = embed_dim, num_heads, depth
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)  # MAE: normal(0.02); timm uses trunc_normal(0.02)
        w = self.patch_embed.proj.weight  # MAE: xavier on the flattened conv, as for a Linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if num_classes > 0:  # MAE-Lite fine-tunes with timm 0.4.12's head init (MAE's own would be std 2e-5)
            nn.init.trunc_normal_(self.head.weight, std=0.02)

    @staticmethod
    def _init_weights(m):  # MAE: xavier-uniform Linear, zero bias (timm's ViT would use trunc_normal); unit norms
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
        if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)

    def forward_features(self, imgs, ids_keep=None, return_attn=False, return_hidden=False):
        """Tokens after the final norm (B, 1+K, D), per-layer attention scores, per-layer hidden states. ids_keep
        (B, K): the patches kept (MAE). Hidden states are what each block's norm1 sees, plus the normalised output:
        depth+1 tensors, the representations CKA compares (PAPER §5.1)."""
        x = self.patch_embed(imgs)  # (B, L, D)
        pos = resize_pos_embed(self.pos_embed, math.isqrt(x.shape[1]))  # a no-op but for DINO's small local crops
        x = x + pos[:, 1:]  # index 0 of pos is the cls slot
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # the cls token sits at index 0 from here on
        attns, hiddens = [], []
        for blk in self.blocks:
            if return_hidden:
                hiddens.append(blk.norm1(x))
            x, scores = blk(x, return_attn)
            if return_attn:
                attns.append(scores)
        x = self.norm(x)
        if return_hidden:
            hiddens.append(self.fc_norm(x) if self.global_pool else x)
        return x, attns, hiddens

    def forward(self, imgs, return_attn=False, return_hidden=False):
        """Class logits (or features when num_classes=0); with a flag, (logits, attns, hiddens)."""
        x, attns, hiddens = self.forward_features(imgs, None, return_attn, return_hidden)
        feats = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0]  # [:, 1:] skips cls
        logits = self.head(feats)
        return (logits, attns, hiddens) if (return_attn or return_hidden) else logits


def vit_heads(size, num_heads=0):  # num_heads=0: the size's default
    if size not in VIT_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(VIT_SIZES)}")
    heads, width = num_heads or VIT_SIZES[size]["num_heads"], VIT_SIZES[size]["embed_dim"]
    if heads < 0 or width % heads:
        raise ValueError(f"num_heads must be a positive divisor of {size}'s width {width}, got {num_heads}")
    return heads


def create_vit(size, num_heads=0, **kwargs):
    return ViT(**dict(VIT_SIZES[size], num_heads=vit_heads(size, num_heads)), **kwargs)
