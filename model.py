"""The one ViT every stage shares, plus the MAE decoder and the checkpoint hand-off.

Parameter names follow timm / MAE (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.i.attn.qkv`, ...),
so published ViT weights load and ours load elsewhere. Attention runs PyTorch's fused SDPA by default; with
`return_attn=True` it computes the scores explicitly and hands back every layer's pre-softmax scores
(B, H, N, N), with gradients: `.softmax(-1)` gives the attention maps. Pre-softmax, because that is what the
paper distils (§4: scaled q·kᵀ before the softmax) and what its analysis re-normalises over patches (§5.2).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from common import BadValue, load_ckpt  # plumbing: weights_only loads and one-line errors

# Width / depth / heads. Tiny and Small use 12 heads, as in MAE-Lite (PAPER §1.1: "changed to 12 from 3").
# "cpu" is sized for the embedded 32x32 data on a laptop CPU (0.68M parameters) and keeps MAE-Lite's head width of
# 16 (6 heads at width 96: more, narrower heads is MAE-Lite's point); "micro" is for tests.
# Head count changes no parameter shape: timm's 3-head vit_tiny loads into 12 heads silently and computes another
# function, so every stage has --num_heads and checkpoints of ours carry it in their config.
VIT_SIZES = {
    "micro": dict(embed_dim=32, depth=2, num_heads=2),  # tests
    "mini": dict(embed_dim=64, depth=4, num_heads=4),  # reproduce.py's study on 2 CPU cores
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
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    out = [f(pos.flatten()[:, None] * omega) for pos in (xs, ys) for f in (torch.sin, torch.cos)]
    emb = torch.cat(out, dim=1).float()  # (L, D)
    if cls_token:  # MAE gives the cls slot a zero vector
        emb = torch.cat([torch.zeros(1, dim), emb])
    return emb[None]


def resize_pos_embed(pos_embed, grid):
    """Bicubic-resize the patch part of a (1, 1+L, D) embedding to grid x grid (DeiT/MAE fine-tune at new sizes)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.isqrt(patches.shape[1]))
    if old == grid:
        return pos_embed
    patches = rearrange(patches, "1 (h w) D -> 1 D h w", h=old)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, rearrange(patches, "1 D h w -> 1 (h w) D").to(pos_embed.dtype)], dim=1)


def random_masking(batch, num_patches, mask_ratio, device, generator=None):
    """MAE §3 per-sample random masking by argsort of uniform noise; every sample keeps exactly the same count.

    Returns ids_keep (B, K) of the visible patches, mask (B, L) with 1 = removed, and ids_restore (B, L)
    that puts [visible, removed] tokens back in raster order.
    """
    num_keep = int(num_patches * (1 - mask_ratio))  # int(), as MAE: 58 of 196 at 0.7 (round() would keep 59)
    if not 0 < num_keep < num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} keeps {num_keep} of {num_patches} patches; it must keep some and drop some")
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the lowest-noise patches are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_keep] = 0
    return ids_shuffle[:, :num_keep], torch.gather(mask, 1, ids_restore), ids_restore


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples, rescale the rest."""
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
        if return_attn:  # explicit path: same result as SDPA, but the scores are kept (with grads)
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


class Block(nn.Module):
    """Pre-LN transformer block (eps 1e-6, as timm/MAE)."""

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
        # global_pool (MAE fine-tune): mean of patch tokens -> fc_norm -> head, and the final norm goes away
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
    def _init_weights(m):
        if isinstance(m, nn.Linear):  # MAE: xavier-uniform Linear, zero bias (timm's ViT would use trunc_normal)
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, imgs, ids_keep=None, return_attn=False, return_hidden=False):
        """Tokens after the final norm (B, 1+K, D), per-layer attention scores, per-layer hidden states.

        ids_keep (B, K) keeps only those patches (MAE). Hidden states are what each block's norm1 sees,
        plus the normalised output: depth+1 tensors, the representations compared by CKA (PAPER §5.1).
        """
        x = self.patch_embed(imgs)  # (B, L, D)
        pos = self.pos_embed if x.shape[1] + 1 == self.pos_embed.shape[1] else \
            resize_pos_embed(self.pos_embed, int(math.isqrt(x.shape[1])))  # DINO's small local crops
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


def vit_heads(size, num_heads=0):
    """The head count of a `size` ViT: num_heads, or the size's default when 0; it must divide the width."""
    if size not in VIT_SIZES:
        raise BadValue(f"unknown model size {size!r}; choose from {sorted(VIT_SIZES)}")
    heads, width = num_heads or VIT_SIZES[size]["num_heads"], VIT_SIZES[size]["embed_dim"]
    if heads < 0 or width % heads:
        raise BadValue(f"num_heads must be a positive divisor of {size}'s width {width}, got {num_heads}")
    return heads


def create_vit(size, num_heads=0, **kwargs):
    """A ViT of a named size; num_heads=0 keeps the size's default (timm's vit_tiny weights need num_heads=3)."""
    return ViT(**dict(VIT_SIZES[size], num_heads=vit_heads(size, num_heads)), **kwargs)


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
        self.apply(ViT._init_weights)
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


# --- checkpoint hand-off between stages ---
# Wrapper prefixes stripped from every key: DDP, torch.compile, and MAE-Lite's exp wrapper (`module.model.`).
PREFIXES = ("module.", "_orig_mod.", "model.")
# MAE-Lite's D-MAE checkpoints also hold the frozen teacher and the head mixer: never part of the student ViT.
SKIPPED = ("tch_model.", "attn_adapter.")
RPE_KEYS = ("relative_position", "q_bias", "v_bias", "gamma_1")  # MAE-Lite's RPE / layer-scale fine-tune variant
# Head counts of checkpoints of ours saved before num_heads was a flag (their config lacks it).
LEGACY_HEADS = {"cpu": 3}


def checkpoint_weights(ckpt, key="model", source="checkpoint"):
    """The weights dict inside a loaded checkpoint: ckpt[key] (ours, MAE, MAE-Lite), ckpt['state_dict'], or the
    checkpoint itself when it is a flat state dict (timm)."""
    if not isinstance(ckpt, dict):
        raise BadValue(f"{source} is not a state dict or a checkpoint dict")
    if isinstance(ckpt.get(key), dict):
        return ckpt[key]
    if isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"]
    if all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt
    raise BadValue(f"{source} has no {key!r} weights (it holds {sorted(ckpt)[:8]}); choose one with the key flag")


def backbone_state_dict(sd, verbose=False):
    """Normalise any known layout to our ViT's names: ours (ViT under `encoder.`), timm, facebookresearch/mae,
    MoCo-v3 (`base_encoder.`), MAE-Lite (`module.model.` / `model.` then `encoder.` or the ViT names). MAE decoder
    keys and D-MAE teacher / adapter keys are dropped; the RPE variant is refused."""
    out, skipped = {}, []
    for k, v in sd.items():
        while k.startswith(PREFIXES):
            k = k[k.index(".") + 1:]
        if k.startswith(SKIPPED):
            skipped.append(k)
        else:
            out[k] = v
    for wrapper in ("encoder.", "base_encoder."):  # our MAE / MoCo / DINO wrappers, MAE-Lite pre-training; MoCo-v3
        if any(k.startswith(wrapper) for k in out):
            out = {k[len(wrapper):]: v for k, v in out.items() if k.startswith(wrapper)}
            break
    rpe = [k for k in out if any(r in k for r in RPE_KEYS)]
    if rpe:
        raise BadValue(f"checkpoint is MAE-Lite's RPE / layer-scale variant ({rpe[0]}, ...): a different architecture "
                         "from the plain ViT, not supported here; use the plain (non-RPE) checkpoints")
    if verbose and skipped:
        print(f"load_backbone: skipped {len(skipped)} D-MAE keys that are not the student "
              f"(frozen teacher tch_model.*, head mixer attn_adapter.*)")
    return {k: v for k, v in out.items() if not k.startswith(("decoder", "mask_token"))}  # MAE's decoder


def read_state_dict(path_or_ckpt, key="model", verbose=False):
    """The backbone weights of a checkpoint file or an already loaded checkpoint / state dict, in our names."""
    ckpt = load_ckpt(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    source = path_or_ckpt if isinstance(path_or_ckpt, str) else "state dict"
    return backbone_state_dict(checkpoint_weights(ckpt, key, source), verbose)


def checkpoint_heads(ckpt, path, size, asked, flag="--num_heads", verbose=True):
    """Head count for loading a checkpoint into a `size` ViT. Ours carry it in their config; timm / MAE / MAE-Lite
    files carry none, so the flag or the size's default is assumed, and said. A contradiction is an error."""
    ccfg = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}
    saved = ccfg.get("num_heads") or (ccfg.get("model") in VIT_SIZES and
                                      LEGACY_HEADS.get(ccfg["model"], VIT_SIZES[ccfg["model"]]["num_heads"]))
    if saved:
        if asked and asked != saved:
            raise BadValue(f"{path} was trained with {saved} heads but {flag}={asked}; drop the flag or set it to {saved}")
        return saved
    heads = asked or VIT_SIZES[size]["num_heads"]
    if verbose:
        print(f"{path} carries no config: assuming {heads} heads" + ("" if asked else f" ({size}'s default)")
              + f"; pass {flag}=N if it was trained with another count (timm/DeiT vit_tiny: 3, vit_small: 6)")
    return heads


def load_backbone(model, path_or_sd, key="model", verbose=True):
    """Load ViT weights strictly, except that head/fc_norm may be new and a final norm may be left over.

    path_or_sd: a checkpoint path, a loaded checkpoint, or a state dict, in any layout backbone_state_dict knows.
    The pos_embed is resized when the image size differs; a head of another shape is dropped (new task).
    Any other missing, unexpected or mis-shaped key is an architecture mismatch and raises.
    """
    sd = read_state_dict(path_or_sd, key, verbose)
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.grid)
    for k in [k for k in sd if k.startswith("head.") and (k not in own or sd[k].shape != own[k].shape)]:
        del sd[k]
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = wrong + [f"missing {k}" for k in missing if not k.startswith(("head.", "fc_norm."))] \
        + [f"unexpected {k}" for k in unexpected if not k.startswith(("norm.", "fc_norm.", "head."))]
    if bad:
        raise BadValue("checkpoint does not fit this model (architecture mismatch?):\n  " + "\n  ".join(bad[:20]))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if verbose and (missing or unexpected):
        print(f"load_backbone: new (missing) keys {missing}; ignored (unexpected) keys {unexpected}")
    return missing, unexpected
