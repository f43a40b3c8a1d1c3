"""Image loading, the HD transform and CLIP normalisation (ixc25_ms.processing)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from ixc25_ms.processing import (CLIP_MEAN, CLIP_STD, ImageError, hd_plan, hd_transform, load_image,
                                 preprocess_image, to_pixel_values)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "official-tiny")


def noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


# ---------------------------------------------------------------- HD transform sizes
@pytest.mark.parametrize("size,want", [
    ((700, 300), (1120, 560)),     # the golden case: scale min(2, 7) = 2, resized to 1120x479
    ((300, 700), (560, 1120)),     # portrait
    ((560, 560), (560, 560)),      # exact square crop
    ((1000, 1000), (1120, 1120)),  # square, scaled-identity cap 2
    ((10, 10), (560, 560)),        # tiny: upsampled to one crop
    ((1, 1), (560, 560)),
    ((1120, 560), (1120, 560)),    # exact multiple, no resize
    ((1680, 1120), (1680, 1120)),
    ((3000, 2000), (3360, 2240)),  # large: 6x4 = 24 crops
    ((2000, 100), (2240, 560)),    # very wide
    ((100, 2000), (560, 2240)),    # very tall
])
def test_hd_transform_sizes(size, want):
    out = hd_transform(noise(*size), hd_num=24)
    assert out.mode == "RGB" and out.size == want


def test_golden_resize_height_is_479():
    # int(1120 / (700/300)) is 479 in floating point (the spec's example says 480): the golden tensors agree
    assert hd_plan(700, 300, 24) == (1120, 479)
    pv = np.load(os.path.join(DATA, "expected.npz"))["pixel_values"]
    white = (np.float32(1.0) - CLIP_MEAN) / CLIP_STD
    assert np.array_equal(pv[0, :, 479, :], np.broadcast_to(white[:, None], (3, 1120)))
    assert not np.array_equal(pv[0, :, 478, :], np.broadcast_to(white[:, None], (3, 1120)))


def test_hd_transform_content_is_pil_bilinear_then_white_padding():
    img = noise(700, 300, 1)
    out = np.asarray(hd_transform(img))
    want = np.asarray(img.resize((1120, 479), Image.BILINEAR))
    assert np.array_equal(out[:479], want)
    assert (out[479:] == 255).all()


def test_portrait_is_transpose_of_landscape():
    img = noise(300, 700, 2)
    out = hd_transform(img)
    via = hd_transform(img.transpose(Image.Transpose.TRANSPOSE)).transpose(Image.Transpose.TRANSPOSE)
    assert np.array_equal(np.asarray(out), np.asarray(via))
    a = np.asarray(out)
    assert (a[:, 479:] == 255).all() and not (a[:, 478] == 255).all()  # padded on the right, not rotated
    # a transpose keeps the top-left pixel at the top-left (a rotation would not)
    assert np.array_equal(a[:5, :5], np.asarray(img.transpose(Image.Transpose.TRANSPOSE).resize(
        (1120, 479), Image.BILINEAR).transpose(Image.Transpose.TRANSPOSE))[:5, :5])


@pytest.mark.parametrize("size", [(560, 560), (1120, 560), (1680, 1120)])
def test_exact_multiples_are_untouched(size):
    img = noise(*size, 3)
    assert np.array_equal(np.asarray(hd_transform(img)), np.asarray(img))


@pytest.mark.parametrize("hd_num", [1, 2, 6, 24, 25])
def test_hd_num_bounds_crop_count(hd_num):
    rng = np.random.default_rng(hd_num)
    sizes = [tuple(int(v) for v in rng.integers(1, 12000, 2)) for _ in range(300)]
    sizes += [(560 * k, 560) for k in range(1, 30)] + [(5000, 5000), (13439, 1), (7, 7000)]
    for w, h in sizes:
        try:
            nw, nh = hd_plan(w, h, hd_num)
        except ImageError:
            assert max(w, h) / min(w, h) > 560 * hd_num  # only ratios beyond 560*hd_num can fail
            continue
        crops = (nw // 560) * -(-nh // 560)
        assert nw % 560 == 0 and 1 <= crops <= hd_num, (w, h, nw, nh)
        assert nw // 560 <= -(-max(w, h) // 560)  # never more columns than ceil(w/560)


def test_hd_num_search_values():
    # largest s with s*ceil(s/ratio) <= hd_num, then min(ceil(w/560), s)
    assert hd_plan(10000, 8000, 24) == (2800, 2240)  # ratio 1.25 -> s=5 (5*4=20; 6*5=30)
    assert hd_plan(20000, 1000, 24) == (11200, 560)  # ratio 20 -> s=20
    assert hd_plan(5000, 5000, 25) == (2800, 2800)  # s=5
    assert hd_plan(5000, 5000, 24) == (2240, 2240)  # s=4
    assert hd_plan(2000, 100, 1) == (560, 28)


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ImageError, match="too elongated"):
        hd_transform(Image.new("RGB", (20000, 1)), hd_num=24)
    with pytest.raises(ImageError, match="image 1x20000 is too elongated"):  # named as given, not transposed
        hd_plan(1, 20000, 24)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "24"])
def test_bad_hd_num(bad):
    with pytest.raises(ImageError, match="hd_num"):
        hd_transform(noise(10, 10), hd_num=bad)


# ---------------------------------------------------------------- modes
def test_rgba_composited_on_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200  # red 200
    a[0, 0, 3] = 255
    a[0, 1, 3] = 128
    out = np.asarray(load_image(Image.fromarray(a, "RGBA")))
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)  # fully transparent -> white
    assert abs(int(out[0, 1, 0]) - round(200 * 128 / 255 + 255 * 127 / 255)) <= 1
    assert abs(int(out[0, 1, 1]) - round(255 * 127 / 255)) <= 1


def test_la_l_p_cmyk_1():
    la = Image.new("LA", (3, 3), (50, 0))
    assert tuple(np.asarray(load_image(la))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(load_image(Image.new("L", (3, 3), 100)))[0, 0]) == (100, 100, 100)
    p = Image.new("RGB", (3, 3), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(np.asarray(load_image(p))[0, 0]) == (10, 20, 30)
    pt = p.copy()
    pt.info["transparency"] = 0
    assert tuple(np.asarray(load_image(pt))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(load_image(Image.new("CMYK", (3, 3), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(load_image(Image.new("1", (3, 3), 1)))[0, 0]) == (255, 255, 255)


def test_16_bit_grey_scaled():
    a = np.array([[0, 257 * 100, 65535]], np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = np.asarray(load_image(img))
    assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == [0, 100, 255]
    out32 = np.asarray(load_image(img.convert("I")))
    assert out32[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1", "YCbCr"])
def test_every_mode_goes_through_preprocess(mode):
    img = noise(30, 20, 4, "RGB")
    img = img.convert("I").convert("I;16") if mode == "I;16" else img.convert(mode)
    pv = preprocess_image(img)
    assert pv.shape == (1, 3, 560, 560) and pv.dtype == np.float32 and np.isfinite(pv).all()


def test_16_bit_png_file(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((5, 6), 257 * 40, np.uint16)).save(p)
    assert tuple(np.asarray(load_image(str(p)))[0, 0]) == (40, 40, 40)


# ---------------------------------------------------------------- inputs and errors
def test_numpy_inputs():
    a = np.random.default_rng(5).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(a)), a)
    assert load_image(a[:, :, 0]).size == (9, 7)
    assert load_image(a[:, :, :1]).mode == "RGB"
    rgba = np.concatenate([a, np.zeros((7, 9, 1), np.uint8)], axis=2)
    assert (np.asarray(load_image(rgba)) == 255).all()
    assert np.array_equal(np.asarray(load_image(a[:, ::-1])), a[:, ::-1])  # non-contiguous view


@pytest.mark.parametrize("arr,msg", [(np.zeros((4, 4, 3), np.float32), "uint8"),
                                     (np.zeros((4, 4, 2), np.uint8), "HxW"),
                                     (np.zeros((4,), np.uint8), "HxW"),
                                     (np.zeros((0, 4, 3), np.uint8), "zero-size")])
def test_bad_arrays(arr, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(arr)


def test_bad_objects():
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12)
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="PIL image"):
        hd_transform(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="PIL image"):
        to_pixel_values("x.png")


def test_bad_files(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="missing.png.*no such"):
        load_image(str(missing))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*empty"):
        load_image(empty)
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image at all")
    with pytest.raises(ImageError, match="notes.jpg.*not a recognised image"):
        load_image(str(txt))
    buf = io.BytesIO()
    noise(64, 64, 6).save(buf, "PNG")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="trunc.png.*truncated"):
        load_image(str(trunc))
    with pytest.raises(ImageError, match="no such image file"):
        load_image(str(tmp_path))  # a directory


# ---------------------------------------------------------------- normalisation
def test_to_pixel_values_white_black_and_layout():
    img = Image.new("RGB", (560, 560), "white")
    img.paste(Image.new("RGB", (10, 20), "black"), (0, 0))
    pv = to_pixel_values(img)
    assert pv.shape == (1, 3, 560, 560) and pv.dtype == np.float32 and pv.flags["C_CONTIGUOUS"]
    white = (np.float32(1.0) - CLIP_MEAN) / CLIP_STD
    black = (np.float32(0.0) - CLIP_MEAN) / CLIP_STD
    assert np.array_equal(pv[0, :, 559, 559], white)
    assert np.array_equal(pv[0, :, 19, 9], black)  # row 19, column 9: inside the 10x20 black box
    assert np.array_equal(pv[0, :, 9, 19], white)


def test_preprocess_matches_golden_and_chain(tmp_path):
    pv = preprocess_image(os.path.join(DATA, "input_image.png"))
    assert np.array_equal(pv, np.load(os.path.join(DATA, "expected.npz"))["pixel_values"])
    img = noise(900, 1300, 7)
    p = tmp_path / "x.png"
    img.save(p)
    pv2 = preprocess_image(p, hd_num=6)
    assert np.array_equal(pv2, to_pixel_values(hd_transform(img, 6)))
    # portrait 900x1300 -> 1300x900 (ratio 1.44): search gives 2 (3*ceil(2.08)=9 > 6), cap 3 -> 1120x775 -> pad
    assert pv2.shape == (1, 3, 1120, 1120)
