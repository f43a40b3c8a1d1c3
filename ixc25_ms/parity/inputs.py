"""Host-side inputs both sides of the parity tool share: the padded RGB canvas of an image or a video."""
from __future__ import annotations

import os


def is_video(image) -> bool:
    """True for a path with a video extension (ixc25_ms.video)."""
    from ..video import is_video_path
    return isinstance(image, (str, os.PathLike)) and is_video_path(image)


def canvas(image, hd_num: int, crop: int, font_path=None):
    """The padded RGB PIL image both frameworks normalise, for `crop`-px views (the tower's resolution):
    the HD transform of an image, or a video's labelled frame canvas after the video transform."""
    from ..processing import hd_transform, load_image
    if is_video(image):
        from ..video import frames_to_image, load_video_frames, video_transform
        return video_transform(frames_to_image(load_video_frames(image), font_path, crop), crop=crop)
    return hd_transform(load_image(image), hd_num, crop)
