"""Equal views run through the tower once: a 1x1 crop grid's global view is its crop, bit for bit."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

import ixc25_ms
from ixc25_ms.processing import preprocess_image
from ixc25_ms.vision import encode, split_views, unique_views


def _picture(size, seed):
    """A light picture with a red box and a blue disc, placed by the seed."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, (240, 236, 228))
    d = ImageDraw.Draw(im)
    x, y = (int(rng.integers(0, s // 2)) for s in size)
    d.rectangle((x, y, x + size[0] // 3, y + size[1] // 3), fill=(200, 30, 40))
    d.ellipse((size[0] // 2, size[1] // 2, size[0] - 5, size[1] - 5), fill=(30, 60, 200))
    return im


def test_a_one_crop_pictures_global_view_is_its_crop():
    pv = preprocess_image(_picture((300, 200), 0), hd_num=9)
    assert pv.shape == (1, 3, 560, 560)
    views = split_views(pv)
    np.testing.assert_array_equal(views[0], views[1])  # bicubic 560 -> 560 is the identity
    uniq, index = unique_views(views)
    assert uniq.shape == (1, 3, 560, 560) and index.tolist() == [0, 0]
    wide = split_views(preprocess_image(_picture((900, 300), 1), hd_num=9))  # 2 crops + a global view: all differ
    assert len(wide) == 3 and unique_views(wide)[1] is None and unique_views(wide)[0] is wide


def test_unique_views_confirms_every_element():
    """Views equal in the sampled pixels but one element apart stay apart; equal ones anywhere in the stack merge,
    in first-seen order."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((3, 56, 56)).astype(np.float32) for _ in range(3))
    a2 = a.copy()
    a2[1, 5, 6] += 1e-3  # not on the ::37 sample grid
    stack = np.stack([a, b, a, a2, c, b])
    uniq, index = unique_views(stack)
    assert index.tolist() == [0, 1, 0, 2, 3, 1]
    for k, v in enumerate([a, b, a2, c]):
        np.testing.assert_array_equal(uniq[k], v)
    one = stack[:1]
    assert unique_views(one)[1] is None


@pytest.fixture(scope="module")
def loaded():
    return ixc25_ms.load(ixc25_ms.DEFAULT_MODEL)  # (model, tokenizer)


def _count_views(monkeypatch):
    seen = []
    run = encode._run_tower

    def counting(vit, views, use_jit, per_call):
        seen.append(int(views.shape[0]))
        return run(vit, views, use_jit, per_call)
    monkeypatch.setattr(encode, "_run_tower", counting)
    return seen


def test_encode_pixels_runs_the_tower_once_for_a_one_crop_picture(loaded, monkeypatch):
    """The shipped model's tower (560 px), one view a call as chat runs it on CPU: the image embeddings with the
    equal view run once are those of running both, bit for bit; a picture of 2 crops runs all 3 views."""
    seen = _count_views(monkeypatch)
    m = loaded[0]
    args = (m.vit, m.vision_proj, m.plora_glb_GN, m.plora_sub_GN)
    for size, views in (((300, 200), (1, 2)), ((900, 300), (3, 3))):
        pv = preprocess_image(_picture(size, 2), hd_num=9)
        seen.clear()
        once = encode.encode_pixels(*args, pv, views_per_call=1).asnumpy()
        every = encode.encode_pixels(*args, pv, views_per_call=1, dedupe=False).asnumpy()
        assert seen == list(views), (size, seen)
        assert once.shape == every.shape and once.tobytes() == every.tobytes(), size


def test_frozen_tower_training_inputs_run_equal_views_once(loaded, monkeypatch, tmp_path):
    """ixc25-finetune's frozen-tower path (fix_vit): a micro-batch of two small pictures (1x1 crop grids in the
    training transform) and a wide one (2x1) runs 1 + 1 + 3 views through the tower, not 2 + 2 + 3, and hands
    the step the same features bit for bit as running every view."""
    from ixc25_ms.train.batch import Collator
    from ixc25_ms.train.data import parse_item
    from ixc25_ms.train.forward import forward_inputs
    model, tok = loaded
    items = []
    for k, size in enumerate(((300, 200), (200, 330), (700, 300))):
        _picture(size, 10 + k).save(tmp_path / f"{k}.png")
        items.append({"id": str(k), "image": [str(tmp_path / f"{k}.png")], "conversations": [
            {"from": "human", "value": "<ImageHere>What colour is the circle?"},
            {"from": "bot", "value": "The circle is blue."}]})
    col = Collator(tok, 4096, 9, model.vit.geometry)
    samples = [parse_item(it, "items", k) for k, it in enumerate(items)]
    assert [col.grids(s) for s in samples] == [[(1, 1)], [(1, 1)], [(1, 2)]]
    batch = col(samples)
    assert len(batch.views) == 2 + 2 + 3
    seen = _count_views(monkeypatch)
    once = forward_inputs(model, batch, vit_frozen=True)[4].asnumpy()
    n_once = sum(seen)
    every = forward_inputs(model, batch, vit_frozen=True, dedupe=False)[4].asnumpy()
    assert n_once == 5 and sum(seen) - n_once == 7, seen
    assert once.shape[0] == 7 and once.shape == every.shape and once.tobytes() == every.tobytes()
