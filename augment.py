"""Batched augmentation on the training device: one code path for CPU and GPU, per-sample randomness.

data.Loader cuts the crops first (rrc_box in file workers, random_resized_crop on the device); the rest works on float
(B, 3, S, S) batches in [0, 1], `normalize` last. Every draw comes from torch's RNG on the images' device, which
checkpoints save, so a resumed run draws the same augmentations. Samples are grouped by the op they drew, so each op
runs once per batch.
"""
import math
import random

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILL = tuple(round(255 * m) / 255 for m in IMAGENET_MEAN)  # timm's img_mean, (124, 116, 104) / 255
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision (PIL rounds 0.2989 to 0.299)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range


def _rand(n, device, lo=0.0, hi=1.0, generator=None):
    return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo


def _bshape(v):
    return v.view(-1, 1, 1, 1)


# --- crops: torchvision's RandomResizedCrop rule ---
def rrc_box(rng, height, width, scale, ratio=RATIO):
    """rrc_params for one sample, from a random.Random: file workers use it, 40x cheaper per box than rrc_params'
    tensor ops (which slow a worker by a third for DINO's ten crops)."""
    for _ in range(10):
        target = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return centre_box(height, width, ratio)


def centre_box(height, width, ratio=RATIO):
    """No try fits: the whole image, trimmed to the nearest allowed ratio, centred."""
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def rrc_params(n, height, width, scale, ratio=RATIO, device="cpu", generator=None):
    """(top, left, h, w) long tensors of n samples: 10 tries of area ~ U(scale) x image area and log-uniform aspect
    ratio; the first that fits, else centre_box."""
    tries = 10
    target = (height * width) * _rand(n * tries, device, *scale, generator).view(n, tries)
    aspect = torch.exp(_rand(n * tries, device, math.log(ratio[0]), math.log(ratio[1]), generator)).view(n, tries)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.long().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = (_rand(n, device, generator=generator) * (height - h + 1)).long().clamp(min=0)
    left = (_rand(n, device, generator=generator) * (width - w + 1)).long().clamp(min=0)
    none = ~ok.any(1)
    box = zip((top, left, h, w), centre_box(height, width, ratio))
    return tuple(torch.where(none, fallback, drawn) for drawn, fallback in box)


def crop_resize(x, top, left, h, w, size):
    """Per-sample boxes resized to size x size by one bicubic grid_sample, at the points
    interpolate(align_corners=False) samples on the crop."""
    B, _, H, W = x.shape
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0] = w.float() / W
    theta[:, 0, 2] = (2 * left.float() + w.float()) / W - 1
    theta[:, 1, 1] = h.float() / H
    theta[:, 1, 2] = (2 * top.float() + h.float()) / H - 1
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


def random_resized_crop(images, size, scale):
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1], a random box per sample."""
    B, _, H, W = images.shape
    top, left, h, w = rrc_params(B, H, W, scale, device=images.device)
    return (crop_resize(images, top, left, h, w, size) / 255).clamp_(0, 1)


def eval_resize(height, width, size, crop_pct=0.875):
    """Resized (height, width) of timm's eval view (PAPER §3.1): shorter side to int(size / crop_pct), then the centre
    size x size. crop_box maps it onto an image's own pixels."""
    short = int(size / crop_pct)
    return (short, int(short * width / height)) if height <= width else (int(short * height / width), short)


def crop_box(seed, k, height, width, view):
    """(top, left, h, w) of a sample's view k in its own pixels: rrc_box from its seed, or the centre box."""
    size, scale = view
    if scale != "center":
        return rrc_box(random.Random(seed * 16 + k), height, width, scale)
    nh, nw = eval_resize(height, width, size)  # the resized centre, in the original's pixels
    sy, sx = height / nh, width / nw
    return round((nh - size) / 2) * sy, round((nw - size) / 2) * sx, size * sy, size * sx


def center_crop(images, size):
    """The eval view, bicubic antialiased: uint8 (B, 3, H, W) -> float [0, 1]."""
    nh, nw = eval_resize(*images.shape[-2:], size)
    x = F.interpolate(images.float(), (nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return (x[..., top:top + size, left:left + size] / 255).clamp_(0, 1)


def random_flip(x):
    """Mirror each sample with p 0.5."""
    flip = _rand(len(x), x.device) < 0.5
    if x.device.type == "cpu":  # the same values with one batch-sized tensor fewer (each new one costs a CPU its
        out = x.flip(-1)  # page faults: 15 ms at 64 x 224 px); on a GPU this indexing would wait for the mask
        out[~flip] = x[~flip]
        return out
    return torch.where(_bshape(flip), x.flip(-1), x)


def normalize(x):
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean).div_(std)


# --- colour ops, one factor per sample ---
def grayscale(x):
    g = torch.tensor(GRAY, device=x.device).view(1, 3, 1, 1)
    return (x * g).sum(1, keepdim=True).expand_as(x)


def blend(x, other, factor):
    return (other + _bshape(factor) * (x - other)).clamp(0, 1)


def adjust_brightness(x, f):
    return blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), f)


def adjust_saturation(x, f):
    return blend(x, grayscale(x), f)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` (fraction of a turn, per sample) through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    v, delta = maxc, maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1
    i = torch.floor(h * 6)
    f, i = h * 6 - i, i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return torch.stack([c.gather(1, i[:, None])[:, 0] for c in rgb], 1)


def gaussian_blur(x, sigma, kernel):
    """Per-sample sigma, separable, reflect padding (torchvision's GaussianBlur)."""
    B, C, H, W = x.shape
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, kernel)
    y = F.pad(x.reshape(1, B * C, H, W), [kernel // 2] * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, threshold):
    return torch.where(x >= _bshape(threshold), 1 - x, x)


def _apply(x, mask, fn, *args):
    """fn, in place, on the samples where mask is set (args indexed alike); callers copy x once, not per op."""
    idx = mask.nonzero()[:, 0]
    if len(idx):
        x[idx] = fn(x[idx], *(a[idx] for a in args))


def byol_view(x, blur_p, solarize_p, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2):
    """BYOL's asymmetric view (MoCo-v3, DINO), after crop and flip: colour jitter in random order per sample,
    grayscale, Gaussian blur, solarize."""
    B, dev, x = len(x), x.device, x.clone()  # the ops below write into this copy
    b, c, s, h = jitter
    jitter_on = _rand(B, dev) < jitter_p
    factors = [_rand(B, dev, 1 - b, 1 + b), _rand(B, dev, 1 - c, 1 + c), _rand(B, dev, 1 - s, 1 + s),
               _rand(B, dev, -h, h)]
    order = torch.rand(B, 4, device=dev).argsort(1)  # per-sample jitter order
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for step in range(4):
        for k, op in enumerate(ops):
            _apply(x, jitter_on & (order[:, step] == k), op, factors[k])
    x = torch.where(_bshape(_rand(B, dev) < gray_p), grayscale(x), x)
    kernel = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)  # 23 at 224
    _apply(x, _rand(B, dev) < blur_p, lambda y, sg: gaussian_blur(y, sg, kernel), _rand(B, dev, 0.1, 2.0))
    _apply(x, _rand(B, dev) < solarize_p, solarize, torch.full((B,), 128 / 255, device=dev))
    return x


# --- RandAugment, timm's semantics ---
MAX_LEVEL = 10.0
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
SCALE = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateX": 0.45, "TranslateY": 0.45, "Color": 0.9,
         "Contrast": 0.9, "Brightness": 0.9, "Sharpness": 0.9}


def op_arg(name, magnitude):
    """Per-sample arguments of op `name` at magnitudes (B,) in [0, 10] (timm's *_level_to_arg, 'increasing')."""
    t = magnitude / MAX_LEVEL
    if name in SCALE:
        arg = SCALE[name] * t * torch.where(torch.rand_like(t) < 0.5, -1.0, 1.0)  # random sign
        return 1.0 + arg if name in ("Color", "Contrast", "Brightness", "Sharpness") else arg  # factor 0.1-1.9
    if name == "Posterize":
        return 4 - (4 * t).floor()  # bits kept: 4 at 0, 0 (black) at 10
    if name == "Solarize":
        return 256 - (256 * t).floor()  # invert pixels >= threshold: none at 0, all at 10
    if name == "SolarizeAdd":
        return (110 * t).floor()  # added to pixels < 128
    return t  # no argument


def _quantize(x):  # PIL's ops work on uint8 levels
    return (x * 255).round()


def autocontrast(x):
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-12), x)


def equalize(x):
    """PIL's per-channel histogram equalisation, batched: lut[i] = (cumulative count below i + step // 2) // step."""
    B, C, H, W = x.shape
    q = _quantize(x).long().view(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    last = hist.gather(1, (hist > 0).long().cumsum(1).argmax(1, keepdim=True))  # count of the highest level present
    step = torch.div(hist.sum(1, keepdim=True) - last, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) - hist + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1),
                    rounding_mode="floor").clamp(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device, dtype=lut.dtype).expand_as(lut))
    return (lut.gather(1, q) / 255).view(B, C, H, W)


def posterize(x, bits):
    mask = (255 - (2 ** (8 - bits) - 1)).long()  # keep the top `bits` bits
    return (_quantize(x).long() & _bshape(mask)) / 255


def solarize_levels(x, threshold):
    q = _quantize(x)
    return torch.where(q >= _bshape(threshold), 255 - q, q) / 255


def solarize_add(x, add):
    q = _quantize(x)
    return torch.where(q < 128, (q + _bshape(add)).clamp(max=255), q) / 255


def sharpness(x, f):
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (3x3, centre 5, /13), borders unfiltered."""
    k = torch.ones(3, 3, device=x.device)
    k[1, 1] = 5
    smooth = F.conv2d(x, (k / 13).expand(3, 1, 3, 3), groups=3)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return blend(x, degenerate, f)


def affine(x, matrix):
    """Per-sample affine maps in pixels (output pixel centre -> input point, PIL's convention), bicubic, filled with
    the ImageNet mean colour."""
    B, _, H, W = x.shape
    to_px = torch.tensor([[W / 2, 0, W / 2], [0, H / 2, H / 2], [0, 0, 1]], device=x.device)
    to_norm = torch.tensor([[2 / W, 0, -1], [0, 2 / H, -1], [0, 0, 1]], device=x.device)
    m = torch.cat([matrix, torch.tensor([0, 0, 1.0], device=x.device).expand(B, 1, 3)], 1)
    theta = (to_norm @ m @ to_px)[:, :2]
    fill = torch.tensor(FILL, device=x.device).view(1, 3, 1, 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return (F.grid_sample(x - fill, grid, mode="bicubic", padding_mode="zeros", align_corners=False) + fill).clamp(0, 1)


def _matrix(name, arg, H, W):
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "Rotate":  # counter-clockwise by arg degrees about the centre, as PIL's rotate
        a = arg * math.pi / 180
        cos, sin = torch.cos(a), torch.sin(a)
        cx, cy = W / 2, H / 2
        return torch.stack([torch.stack([cos, -sin, cx - cos * cx + sin * cy], 1),
                            torch.stack([sin, cos, cy - sin * cx - cos * cy], 1)], 1)
    rows = {"ShearX": ((one, arg, zero), (zero, one, zero)), "ShearY": ((one, zero, zero), (arg, one, zero)),
            "TranslateX": ((one, zero, arg * W), (zero, one, zero)),
            "TranslateY": ((one, zero, zero), (zero, one, arg * H))}[name]  # about the top-left corner, as timm
    return torch.stack([torch.stack(r, 1) for r in rows], 1)


# the non-geometric ops: (x, per-sample args (B,)) -> x
PIXEL_OPS = {"AutoContrast": lambda x, a: autocontrast(x), "Equalize": lambda x, a: equalize(x),
             "Invert": lambda x, a: 1 - x, "Posterize": lambda x, a: posterize(x, a.long()),
             "Solarize": solarize_levels, "SolarizeAdd": solarize_add, "Color": adjust_saturation,
             "Contrast": adjust_contrast, "Brightness": adjust_brightness, "Sharpness": sharpness}


def apply_op(x, name, arg):
    if name in PIXEL_OPS:
        return PIXEL_OPS[name](x, arg)
    return affine(x, _matrix(name, arg, *x.shape[-2:]))


def rand_augment(x, magnitude=10.0, magnitude_std=0.5, num_ops=2, prob=0.5, ops=OPS):
    """timm's rand-m{magnitude}-mstd{magnitude_std}-inc1 per sample; the defaults are the paper's rand-m10-mstd0.5-inc1
    (PAPER §3.1). torchvision's RandAugment(10) is bin 10 of 31, a third of that strength."""
    B, dev, x = len(x), x.device, x.clone()  # the ops below write into this copy
    for _ in range(num_ops):
        drawn = torch.randint(len(ops), (B,), device=dev)  # uniform, with replacement across the num_ops layers
        on = _rand(B, dev) < prob
        if magnitude_std > 0:
            m = magnitude + magnitude_std * torch.randn(B, device=dev)
        else:
            m = torch.full((B,), magnitude, device=dev)
        m = m.clamp(0, MAX_LEVEL)
        for k, name in enumerate(ops):
            _apply(x, on & (drawn == k), lambda y, a, n=name: apply_op(y, n, a), op_arg(name, m))
    return x
