"""Video path of IXC2.5: 1-fps frame sampling with PyAV, the labelled frame canvas and the video transform."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .processing import PATCH, ImageError, check_crop, load_image, to_pixel_values

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".wmv")
HEADER = 40  # px of label above (landscape) or left-aligned over (portrait) each frame
GAP = 10  # px between frames
LONG_SIDE = 2 * PATCH  # frames are resized so their long side is 1120 (2 crops; 2 x crop for other towers)


class VideoError(ValueError):
    """A video cannot be opened or decoded, or has no frames (the message names the file)."""


def is_video_path(p) -> bool:
    """True for str/PathLike paths ending in .mp4/.avi/.mkv/.mov/.wmv (case-insensitive)."""
    if not isinstance(p, (str, os.PathLike)):
        return False
    return os.fspath(p).lower().endswith(VIDEO_EXTS)


def _sample_indices(n_frames: int, fps: float, num_frm: int) -> List[int]:
    stride = max(1, int(round(float(fps))))  # 1 frame per second from frame 0 (fps < 0.5 -> every frame)
    pos = list(range(0, n_frames, stride))
    if len(pos) > num_frm:
        step = len(pos) / (num_frm + 1)
        pos = [pos[int(i * step)] for i in range(num_frm)]
    return pos


def load_video_frames(path, num_frm: int = 32) -> List[Image.Image]:
    """Decode a video with PyAV and return RGB PIL frames sampled at 1 frame per second from frame 0
    (stride round(avg fps)); when that gives more than num_frm frames, keep indices int(i*len/(num_frm+1))."""
    import av  # local import: only the video path needs PyAV

    name = repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else repr(path)
    if isinstance(num_frm, bool) or not isinstance(num_frm, int) or num_frm < 1:
        raise ValueError(f"num_frm must be a positive integer, got {num_frm!r}")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise VideoError(f"{name}: no such video file")
    try:
        with av.open(os.fspath(path)) as c:
            if not c.streams.video:
                raise VideoError(f"{name}: no video stream in the file")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            n = sum(1 for _ in c.decode(vs))
        if not rate or float(rate) <= 0:
            raise VideoError(f"{name}: the video stream reports no frame rate")
        if n == 0:
            raise VideoError(f"{name}: the video has no decodable frames")
        wanted = _sample_indices(n, float(rate), num_frm)
        keep = set(wanted)
        got = {}
        with av.open(os.fspath(path)) as c:
            vs = c.streams.video[0]
            for i, frame in enumerate(c.decode(vs)):
                if i in keep:
                    got[i] = frame.to_image().convert("RGB")
                if i >= wanted[-1]:
                    break
    except VideoError:
        raise
    except Exception as e:  # PyAV raises several FFmpeg error classes for bad input
        raise VideoError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from None
    if len(got) != len(wanted):
        raise VideoError(f"{name}: decoded {len(got)} of the {len(wanted)} frames expected on the second pass")
    return [got[i] for i in wanted]


def default_font(size: int = 40):
    """The header font: Pillow's bundled scalable font at `size` (the official SimHei.ttf is a download)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _resize_long_side(img: Image.Image, long_side: int = LONG_SIDE) -> Image.Image:
    w, h = img.size
    ratio = w / h
    if w > h:
        size = (long_side, int(long_side / ratio))
    else:
        size = (int(long_side * ratio), long_side)
    if size[0] < 1 or size[1] < 1:
        raise ImageError(f"frame {w}x{h} is too elongated to resize to a {long_side}-px long side")
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)


def frames_to_image(frames: Sequence, font_path: Optional[str] = None, crop: int = PATCH) -> Image.Image:
    """Lay frames out on one white RGB canvas, each resized to a 2*crop (1120) px long side and labelled
    `<IMAGE i>`.

    The orientation of the last frame decides: landscape -> stacked vertically (40 px header above each frame,
    10 px gaps, 2 px black line between frames); portrait/square -> side by side (labels on top, vertical lines).
    font_path: a TrueType file used at size 40; None -> Pillow's bundled font (glyphs differ from SimHei)."""
    if isinstance(frames, (Image.Image, np.ndarray)) or not len(frames):
        raise ValueError("frames_to_image needs a non-empty sequence of frames")
    src = [load_image(f) for f in frames]
    if font_path is None:
        font = default_font(HEADER)
    else:
        try:
            font = ImageFont.truetype(os.fspath(font_path), HEADER)
        except OSError as e:
            raise ValueError(f"{font_path!r}: cannot load TrueType font ({e})") from None
    last_w, last_h = src[-1].size
    imgs = [_resize_long_side(f, 2 * check_crop(crop)) for f in src]
    if last_w > last_h:
        width = max(im.size[0] for im in imgs)
        height = sum(im.size[1] + GAP + HEADER for im in imgs)
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        y = 0
        for i, im in enumerate(imgs):
            h = im.size[1]
            canvas.paste(im, (0, y + HEADER))
            draw.text((0, y), f"<IMAGE {i}>", font=font, fill="black")
            if i + 1 < len(imgs):
                ly = y + HEADER + h + 5
                draw.line([(0, ly), (width, ly)], fill="black", width=2)
            y += h + GAP + HEADER
    else:
        width = sum(im.size[0] + GAP for im in imgs)
        height = max(im.size[1] for im in imgs) + HEADER
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        x = 0
        for i, im in enumerate(imgs):
            w = im.size[0]
            canvas.paste(im, (x, HEADER))
            draw.text((x, 0), f"<IMAGE {i}>", font=font, fill="black")
            if i + 1 < len(imgs):
                lx = x + w + 5
                draw.line([(lx, 0), (lx, height)], fill="black", width=2)
            x += w + GAP
    return canvas


def _pad_end_white(img: Image.Image, axis: int, crop: int = PATCH) -> Image.Image:
    size = list(img.size)
    size[axis] = -(-size[axis] // crop) * crop
    if tuple(size) == img.size:
        return img
    out = Image.new("RGB", tuple(size), (255, 255, 255))
    out.paste(img, (0, 0))
    return out


def video_transform(img: Image.Image, hd_num: Optional[int] = None, crop: int = PATCH) -> Image.Image:
    """The official Video_transform: resize so the short side is crop (560; PIL bilinear, on the transposed
    image for portrait inputs, as the official code does), then pad the long side with white at the end (right
    or bottom) to a multiple of crop. hd_num is accepted and ignored, as in the official code."""
    crop = check_crop(crop)
    img = load_image(img)
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    new_w = int(crop * (width / height))
    if (new_w, crop) != img.size:
        img = img.resize((new_w, crop), Image.Resampling.BILINEAR)
    img = _pad_end_white(img, 0, crop)  # pad width (the long side in this orientation)
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def preprocess_video(path, num_frm: int = 32, font_path: Optional[str] = None, crop: int = PATCH) -> np.ndarray:
    """Video file -> float32 (1,3,H,W) pixel values (H, W multiples of crop): frames -> labelled canvas ->
    video_transform -> CLIP norm."""
    canvas = frames_to_image(load_video_frames(path, num_frm), font_path, crop)
    return to_pixel_values(video_transform(canvas, crop=crop))
