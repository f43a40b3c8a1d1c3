"""Image loading, the IXC2.5 HD transform, CLIP normalisation and torch-exact bicubic matrices (numpy + PIL only)."""
from __future__ import annotations

import functools
import math
import os
from typing import Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

PATCH = 560  # default crop side in pixels (the CLIP tower's resolution); towers pass their own `crop`
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image cannot be read, converted or transformed (the message names the input)."""


def _describe(x) -> str:
    if isinstance(x, (str, bytes, os.PathLike)):
        return repr(os.fspath(x))
    if isinstance(x, Image.Image):
        return f"PIL image (mode {x.mode}, size {x.size[0]}x{x.size[1]})"
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} dtype {x.dtype}"
    return f"object of type {type(x).__name__}"


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> RGB. Alpha (or a transparency key) is composited on white; 16/32-bit ints scale by 1/257."""
    mode = img.mode
    try:
        if mode == "RGB":
            return img
        if mode == "La":  # premultiplied grey+alpha: PIL only converts it to LA
            img = img.convert("LA")
        if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
            return _composite_on_white(img)
        if mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N: treat as 16-bit grey
            a = np.asarray(img).astype(np.float64)
            a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(a, "L").convert("RGB")
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot convert PIL mode {mode} to RGB ({e})") from None


def load_image(x) -> Image.Image:
    """Return an RGB PIL image from a file path, a PIL image or a uint8 array (HxW, HxWx1, HxWx3 or HxWx4).

    Alpha is composited on white. Unreadable, truncated, empty or non-image inputs raise ImageError.
    EXIF orientation is not applied (the official code does not apply it either)."""
    name = _describe(x)
    if isinstance(x, (str, bytes, os.PathLike)):
        path = os.fspath(x)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not os.path.isfile(path):
            raise ImageError(f"{name}: no such image file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{name}: empty file (0 bytes), not an image")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a recognised image file") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: refused by PIL's decompression-bomb limit ({e})") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{name}: cannot decode image (truncated or corrupt: {e})") from None
    elif isinstance(x, Image.Image):
        img = x
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{name}: cannot decode image (truncated or corrupt: {e})") from None
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ImageError(f"{name}: arrays must be uint8 (0..255); convert first")
        a = x
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim == 2:
            mode = "L"
        elif a.ndim == 3 and a.shape[2] in (3, 4):
            mode = "RGB" if a.shape[2] == 3 else "RGBA"
        else:
            raise ImageError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ImageError(f"{name}: zero-size image")
        img = Image.fromarray(np.ascontiguousarray(a), mode)
    else:
        raise ImageError(f"{name}: expected a path, a PIL.Image or a numpy uint8 array")
    if img.size[0] == 0 or img.size[1] == 0:
        raise ImageError(f"{name}: zero-size image ({img.size[0]}x{img.size[1]})")
    return _to_rgb(img, name)


def _pad_bottom_white(img: Image.Image, multiple: int = PATCH) -> Image.Image:
    w, h = img.size
    target = int(math.ceil(h / multiple) * multiple)
    if target == h:
        return img
    out = Image.new("RGB", (w, target), _WHITE)
    out.paste(img, (0, 0))
    return out


def check_crop(crop) -> int:
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 1:
        raise ImageError(f"crop (the tower's resolution) must be a positive integer, got {crop!r}")
    return int(crop)


def hd_plan(width: int, height: int, hd_num: int = 24, crop: int = PATCH, upscale: float = 1.0) -> Tuple[int, int]:
    """The (new_w, new_h) the HD transform resizes a width x height image to, before padding (landscape axes:
    for a portrait image the values refer to the transposed image), for `crop`-px crops. Raises ImageError for
    impossible cases. `upscale` 1.5: the training transform's columns, ceil(1.5 w / crop) (train/transform.py)."""
    if isinstance(hd_num, bool) or not isinstance(hd_num, (int, np.integer)) or hd_num < 1:
        raise ImageError(f"hd_num must be an integer >= 1, got {hd_num!r}")
    crop = check_crop(crop)
    long, short = max(width, height), min(width, height)  # landscape axes; messages name the size as given
    ratio = long / short
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    scale = min(math.ceil(long * upscale / crop), scale)  # long * 1.0 is exact: inference unchanged
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise ImageError(f"image {width}x{height} is too elongated for hd_num={hd_num}: its short side would "
                         f"resize to 0 px (aspect ratio {ratio:.1f} > {new_w})")
    crops = (new_w // crop) * math.ceil(new_h / crop)
    if crops > hd_num:
        raise ImageError(f"image {width}x{height} would need {crops} crops, more than hd_num={hd_num}")
    return new_w, new_h


def hd_transform(img: Image.Image, hd_num: int = 24, crop: int = PATCH) -> Image.Image:
    """The official IXC2.5 HD transform: transpose portrait images, resize (PIL bilinear) to a grid of at most
    hd_num crop-px crops (560 for the official tower), pad the bottom with white to a multiple of crop,
    transpose back. Returns RGB PIL."""
    if not isinstance(img, Image.Image):
        raise ImageError(f"hd_transform expects a PIL image, got {_describe(img)}")
    img = load_image(img)
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = hd_plan(width, height, hd_num, crop)
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    img = _pad_bottom_white(img, crop)
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def to_pixel_values(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (1,3,H,W): x/255 then CLIP mean/std, in float32 as torchvision does."""
    if not isinstance(img, Image.Image):
        raise ImageError(f"to_pixel_values expects a PIL image, got {_describe(img)}")
    a = np.asarray(load_image(img), dtype=np.uint8)
    x = a.astype(np.float32) / np.float32(255.0)
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(np.float32, copy=False)


def preprocess_image(x, hd_num: int = 24, crop: int = PATCH) -> np.ndarray:
    """load_image -> hd_transform -> to_pixel_values: float32 (1,3,H,W), H and W multiples of crop (560)."""
    return to_pixel_values(hd_transform(load_image(x), hd_num, crop))


def _cubic_weights(t: np.ndarray, a: np.float32) -> np.ndarray:
    # torch's cubic convolution coefficients for taps at offsets -1, 0, 1, 2 (float32 arithmetic)
    one, two = np.float32(1), np.float32(2)

    def near(x):  # |x| <= 1
        return ((a + two) * x - (a + np.float32(3))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

    return np.stack([far(t + one), near(t), near(one - t), far(two - t)], axis=-1)


@functools.lru_cache(maxsize=32)
def _bicubic_1d(n_in: int, n_out: int) -> np.ndarray:
    a = np.float32(-0.75)
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    real = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    t = (real - base).astype(np.float32)
    w = _cubic_weights(t, a).astype(np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
        np.add.at(m, (rows, idx), w[:, k])
    m.setflags(write=False)
    return m


def bicubic_resize_matrices(in_h: int, in_w: int, out_h: int, out_w: int) -> Tuple[np.ndarray, np.ndarray]:
    """(Mh [out_h,in_h], Mw [out_w,in_w]) float64 with Mh @ X @ Mw.T == torch F.interpolate(X, (out_h,out_w),
    mode='bicubic', align_corners=False) (a=-0.75, half-pixel centres, clamped borders, no antialias)."""
    for n, v in (("in_h", in_h), ("in_w", in_w), ("out_h", out_h), ("out_w", out_w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"bicubic_resize_matrices: {n} must be a positive integer, got {v!r}")
    return _bicubic_1d(int(in_h), int(out_h)), _bicubic_1d(int(in_w), int(out_w))


def bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Torch-exact bicubic resize of the last two axes of a float array (accumulated in float64, returned float32)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"bicubic_resize: need at least 2 dims, got shape {x.shape}")
    mh, mw = bicubic_resize_matrices(x.shape[-2], x.shape[-1], out_h, out_w)
    y = np.matmul(np.matmul(mh, x.astype(np.float64)), mw.T)
    return y.astype(np.float32)


def global_view(pixel_values: np.ndarray, crop: int = PATCH) -> np.ndarray:
    """The crop x crop global view of normalised pixel_values (1,3,H,W): torch-style bicubic, float32
    (1,3,crop,crop); crop = 560 for the official tower."""
    return bicubic_resize(pixel_values, crop, crop)
