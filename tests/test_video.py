"""Video path (ixc25_ms.video): 1-fps frame sampling with PyAV, the labelled canvas, the video transform."""
import fractions

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ixc25_ms.processing import ImageError
from ixc25_ms.video import (VideoError, default_font, frames_to_image, is_video_path, load_video_frames,
                            preprocess_video, video_transform)


def make_video(path, n, fps, codec="mpeg4", size=(64, 48)):
    """Frame i is a flat colour encoding i: R = 16*(i%16), G = 16*(i//16), B = 128."""
    pix = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], pix
        s.bit_rate = 20_000_000  # near-lossless, so flat colours survive
        for i in range(n):
            a = np.zeros((size[1], size[0], 3), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = 16 * (i % 16), 16 * (i // 16), 128
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def frame_ids(frames):
    out = []
    for f in frames:
        a = np.asarray(f).reshape(-1, 3).mean(0)
        assert abs(a[2] - 128) < 6
        out.append(int(round(a[0] / 16)) + 16 * int(round(a[1] / 16)))
    return out


# ---------------------------------------------------------------- paths
@pytest.mark.parametrize("p,want", [("a.mp4", True), ("B.MOV", True), ("x/y.mkv", True), ("c.avi", True),
                                    ("d.wmv", True), ("e.png", False), ("mp4", False), ("f.mp4.txt", False),
                                    (3, False), (None, False)])
def test_is_video_path(p, want):
    assert is_video_path(p) is want


# ---------------------------------------------------------------- frame selection
@pytest.mark.parametrize("ext,fps,codec,n,want", [
    (".mp4", 5, "mpeg4", 12, [0, 5, 10]),                               # stride round(5) = 5
    (".avi", fractions.Fraction(30000, 1001), "mpeg4", 65, [0, 30, 60]),  # 29.97 fps -> stride 30
    (".mkv", fractions.Fraction(5, 2), "ffv1", 9, [0, 2, 4, 6, 8]),     # round(2.5) = 2 (banker's rounding)
    (".mov", 1, "mjpeg", 3, [0, 1, 2]),
])
def test_one_frame_per_second(tmp_path, ext, fps, codec, n, want):
    path = make_video(tmp_path / ("v" + ext), n, fps, codec)
    frames = load_video_frames(path)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert frame_ids(frames) == want


def test_more_than_32_frames_are_subsampled(tmp_path):
    path = make_video(tmp_path / "long.mp4", 40, 1)
    got = frame_ids(load_video_frames(path))
    assert got == [int(i * 40 / 33) for i in range(32)]
    assert len(got) == 32 and got[:8] == [0, 1, 2, 3, 4, 6, 7, 8]


def test_num_frm(tmp_path):
    path = make_video(tmp_path / "v.mp4", 20, 2)  # 10 sampled frames 0,2,..,18; step 10/5 = 2
    assert frame_ids(load_video_frames(path, num_frm=4)) == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="num_frm"):
        load_video_frames(path, num_frm=0)


def test_unreadable_videos(tmp_path):
    bad = tmp_path / "junk.mp4"
    bad.write_bytes(b"definitely not a video" * 10)
    with pytest.raises(VideoError, match="junk.mp4.*cannot decode"):
        load_video_frames(str(bad))
    with pytest.raises(VideoError, match="nope.mp4.*no such"):
        load_video_frames(str(tmp_path / "nope.mp4"))
    audio = tmp_path / "sound.mkv"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(VideoError, match="sound.mkv.*no video stream"):
        load_video_frames(str(audio))


# ---------------------------------------------------------------- canvas
def solid(w, h, rgb):
    return Image.new("RGB", (w, h), rgb)


def header(width, text, font=None):
    img = Image.new("RGB", (width, 40), "white")
    ImageDraw.Draw(img).text((0, 0), text, font=font or default_font(40), fill="black")
    return np.asarray(img)


def test_landscape_frames_are_stacked(tmp_path):
    cols = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    canvas = frames_to_image([solid(64, 48, c) for c in cols])
    fh = int(1120 / (64 / 48))  # 840
    assert canvas.mode == "RGB" and canvas.size == (1120, 3 * (fh + 50))
    a = np.asarray(canvas)
    for i, c in enumerate(cols):
        y = i * (fh + 50)
        assert (a[y + 40:y + 40 + fh] == c).all()  # the frame, right below its header
        assert np.array_equal(a[y:y + 40], header(1120, f"<IMAGE {i}>"))  # the label
        assert (a[y:y + 40] < 100).any()  # and it has ink
        gap = a[y + 40 + fh:y + 50 + fh]
        if i < 2:
            black_rows = [r for r in range(10) if (gap[r] == 0).all()]
            assert len(black_rows) == 2 and black_rows[0] in (4, 5)  # 2 px line at y+40+h+5
        else:
            assert (gap == 255).all()  # no line after the last frame


def test_portrait_frames_side_by_side():
    cols = [(250, 10, 10), (10, 250, 10)]
    canvas = frames_to_image([solid(48, 64, c) for c in cols])
    fw = int(1120 * 48 / 64)  # 840
    assert canvas.size == (2 * (fw + 10), 1160)
    a = np.asarray(canvas)
    assert (a[40:, :fw] == cols[0]).all() and (a[40:, fw + 10:2 * fw + 10] == cols[1]).all()
    lines = [x for x in range(fw, fw + 10) if (a[:, x] == 0).all()]
    assert len(lines) == 2 and lines[0] in (fw + 4, fw + 5)
    assert (a[:, 2 * fw + 10:] == 255).all()  # last frame: gap, no line
    assert np.array_equal(a[:40, fw + 10:], header(fw + 10, "<IMAGE 1>"))


def test_orientation_follows_last_frame():
    mixed = frames_to_image([solid(64, 48, (1, 2, 3)), solid(48, 64, (4, 5, 6))])
    assert mixed.size == (1120 + 10 + 840 + 10, 1160)  # side by side, heights 840 and 1120
    square_last = frames_to_image([solid(64, 48, (1, 2, 3)), solid(50, 50, (4, 5, 6))])
    assert square_last.size == (1120 + 10 + 1120 + 10, 1160)
    landscape_last = frames_to_image([solid(48, 64, (1, 2, 3)), solid(64, 48, (4, 5, 6))])
    assert landscape_last.size == (1120, 1120 + 50 + 840 + 50)  # stacked, width = max frame width


def test_font_path_and_errors(tmp_path):
    font_file = tmp_path / "font.ttf"
    font_file.write_bytes(default_font(40).path.getvalue())  # Pillow's bundled font, as a file
    a = np.asarray(frames_to_image([solid(64, 48, (9, 9, 9))], font_path=str(font_file)))
    assert np.array_equal(a[:40], header(1120, "<IMAGE 0>", ImageFont.truetype(str(font_file), 40)))
    with pytest.raises(ValueError, match="missing.ttf"):
        frames_to_image([solid(64, 48, (9, 9, 9))], font_path=str(tmp_path / "missing.ttf"))
    with pytest.raises(ValueError, match="non-empty"):
        frames_to_image([])
    with pytest.raises(ImageError, match="too elongated"):
        frames_to_image([solid(3000, 1, (0, 0, 0))])


# ---------------------------------------------------------------- video transform
@pytest.mark.parametrize("size,content,want", [((1120, 840), (746, 560), (1120, 560)),
                                               ((840, 1120), (560, 746), (560, 1120)),
                                               ((300, 300), (560, 560), (560, 560)),
                                               ((2550, 1160), (1231, 560), (1680, 560))])
def test_video_transform(size, content, want):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8))
    out = video_transform(img, hd_num=24)
    assert out.size == want
    a = np.asarray(out)
    cw, ch = content
    if size[0] >= size[1]:
        ref = np.asarray(img.resize(content, Image.BILINEAR))
    else:  # the official code resizes the transposed image
        t = img.transpose(Image.Transpose.TRANSPOSE).resize(content[::-1], Image.BILINEAR)
        ref = np.asarray(t.transpose(Image.Transpose.TRANSPOSE))
    assert np.array_equal(a[:ch, :cw], ref)
    assert (a[ch:] == 255).all() and (a[:, cw:] == 255).all()  # white padding at the end of the long side


def test_preprocess_video(tmp_path):
    path = make_video(tmp_path / "v.mp4", 6, 2)  # frames 0, 2, 4 -> stacked 1120 x 3*(840+50)
    pv = preprocess_video(path)
    # canvas 1120x2670 is portrait: short side 1120 -> 560, long 2670 -> int(560*2670/1120)=1335 -> pad 1680
    assert pv.shape == (1, 3, 1680, 560) and pv.dtype == np.float32
