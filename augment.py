"""The fine-tuning RandAugment with timm's semantics (PAPER §3.1: `rand-m10-mstd0.5-inc1`), on PIL images.

torchvision's RandAugment(magnitude=10) is bin 10 of 31, about a third of what the paper trained with. timm's
policy, rebuilt here without timm:
- 2 ops drawn uniformly (with replacement) from the 15-op "increasing" set below, each applied with probability 0.5;
- magnitude M of 10 jittered per op by a normal of std 0.5 and clipped to [0, 10];
- signed ops (rotate, shear, translate, the four enhancements) take a random sign;
- at M = 10: rotate 30 deg, shear 0.3, translate 0.45 x side, enhance 1 +- 0.9, posterize to 0 bits,
  solarize threshold 0, SolarizeAdd +110; geometric ops fill with the ImageNet mean colour and resample bicubic.
"""
import random

import torchvision.transforms.functional as TF
from PIL import Image

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # round(255 x ImageNet mean): timm's img_mean
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Brightness", "Sharpness"}


def op_arg(name, magnitude):
    """The argument of op `name` at a magnitude in [0, 10] (timm's *_level_to_arg, 'increasing' variants)."""
    t = magnitude / MAX_LEVEL
    arg = {"Rotate": 30.0 * t, "ShearX": 0.3 * t, "ShearY": 0.3 * t, "TranslateX": 0.45 * t, "TranslateY": 0.45 * t,
           "Color": 0.9 * t, "Contrast": 0.9 * t, "Brightness": 0.9 * t, "Sharpness": 0.9 * t,
           "Posterize": 4 - int(4 * t),  # bits kept: 4 at magnitude 0, 0 (black) at 10
           "Solarize": 256 - int(256 * t),  # invert pixels >= threshold: none at 0, all at 10
           "SolarizeAdd": int(110 * t)}.get(name)  # add to pixels < 128
    if name in SIGNED and random.random() > 0.5:
        arg = -arg
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        arg = 1.0 + arg  # enhancement factor in [0.1, 1.9]
    return arg


def _affine(img, coeffs):
    # PIL's inverse map (output (x, y) samples input (a x + b y + c, d x + e y + f)) about the top-left, as timm
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=FILL)


def _lut(img, fn):
    return img.point([fn(i) for i in range(256)] * len(img.getbands()))


def apply_op(img, name, arg):
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    if name == "Rotate":
        return TF.rotate(img, arg, interpolation=TF.InterpolationMode.BICUBIC, fill=list(FILL))
    if name == "Posterize":  # keep the top `arg` bits; 0 bits is black (a LUT: Pillow refuses bits=0)
        return _lut(img, lambda i: i & (0xFF << (8 - arg)) & 0xFF)
    if name == "Solarize":
        return TF.solarize(img, arg)
    if name == "SolarizeAdd":
        return _lut(img, lambda i: min(255, i + arg) if i < 128 else i)
    if name == "Color":
        return TF.adjust_saturation(img, arg)
    if name == "Contrast":
        return TF.adjust_contrast(img, arg)
    if name == "Brightness":
        return TF.adjust_brightness(img, arg)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, arg)
    if name == "ShearX":
        return _affine(img, (1, arg, 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, arg, 1, 0))
    if name == "TranslateX":
        return _affine(img, (1, 0, arg * img.size[0], 0, 1, 0))
    if name == "TranslateY":
        return _affine(img, (1, 0, 0, 0, 1, arg * img.size[1]))
    raise ValueError(f"unknown RandAugment op {name!r}")


class RandAugment:
    """timm's `rand-m{magnitude}-mstd{magnitude_std}-inc1` on a PIL RGB image (python's `random`, which DataLoader
    workers seed per worker and our checkpoints save, so a resumed run draws the same ops)."""

    def __init__(self, magnitude=10.0, magnitude_std=0.5, num_ops=2, prob=0.5, ops=OPS):
        self.magnitude, self.magnitude_std, self.num_ops, self.prob, self.ops = magnitude, magnitude_std, num_ops, prob, ops

    def __call__(self, img):
        for name in random.choices(self.ops, k=self.num_ops):
            if random.random() > self.prob:  # each drawn op is applied with probability 0.5
                continue
            m = random.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
            img = apply_op(img, name, op_arg(name, min(MAX_LEVEL, max(0.0, m))))
        return img

    def __repr__(self):
        return f"RandAugment(timm rand-m{self.magnitude}-mstd{self.magnitude_std}-inc1, {self.num_ops} ops, p {self.prob})"
