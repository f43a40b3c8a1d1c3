"""The tower warm-up stage (ixc25_ms.train.tower_warmup): loss and gradients equal to our PyTorch reference, a
killed run resumes to the same weights, only the tower changes, bad tag data stops in one line."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ixc25_ms import shapes as S
from ixc25_ms.config import IXCConfig
from ixc25_ms.train import tower_warmup as W
from ixc25_ms.weights.layout import load_state_dict
from ixc25_ms.weights.safetensors import write_safetensors
from parity_tests.reference.vision import VisionReference, normalize_rgb
from parity_tests.tolerance import assert_close
from scripts import train_default as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 112  # a 4x4 grid of 28-px patches


def tiny_config() -> dict:
    cfg = json.loads(json.dumps(T.CONFIG))
    cfg.update(hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2)
    cfg["vision_config"].update(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                                image_size=SIDE)
    return cfg


def tower_state(cfg: dict, seed: int = 3) -> dict:
    """The recipe's initialisation with weights scaled up so activations and gradients are O(1)."""
    st = T.init_state(seed, config=cfg)
    rng = np.random.default_rng(seed)
    return {k: (v * 10 if v.ndim > 1 else v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in st.items() if k.startswith("vit.")}


def pictures(tmp_path, n: int, tags_of) -> str:
    """n drawn one-object pictures, their masks (the object: 1, its first tag) and their tags.json under tmp_path;
    tags_of(colour, shape) -> tags."""
    os.makedirs(tmp_path / "images", exist_ok=True)
    os.makedirs(tmp_path / "masks", exist_ok=True)
    items = []
    for i in range(n):
        scene, im = S.one_object_scene(70_500_000 + i)
        im.save(tmp_path / "images" / f"{i}.png")
        S.region_map(scene, [1]).save(tmp_path / "masks" / f"{i}.png")
        o = scene.objects[0]
        items.append({"image": f"images/{i}.png", "tags": tags_of(o.colour, o.shape), "mask": f"masks/{i}.png"})
    with open(tmp_path / "tags.json", "w") as f:
        json.dump(items, f)
    return str(tmp_path / "tags.json")


def checkpoint(tmp_path, cfg: dict) -> str:
    d = tmp_path / "init"
    os.makedirs(d, exist_ok=True)
    state = T.init_state(0, config=cfg)
    write_safetensors(str(d / "model.safetensors"), {k: ("F32", v) for k, v in state.items()})
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    return str(d)


@pytest.mark.parametrize("single,dense,colour", [(True, 0.0, 0.0), (False, 0.0, 0.0), (True, 0.7, 0.0),
                                                 (True, 0.0, 0.6)],
                         ids=["one-tag-softmax", "several-tags-bce", "one-tag-plus-per-patch", "one-tag-plus-colour"])
def test_loss_and_gradients_equal_the_pytorch_reference(tmp_path, single, dense, colour):
    cfg = tiny_config()
    vc = IXCConfig.from_dict(cfg).vision
    n = 6 if dense else 3  # at 112 px only pictures 4 and 5 have an object over half a patch
    data = pictures(tmp_path, n, (lambda c, s: [s]) if single else (lambda c, s: [s, c, f"{c} {s}"]))
    images, tags, vocab, masks = W.read_tags(data)
    y = W.targets(tags, vocab)
    views = np.stack([W.square_view(p, SIDE) for p in images])
    labels = W.patch_labels(images, masks, tags, vocab, SIDE, 28)
    state = tower_state(cfg)
    net = W.WarmupNet(vc, len(vocab), single, seed=5, dense=dense, colour=colour)
    params = {W.PREFIX + p.name[len("tower."):]: p for p in net.tower.get_parameters()}
    for k, p in params.items():
        p.set_data(ms.Tensor(state[k]))
    params = {k: p for k, p in params.items() if ".post_layernorm." not in k}  # unused, as in chat
    net.head_w.set_data(ms.Tensor(net.head_w.asnumpy() * 50))  # a head that matters
    if dense:
        net.dense_w.set_data(ms.Tensor(net.dense_w.asnumpy() * 50))
    if colour:
        net.colour_w.set_data(ms.Tensor(net.colour_w.asnumpy() * 50))
    names = list(params) + [p.name for p in net.heads()]
    loss, grads = ms.value_and_grad(net, None, list(params.values()) + net.heads())(
        ms.Tensor(W.pixels(views)), ms.Tensor(y), ms.Tensor(labels))

    ref = VisionReference(state, cfg["vision_config"])
    w = {k: t.requires_grad_() for k, t in ref.w.items()}
    hw = torch.from_numpy(net.head_w.asnumpy()).requires_grad_()
    hb = torch.zeros(len(vocab), requires_grad=True)
    x = torch.cat([normalize_rgb(v) for v in views])
    assert_close(W.pixels(views), x, name="pixels")
    f = ref.tower(x)
    z = f.max(1).values @ hw.T + hb
    t = torch.from_numpy(y)
    ref_loss = F.cross_entropy(z, t.argmax(1)) if single else F.binary_cross_entropy_with_logits(z, t)
    ref_grads = {}
    if dense:  # every patch: its object's tag where the object covers over half of it, else the background class
        lab = torch.from_numpy(labels.astype(np.int64))
        assert (lab < len(vocab)).any() and (lab == len(vocab)).any()
        dw = torch.from_numpy(net.dense_w.asnumpy()).requires_grad_()
        db = torch.zeros(len(vocab) + 1, requires_grad=True)
        per = F.cross_entropy((f @ dw.T + db).flatten(0, 1), lab.flatten(), reduction="none")
        on = (lab.flatten() < len(vocab)).float()
        ref_loss = ref_loss + dense * (0.5 * (per * on).sum() / on.sum() + 0.5 * (per * (1 - on)).sum() / (1 - on).sum())
        ref_grads = {"dense.weight": dw, "dense.bias": db}
    if colour:  # every patch's features -> its mean normalised RGB, squared error averaged over patches and channels
        cw = torch.from_numpy(net.colour_w.asnumpy()).requires_grad_()
        cb = torch.zeros(3, requires_grad=True)
        g = SIDE // 28
        rgb = torch.stack([x[:, :, i * 28:(i + 1) * 28, j * 28:(j + 1) * 28].mean((2, 3))
                           for i in range(g) for j in range(g)], 1)  # (B, P, 3), row by row
        ref_loss = ref_loss + colour * F.mse_loss(f @ cw.T + cb, rgb)
        ref_grads.update({"colour.weight": cw, "colour.bias": cb})  # beside the per-patch heads' when both are on
    ref_loss.backward()
    assert_close(loss, ref_loss.detach(), name="loss")
    ref_grads = {**{k: w[k].grad for k in params}, "head.weight": hw.grad, "head.bias": hb.grad,
                 **{k: v.grad for k, v in ref_grads.items()}}
    top = max(float(g.abs().max()) for g in ref_grads.values())
    for n, g in zip(names, grads):
        if n.endswith("class_embedding"):  # the CLS row is dropped before the max: reaches it only through attention
            assert float(np.abs(g.asnumpy()).max()) > 0
        if float(ref_grads[n].abs().max()) < 1e-3 * top:  # sums that cancel (a key bias: exactly 0 but rounding)
            np.testing.assert_allclose(g.asnumpy(), ref_grads[n].numpy(), rtol=0, atol=1e-6 * top, err_msg=n)
        else:
            assert_close(g, ref_grads[n], name=n)


def test_killed_run_resumes_to_the_same_weights_and_only_the_tower_changes(tmp_path, monkeypatch):
    cfg = tiny_config()
    data = pictures(tmp_path, 8, lambda c, s: [s])
    init = checkpoint(tmp_path, cfg)
    kw = dict(steps=4, batch=2, lr=1e-3, warmup=1, save_steps=2, use_jit=False, log=lambda *_: None)
    W.warm_up(init, data, str(tmp_path / "straight"), **kw)

    draw = W.batch_indices

    def killed_at_3(n, batch, seed, step):
        if step == 3:
            raise KeyboardInterrupt
        return draw(n, batch, seed, step)

    monkeypatch.setattr(W, "batch_indices", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        W.warm_up(init, data, str(tmp_path / "resumed"), **kw)
    assert os.path.exists(str(tmp_path / "resumed") + ".resume.safetensors")
    assert not os.path.exists(tmp_path / "resumed")
    monkeypatch.setattr(W, "batch_indices", draw)
    lines = []
    W.warm_up(init, data, str(tmp_path / "resumed"), **{**kw, "log": lines.append})
    assert any("resuming at step 2" in x for x in lines)
    assert not os.path.exists(str(tmp_path / "resumed") + ".resume.safetensors")

    a, b, s0 = (load_state_dict(str(tmp_path / d)) for d in ("straight", "resumed", "init"))
    assert sorted(a) == sorted(s0)
    moved = [k for k in s0 if not np.array_equal(a[k], s0[k])]
    assert moved and all(k.startswith("vit.") for k in moved)
    assert len(moved) >= 0.9 * sum(k.startswith("vit.") for k in s0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_head_steps_hold_the_tower_while_the_fresh_heads_fit(tmp_path):
    """--head_steps N: the first N steps update the heads only, so N = all steps leaves the tower bit for bit as it
    was (through the CLI), and N = 2 of 4 moves it, not as a run with every step on the tower moves it."""
    cfg = tiny_config()
    data = pictures(tmp_path, 8, lambda c, s: [s])
    init = checkpoint(tmp_path, cfg)
    s0 = load_state_dict(init)
    assert W.main(["--model", init, "--data", data, "--output_dir", str(tmp_path / "held"), "--steps", "4", "--batch",
                   "2", "--warmup", "1", "--head_steps", "4", "--no_jit"]) == 0
    held = load_state_dict(str(tmp_path / "held"))
    assert all(np.array_equal(held[k], s0[k]) for k in s0)
    kw = dict(steps=4, batch=2, lr=1e-3, warmup=1, use_jit=False, log=lambda *_: None)
    W.warm_up(init, data, str(tmp_path / "all"), **kw)
    W.warm_up(init, data, str(tmp_path / "late"), head_steps=2, **kw)
    a, b = load_state_dict(str(tmp_path / "all")), load_state_dict(str(tmp_path / "late"))
    moved = [k for k in s0 if not np.array_equal(b[k], s0[k])]
    assert moved and all(k.startswith("vit.vision_tower.") for k in moved)
    assert any(not np.allclose(a[k], b[k]) for k in moved)


def test_the_warmed_tower_learns_colour(tmp_path):
    """Trains at toy size: the max-pooled head must tell six colours apart on its training pictures."""
    cfg = tiny_config()
    data = pictures(tmp_path, 24, lambda c, s: [c])
    init = checkpoint(tmp_path, cfg)
    rows = W.warm_up(init, data, str(tmp_path / "warm"), steps=100, batch=8, lr=3e-3, warmup=5, save_steps=1000,
                     use_jit=True, eval_data=data, log=lambda *_: None)
    first = W.warm_up(init, data, str(tmp_path / "one"), steps=1, batch=8, lr=0.0, warmup=0, save_steps=1000,
                      use_jit=True, log=lambda *_: None)[0]["loss"]
    assert rows[-1]["loss"] < 0.3 * first and rows[-2]["loss"] < 0.6 * first, (first, rows)
    assert rows[-1]["accuracy"] >= 0.9, rows  # its training pictures, six colours: chance 1/6


def test_a_truncated_picture_or_a_missing_model_stops_in_one_line(tmp_path):
    """A picture whose header reads but whose pixels are cut off is found when its step draws it, and named (file,
    item, field); a --model directory that does not exist is named too: exit 2, one line, no traceback."""
    data = pictures(tmp_path, 1, lambda c, s: [s])
    png = (tmp_path / "images" / "0.png").read_bytes()
    (tmp_path / "images" / "0.png").write_bytes(png[:200])  # the IHDR header whole, the pixels cut
    cfg = tiny_config()
    init = checkpoint(tmp_path, cfg)
    cut = f"item 0: field 'image': {str(tmp_path / 'images' / '0.png')!r}: cannot decode"
    for model, says in ((init, cut), (str(tmp_path / "never-made"), "never-made")):
        r = subprocess.run([sys.executable, "-m", "ixc25_ms.train.tower_warmup", "--model", model, "--data", data,
                            "--output_dir", str(tmp_path / "out"), "--steps", "1", "--batch", "1", "--no_jit"],
                           capture_output=True, text=True, cwd=REPO)
        err = "\n".join(ln for ln in r.stderr.strip().splitlines() if "WARNING" not in ln)
        assert r.returncode == 2 and err.count("\n") == 0 and says in err, err


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch", "-2"), ("--lr", "-1e-3"), ("--lr", "nan"),
                                         ("--warmup", "-1"), ("--weight_decay", "inf"), ("--save_steps", "0"),
                                         ("--head_steps", "1.5"), ("--dense", "-.5"), ("--colour", "nan"),
                                         ("--seed", "-1")])
def test_numbers_out_of_range_refused_at_parsing(capsys, flag, value):
    """Counts, sizes, rates and loss weights out of range end the run at parsing in one line naming the flag and
    the value (negatives in any notation, -1e-3 included), before the model or the data is read: the model and the
    data named here do not exist."""
    with pytest.raises(SystemExit) as e:
        W.main(["--model", "/nonexistent/m", "--data", "/nonexistent/t.json", "--output_dir", "/nonexistent/o",
                flag, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("ixc25-tower-warmup: error:"), err
    assert flag in err and repr(value) in err and "nonexistent" not in err, err


@pytest.mark.parametrize("items, field", [
    ("not json", "not JSON"),
    ([{"image": "images/0.png"}], "item 0: field 'tags'"),
    ([{"image": "images/0.png", "tags": ["circle"]}, {"image": "nowhere.png", "tags": ["square"]}],
     "item 1: field 'image': no file"),
    ([{"image": 3, "tags": ["circle"]}], "item 0: field 'image'"),
    ([{"image": "images/0.png", "tags": ["circle"], "mask": "nowhere.png"}], "item 0: field 'mask': no file"),
    ([{"image": "images/0.png", "tags": ["circle"]}, {"image": "fake.png", "tags": ["square"]}],
     "item 1: field 'image': 'fake.png': not a readable picture"),
    ([{"image": "images/0.png", "tags": ["circle"], "mask": "fake.png"}], "item 0: field 'mask': 'fake.png': not a readable"),
])
def test_bad_tag_data_stops_in_one_line(tmp_path, items, field):
    pictures(tmp_path, 1, lambda c, s: [s])
    (tmp_path / "fake.png").write_bytes(b"not a png")
    bad = tmp_path / "bad.json"
    bad.write_text(items if isinstance(items, str) else json.dumps(items))
    with pytest.raises(W.TagDataError, match=field):
        W.read_tags(str(bad))
    r = subprocess.run([sys.executable, "-m", "ixc25_ms.train.tower_warmup", "--model", str(tmp_path), "--data",
                        str(bad), "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and str(bad) in r.stderr and field in r.stderr, r.stderr


@pytest.mark.parametrize("case, field", [
    ("small", "item 1: field 'mask': 10x10, the image is"),
    ("value", "item 1: field 'mask': value 3, the item has 1 tags"),
    ("none", "item 1: field 'mask' is needed"),
    ("rgb", "item 1: field 'mask': a mask has one channel"),
])
def test_bad_masks_stop_in_one_line(tmp_path, case, field):
    """A mask of another size, one naming a tag the item lacks, one of three channels, or none under --dense: one
    line naming the item."""
    data = pictures(tmp_path, 2, lambda c, s: [s])
    items = json.loads(open(data).read())
    if case == "small":
        Image.new("L", (10, 10), 0).save(tmp_path / "masks" / "small.png")
        items[1]["mask"] = "masks/small.png"
    elif case == "value":
        m = np.asarray(Image.open(tmp_path / "masks" / "1.png")).copy()
        m[m > 0] = 3
        Image.fromarray(m).save(tmp_path / "masks" / "1.png")
    elif case == "rgb":
        Image.open(tmp_path / "masks" / "1.png").convert("RGB").save(tmp_path / "masks" / "1.png")
    else:
        del items[1]["mask"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(items))
    init = checkpoint(tmp_path, tiny_config())
    r = subprocess.run([sys.executable, "-m", "ixc25_ms.train.tower_warmup", "--model", init, "--data", str(bad),
                        "--output_dir", str(tmp_path / "out"), "--dense", "1", "--no_jit"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and str(bad) in r.stderr and field in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_patch_share_counts_each_patch_in_token_order():
    """patch_share: a hand-set mask of 3 x 2 patches of 4 px (plus a ragged edge it drops) -> each patch's set
    share, row-major as the tower orders its tokens; a batch dimension is kept."""
    m = np.zeros((13, 9), bool)  # 3 rows x 2 columns of whole 4-px patches; row 12 and column 8 are dropped
    m[0:4, 4:8] = True           # token 1 (row 0, column 1): all 16 pixels
    m[8:10, 0:4] = True          # token 4 (row 2, column 0): 8 of 16
    m[5, 1] = True               # token 2 (row 1, column 0): 1 of 16
    m[12, :] = m[:, 8] = True    # past the last whole patch: ignored
    assert W.patch_share(m, 4).tolist() == [0.0, 1.0, 1 / 16, 0.0, 0.5, 0.0]
    assert W.patch_share(np.stack([m, ~m]), 4)[1].tolist() == [1.0, 0.0, 15 / 16, 1.0, 0.5, 1.0]


def test_recipe_tower_pictures_are_tagged_with_their_drawn_shape(tmp_path):
    """train_default's warm-up data: each picture's tag is the shape drawn from its seed, readable by read_tags;
    "pair" tags it "colour shape", "both" with the colour and the shape as two tags, its mask marking the shape."""
    tags_json = T.tower_pictures(str(tmp_path), 6, 70_600_000)
    images, tags, vocab, masks = W.read_tags(tags_json)
    assert len(images) == 6 and set(vocab) <= set(S.SHAPES)
    pair = W.read_tags(T.tower_pictures(str(tmp_path / "pair"), 6, 70_600_000, "pair"))
    both = W.read_tags(T.tower_pictures(str(tmp_path / "both"), 6, 70_600_000, "both"))
    for j, (path, t) in enumerate(zip(images, tags)):
        im, colour, shape = S.one_object_picture(70_600_000 + j)
        colour, shape = list(S.COLOURS)[colour], S.SHAPES[shape]
        assert t == [shape] and pair[1][j] == [f"{colour} {shape}"] and sorted(both[1][j]) == sorted([colour, shape])
        assert np.array_equal(np.asarray(Image.open(masks[j])), np.asarray(Image.open(pair[3][j])))
        with Image.open(path) as saved:
            assert saved.size == im.size and np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(im))
        m = np.asarray(Image.open(both[3][j]))  # the object's pixels carry 1 + the index of its shape tag
        assert set(np.unique(m)) == {0, 1 + both[1][j].index(shape)}
        with Image.open(both[0][j]) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(im))
    labels = W.patch_labels(*[both[k] for k in (0, 3, 1, 2)], 560, 28)  # images, masks, tags, vocab
    shapes = [both[2].index(next(x for x in t if x in S.SHAPES)) for t in both[1]]
    for row, k in zip(labels, shapes):  # each picture's patches: its shape or the background, never its colour
        assert set(np.unique(row)) <= {k, len(both[2])}
    assert (labels < len(both[2])).sum() >= 6


def test_recipe_pair_tags_name_every_drawn_object(tmp_path):
    """--tower_tags pairs: 1-4 objects a picture, tagged with exactly the (colour, shape) pairs drawn from its seed
    (a repeated pair once), and the pixels are that scene's rendering."""
    tags_json = T.tower_pictures(str(tmp_path), 8, 70_700_000, "pairs")
    images, tags, vocab, masks = W.read_tags(tags_json)
    assert set(vocab) <= {f"{c} {s}" for c in S.COLOURS for s in S.SHAPES}
    sizes = set()
    for j, (path, t) in enumerate(zip(images, tags)):
        rng = np.random.default_rng(70_700_000 + j)
        scene = S.random_scene(rng)
        im = S.render(scene, rng)
        assert sorted(t) == sorted({f"{o.colour} {o.shape}" for o in scene.objects}) and len(t) == len(set(t))
        sizes.add(len(scene.objects))
        with Image.open(path) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(im))
        top = scene.objects[-1]  # drawn last, so nothing covers its centre
        m = np.asarray(Image.open(masks[j]))
        assert m.shape == (scene.height, scene.width) and m.max() <= len(t)
        assert m[int(top.cy), int(top.cx)] == 1 + t.index(f"{top.colour} {top.shape}")
    labels = W.patch_labels(images, masks, tags, vocab, 560, 28)
    assert labels.shape == (8, 400) and (labels < len(vocab)).sum() > 8 and (labels == len(vocab)).sum() > 8 * 200
    assert len(sizes) > 1  # several object counts among 8 pictures
    with pytest.raises(ValueError, match="tower tags"):
        T.tower_pictures(str(tmp_path / "x"), 1, 0, "colour")


def test_recipe_tower_stages_end_with_colour_shape_pairs(tmp_path, monkeypatch):
    """train_default's tower stages: --tower_warmup (max head) -> init_warm, --tower_dense -> init_dense, then
    --tower_pair -> init_pair, trained on fresh one-object pictures (their own seed range) tagged with the drawn
    "colour shape"; each stage moves the ViT's tower and nothing else; a rerun trains nothing and draws no picture;
    --tower_pair after a warm-up of other tags, or without one, stops at argument parsing."""
    work = str(tmp_path)
    T.init_checkpoint(os.path.join(work, "init"), 0)
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "m"), "--tower_warmup", "2",
                                  "--tower_dense", "2", "--tower_pair", "2", "--tower_pictures", "8", "--tower_scenes", "0"])
    assert T.tower_stages(args) == "init_pair"
    images, tags, _, _ = W.read_tags(os.path.join(work, "tower_pair", "tags.json"))
    assert len(images) == 8
    for j, (path, t) in enumerate(zip(images, tags)):
        im, colour, shape = S.one_object_picture(T.TRAIN_SEED_BASE + T.PAIR_SEED_OFFSET + j)
        assert t == [f"{list(S.COLOURS)[colour]} {S.SHAPES[shape]}"]
        with Image.open(path) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(im))
    states = [load_state_dict(os.path.join(work, d)) for d in ("init", "init_warm", "init_dense", "init_pair")]
    for before, after in zip(states, states[1:]):  # two steps each: a warm-up's first step has rate 0
        moved = {k for k in before if not np.array_equal(before[k], after[k])}
        assert moved and all(k.startswith("vit.vision_tower.") for k in moved), sorted(moved)

    def refuse(*a, **k):
        raise AssertionError("a finished tower stage was trained again, or its pictures drawn again")
    monkeypatch.setattr(W, "warm_up", refuse)
    monkeypatch.setattr(T, "tower_pictures", refuse)
    assert T.tower_stages(args) == "init_pair"
    for argv, words in ((["--tower_warmup", "0", "--tower_dense", "0", "--tower_pair", "2"], "continues a --tower_warmup"),
                        (["--tower_warmup", "2", "--tower_pair", "2", "--tower_tags", "pair"], "needs --tower_tags shape")):
        with pytest.raises(SystemExit):
            T.main(argv + ["--work", os.path.join(work, "x"), "--out", os.path.join(work, "m")])
        assert not os.path.exists(os.path.join(work, "x"))


def test_recipe_tower_colour_reaches_every_tower_stage(tmp_path, monkeypatch):
    """train_default --tower_colour W: each tower stage's warm_up gets colour=W (the per-patch colour regression,
    whose loss and gradients the parity test above checks); without the flag, the shipped recipe's 0.25."""
    import shutil
    calls = []

    def record(model, data, out, **kw):
        calls.append((os.path.basename(out), kw["colour"], kw["dense"]))
        shutil.copytree(model, out)
    monkeypatch.setattr(W, "warm_up", record)
    T.init_checkpoint(str(tmp_path / "init"), 0)
    for flag, want in ((["--tower_colour", "0.5"], 0.5), (["--tower_colour", "0"], 0.0), ([], 0.25)):
        work = str(tmp_path / f"w{len(calls)}")
        shutil.copytree(str(tmp_path / "init"), os.path.join(work, "init"))
        args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "m"), "--tower_warmup", "2",
                                      "--tower_dense", "2", "--tower_pictures", "4", "--tower_scenes", "0"] + flag)
        assert T.tower_stages(args) == "init_dense"
        assert calls[-2:] == [("init_warm", want, 0.0), ("init_dense", want, 1.0)]


def test_recipe_scene_tags_give_each_patch_its_own_objects_shape(tmp_path):
    """--tower_scenes' pictures ("shapes"): 1-4 objects a picture, tagged with exactly the shapes drawn from its
    seed; each object's mask value is 1 + the index of its own shape; stored at the view size, so the warm-up's
    square view and per-patch labels are the same as the full-size picture's and mask's would give."""
    tags_json = T.tower_pictures(str(tmp_path), 8, 70_800_000, "shapes")
    images, tags, vocab, masks = W.read_tags(tags_json)
    assert set(vocab) <= set(S.SHAPES)
    sizes, mixed = set(), 0
    for j, (path, t, mask) in enumerate(zip(images, tags, masks)):
        rng = np.random.default_rng(70_800_000 + j)
        scene = S.random_scene(rng)
        im = S.render(scene, rng)
        assert sorted(t) == sorted({o.shape for o in scene.objects}) and len(t) == len(set(t))
        sizes.add(len(scene.objects))
        mixed += len(t) > 1
        full = np.asarray(S.region_map(scene, [1 + t.index(o.shape) for o in scene.objects]))
        with Image.open(path) as saved:
            assert max(saved.size) == min(560, max(im.size))
            assert np.array_equal(W.square_view(saved, 560), W.square_view(im, 560))
        assert np.array_equal(W.mask_view(np.asarray(Image.open(mask)), 560), W.mask_view(full, 560))
    labels = W.patch_labels(images, masks, tags, vocab, 560, 28)
    for row, t in zip(labels, tags):  # a patch is labelled with a shape its picture shows, or the background
        assert set(np.unique(row)) <= {vocab.index(x) for x in t} | {len(vocab)}
    assert len(sizes) > 1 and mixed >= 1
    assert any(len(set(np.unique(row)) - {len(vocab)}) > 1 for row in labels)  # two shapes' patches in one picture


def test_recipe_centre_tags_mark_one_patch_per_object_where_its_centre_lies(tmp_path):
    """--tower_scene_tags centres: the scenes of "shapes" (the same seeds, the same pixels in the warm-up's square
    view), each object's region still its shape's, and the one patch of the view's 20 x 20 grid that holds the
    object's centre (the centre scaled and placed as square_view places the picture, computed here from the scene)
    labelled "{shape} centre": per picture, the centre patches of a shape number its count (objects whose centre
    patches coincide or whose centre patch a later object covers are left out of the count here; the edge of the
    picture cuts none of these); no centre label elsewhere."""
    n, seed = 24, 70_810_000
    shapes_json = T.tower_pictures(str(tmp_path / "s"), n, seed, "shapes")
    tags_json = T.tower_pictures(str(tmp_path / "c"), n, seed, "centres")
    images, tags, vocab, masks = W.read_tags(tags_json)
    assert set(vocab) <= set(S.SHAPES) | {f"{x} centre" for x in S.SHAPES}
    labels = W.patch_labels(images, masks, tags, vocab, 560, 28)
    s_images, s_tags, sv, s_masks = W.read_tags(shapes_json)
    plain = W.patch_labels(s_images, s_masks, s_tags, sv, 560, 28)
    checked = 0
    for j, (path, t, row) in enumerate(zip(images, tags, labels)):
        rng = np.random.default_rng(seed + j)
        scene = S.random_scene(rng)
        im = S.render(scene, rng)
        assert sorted(t) == sorted({o.shape for o in scene.objects} | {f"{o.shape} centre" for o in scene.objects})
        with Image.open(path) as saved:  # stored at the view's scale: the same square view as the drawn picture
            assert np.array_equal(W.square_view(saved, 560), W.square_view(im, 560))
        s_ = 560 / max(scene.width, scene.height)
        w, h = round(scene.width * s_), round(scene.height * s_)
        cells = [int((o.cy * h / scene.height + (560 - h) // 2) // 28) * 20 +
                 int((o.cx * w / scene.width + (560 - w) // 2) // 28) for o in scene.objects]
        for k, o in enumerate(scene.objects):  # each centre patch holds its object's centre label, unless covered
            later = cells[k] in cells[k + 1:]
            if not later:
                assert vocab[row[cells[k]]] == f"{o.shape} centre", (j, k)
        centre = {i for i, v in enumerate(row) if v < len(vocab) and vocab[v].endswith("centre")}
        assert centre == set(cells), j
        if len(set(cells)) == len(cells):
            for x in S.SHAPES:
                assert sum(vocab[row[i]] == f"{x} centre" for i in centre) == scene.count(x)
            checked += 1
        # off the centre patches the labels are those of "shapes"
        others = [i for i in range(400) if i not in centre]
        assert [vocab[row[i]] if row[i] < len(vocab) else None for i in others] == \
            [sv[plain[j][i]] if plain[j][i] < len(sv) else None for i in others]
    assert checked >= 20 and any(len(scene_tags) > 2 for scene_tags in tags)


def test_recipe_scene_stage_follows_the_shape_warmup(tmp_path, monkeypatch):
    """--tower_scenes N: after init_dense, N steps of warm_up (per-patch loss on, lr 5e-4) on fresh scene pictures
    (SCENE_SEED_OFFSET) -> init_scenes; without a --tower_warmup it stops at argument parsing; --tower_scene_tags
    centres tags the same scenes' centres too, and without --tower_scenes stops at parsing."""
    import shutil
    calls = []

    def record(model, data, out, **kw):
        calls.append((os.path.basename(model), os.path.basename(out), kw["steps"], kw["dense"], kw["lr"],
                      os.path.basename(os.path.dirname(data))))
        shutil.copytree(model, out)
    monkeypatch.setattr(W, "warm_up", record)
    work = str(tmp_path)
    T.init_checkpoint(os.path.join(work, "init"), 0)
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "m"), "--tower_warmup", "2",
                                  "--tower_dense", "2", "--tower_scenes", "3", "--tower_pictures", "4"])
    assert T.tower_stages(args) == "init_scenes"
    assert calls[-1] == ("init_dense", "init_scenes", 3, 1.0, 5e-4, "tower_scenes")
    images, tags, _, _ = W.read_tags(os.path.join(work, "tower_scenes", "tags.json"))
    rng = np.random.default_rng(T.TRAIN_SEED_BASE + T.SCENE_SEED_OFFSET + 1)
    assert len(images) == 4 and sorted(tags[1]) == sorted({o.shape for o in S.random_scene(rng).objects})
    with pytest.raises(SystemExit):
        T.main(["--tower_warmup", "0", "--tower_dense", "0", "--tower_scenes", "2", "--work",
                os.path.join(work, "x"), "--out", os.path.join(work, "m")])
    assert not os.path.exists(os.path.join(work, "x"))
    # --tower_scene_tags centres: the same stage on the same scenes, each object's centre patch tagged too
    shutil.rmtree(os.path.join(work, "init_scenes"))
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "m"), "--tower_warmup", "2",
                                  "--tower_dense", "2", "--tower_scenes", "3", "--tower_pictures", "4",
                                  "--tower_scene_tags", "centres"])
    assert T.tower_stages(args) == "init_scenes"
    assert calls[-1] == ("init_dense", "init_scenes", 3, 1.0, 5e-4, "tower_scenes")
    _, centre_tags, _, _ = W.read_tags(os.path.join(work, "tower_scenes", "tags.json"))
    assert sorted(centre_tags[1]) == sorted(set(tags[1]) | {f"{x} centre" for x in tags[1]})
    with pytest.raises(SystemExit):
        T.main(["--tower_scene_tags", "centres", "--tower_scenes", "0", "--work", os.path.join(work, "x"), "--out",
                os.path.join(work, "m")])
    assert not os.path.exists(os.path.join(work, "x"))
