"""The one way to build a ViT from a weights file (ours, timm, MAE, MAE-Lite): find the backbone, read its shape,
load it strictly; a misfit is one line naming the flags to pass."""
import difflib

import torch

from checkpoint import config_of, load_ckpt
from common import BadValue
from model import VIT_SIZES, create_vit, resize_pos_embed

PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, MAE-Lite's exp wrapper (`module.model.`)
SKIPPED, RPE_KEYS = ("tch_model.", "attn_adapter."), ("relative_position", "q_bias", "v_bias", "gamma_1")


def read_state_dict(ckpt, key="model", source="checkpoint", verbose=False, key_flag="--key"):  # ckpt: loaded or a path
    """The backbone weights, in our names: ckpt[key] (ours, MAE, MAE-Lite), ckpt['state_dict'] or a flat dict (timm);
    under `encoder.` (ours), `base_encoder.` (MoCo-v3) or not. D-MAE's teacher / adapter keys are dropped; MAE-Lite's
    RPE variant is refused."""
    ckpt, source = (load_ckpt(ckpt), ckpt) if isinstance(ckpt, str) else (ckpt, source)
    sd = next((ckpt[k] for k in (key, "state_dict") if isinstance(ckpt.get(k), dict)), ckpt) if isinstance(ckpt, dict) \
        else {"": ckpt}
    if not all(torch.is_tensor(v) for v in sd.values()):
        keys = [k for k, v in sd.items() if isinstance(v, dict) and v and all(map(torch.is_tensor, v.values()))]
        close = difflib.get_close_matches(key, keys, 1, 0.5) or keys
        raise BadValue(f"{source} has no {key!r} weights (its weights: {', '.join(keys) or 'none'})"
                       + (f": did you mean {key_flag}={close[0]}?" if keys else ""))
    out = {}
    for k, v in sd.items():
        while k.startswith(PREFIXES):
            k = k[k.index(".") + 1:]
        out[k] = v
    skipped = [k for k in out if k.startswith(SKIPPED)]
    out = {k: v for k, v in out.items() if k not in skipped}
    for wrapper in ("encoder.", "base_encoder."):
        if any(k.startswith(wrapper) for k in out):
            out = {k[len(wrapper):]: v for k, v in out.items() if k.startswith(wrapper)}
            break
    for k in (k for k in out if any(r in k for r in RPE_KEYS)):
        raise BadValue(f"{source} is MAE-Lite's RPE / layer-scale variant ({k}, ...): not the plain ViT, not "
                       "supported here; use the plain (non-RPE) checkpoints")
    if verbose and skipped:
        print(f"load_backbone: skipped {len(skipped)} D-MAE keys, not the student (tch_model.*, attn_adapter.*)")
    return {k: v for k, v in out.items() if not k.startswith(("decoder", "mask_token"))}  # MAE's decoder


def describe_weights(sd):
    """(size name or None, patch size, 'tiny ViT (width 192, depth 12, 16-px patches)') of a state dict."""
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else 0
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    patch = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in sd else 0
    size = next((n for n, s in VIT_SIZES.items() if (s["embed_dim"], s["depth"]) == (width, depth)), None)
    return size, patch, f"{size or 'a'} ViT (width {width}, depth {depth}, {patch}-px patches)"


def vit_spec(ckpt, path, key="model", model="", num_heads=0, flags=("--model", "--num_heads", "--key"), verbose=True):
    """(size, heads, patch size) of a checkpoint's ViT: our config, else the weights' shapes, and the heads from the
    flag or the size's default (printed)."""
    ccfg = config_of(ckpt)
    found, patch, what = describe_weights(read_state_dict(ckpt, key, path, key_flag=flags[2]))
    size, heads = ccfg.get("model") or found, ccfg.get("num_heads")
    if model and size and model != size:
        raise BadValue(f"{path} holds a {what}, not {model}: drop {flags[0]} or pass {flags[0]}={size}")
    size = model or size
    if size not in VIT_SIZES:
        raise BadValue(f"{path} holds {what}, none of the sizes {sorted(VIT_SIZES)}: pass {flags[0]}")
    if heads and num_heads and num_heads != heads:
        raise BadValue(f"{path} was trained with {heads} heads but {flags[1]}={num_heads}; drop the flag or set it")
    if not heads:
        heads = num_heads or VIT_SIZES[size]["num_heads"]
        if verbose:
            print(f"{path} carries no config: a {size} ViT (read off its weights) with {heads} heads"
                  + ("" if num_heads else f" ({size}'s default)") + f"; pass {flags[1]}=N if it was trained with "
                  "another count (timm/DeiT vit_tiny: 3, vit_small: 6)")
    return size, heads, ccfg.get("patch_size") or patch


def load_backbone(model, ckpt, key="model", verbose=True):
    """Strict, except: head / fc_norm may be new and a final norm left over; pos_embed is resized to the model's
    grid; a head of another shape is dropped (a new task)."""
    own, sd = model.state_dict(), read_state_dict(ckpt, key, verbose=verbose)
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.grid)
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and (k not in own or v.shape != own[k].shape))}
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own.get(k, v).shape]
    bad += [f"missing {k}" for k in missing if not k.startswith(("head.", "fc_norm."))] \
        + [f"unexpected {k}" for k in unexpected if not k.startswith(("norm.", "fc_norm.", "head."))]
    if bad:
        (size, patch, theirs), (_, _, ours) = describe_weights(sd), describe_weights(own)
        hint = f"pass --model={size} --patch_size={patch}" if size else "build a ViT of its width and depth"
        raise BadValue(f"checkpoint does not fit this model (architecture mismatch): it holds a {theirs}, this model "
                       f"is a {ours} ({len(bad)} keys differ, first: {bad[0]}); {hint}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if verbose and (missing or unexpected):  # in words: a new head is what fine-tuning on a new task means
        new = [f"a {own['head.weight'].shape[0]}-class head" if "head.weight" in missing else "",
               "fc_norm (the pooled tokens' LayerNorm)" if "fc_norm.weight" in missing else ""]
        print("; ".join(["backbone weights loaded"] + [f"new: {', '.join(n for n in new if n)}"] * any(new)
                        + [f"not used: {', '.join(unexpected)}"] * bool(unexpected)))
    return missing, unexpected


def pretrained_vit(path, key="model", model="", num_heads=0, flags=("--model", "--num_heads", "--key"), verbose=True,
                   ckpt=None, **vit_kwargs):
    """(ViT built to fit `path`'s weights, with them loaded; the checkpoint). vit_kwargs go to create_vit."""
    ckpt = load_ckpt(path) if ckpt is None else ckpt
    size, heads, patch = vit_spec(ckpt, path, key, model, num_heads, flags, verbose)
    vit = create_vit(size, heads, **{"patch_size": patch, **vit_kwargs})
    load_backbone(vit, ckpt, key, verbose)
    return vit, ckpt
