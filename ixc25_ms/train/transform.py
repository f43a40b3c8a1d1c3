"""The official *training* image transform (R560_HD18_Identity_transform): differs from inference on purpose."""
from __future__ import annotations

import math
import os
from typing import Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..processing import ImageError, hd_plan, to_pixel_values

_WHITE = (255, 255, 255)


def train_plan(width: int, height: int, hd_num: int = 18, resolution: int = 560) -> Tuple[int, int, int]:
    """(new_w, new_h, padded_h) in landscape axes (transposed for a portrait image) of the training transform:
    scale = largest s with s * ceil(s / ratio) <= hd_num, then min(ceil(1.5 * w / resolution), s) — the official
    draws randrange(low, up + 1) with both bounds equal, so it is deterministic — new_w = scale * resolution,
    new_h = int(new_w / ratio), padded to a multiple of resolution. Inference uses ceil(w / resolution) instead
    and pads at the bottom; training pads centred."""
    new_w, new_h = hd_plan(width, height, hd_num, resolution, upscale=1.5)
    return new_w, new_h, int(math.ceil(new_h / resolution) * resolution)


def train_grid(width: int, height: int, hd_num: int = 18, resolution: int = 560) -> Tuple[int, int]:
    """(rows h, cols w) of crops the training transform makes of a width x height image."""
    new_w, _, padded_h = train_plan(width, height, hd_num, resolution)
    h, w = padded_h // resolution, new_w // resolution
    return (w, h) if width < height else (h, w)


def open_train_image(path: str) -> Image.Image:
    """Image.open(path).convert('RGB'), as the official ImageProcessorHD (alpha dropped, not composited)."""
    if not os.path.isfile(path):
        raise ImageError(f"no such image file {path!r}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path!r}: cannot read the image ({type(e).__name__}: {e})") from None


def train_transform(img: Image.Image, hd_num: int = 18, resolution: int = 560) -> np.ndarray:
    """RGB PIL image -> normalised float32 (1, 3, H, W), H and W multiples of `resolution`."""
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h, padded_h = train_plan(width, height, hd_num, resolution)
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # torchvision's resize of a PIL image
    if padded_h != new_h:
        top = int((padded_h - new_h) / 2)  # centred: the official padding_336
        canvas = Image.new("RGB", (new_w, padded_h), _WHITE)
        canvas.paste(img, (0, top))
        img = canvas
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return to_pixel_values(img)
