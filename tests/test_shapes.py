"""The drawn-shapes task of the default model: its pictures, its answer checker, and the training conversations."""
import math

import numpy as np

from ixc25_ms import shapes as S
from scripts import default_data as D
from scripts import train_default as T


def test_scenes_follow_the_task():
    """1-4 objects, 200-1200 px a side, aspect ratio within 3:1, objects inside the canvas and apart."""
    seen_n = set()
    for seed in range(300):
        sc = S.random_scene(np.random.default_rng(seed))
        assert 200 <= sc.width <= 1200 and 200 <= sc.height <= 1200
        assert 1 / 3 <= sc.width / sc.height <= 3
        assert 1 <= len(sc.objects) <= 4
        seen_n.add(len(sc.objects))
        for i, o in enumerate(sc.objects):
            assert o.shape in S.SHAPES and o.colour in S.COLOURS
            assert o.size < o.cx < sc.width - o.size and o.size < o.cy < sc.height - o.size
            for p in sc.objects[i + 1:]:
                assert math.hypot(o.cx - p.cx, o.cy - p.cy) > o.size + p.size
    assert seen_n == {1, 2, 3, 4}
    small = S.random_scene(np.random.default_rng(1), 2, (200, 560))
    assert max(small.width, small.height) <= 560 and len(small.objects) == 2


def test_checker_by_hand():
    assert S.is_correct(1, "circle", "The circle is red.", "It is red.")
    assert not S.is_correct(1, "circle", "The circle is red.", "The circle is red or blue.")
    assert S.is_correct(2, "square", "There are 2 squares.", "2")
    assert not S.is_correct(2, "square", "There are 2 squares.", "There are 2 squares and 1 circle.")
    assert not S.is_correct(2, "square", "There are 0 squares.", "There are no squares.")  # a digit is asked for
    assert S.is_correct(3, "blue", "The blue one is a triangle.", "A triangle.")
    assert not S.is_correct(3, "blue", "The blue one is a triangle.", "A square or a triangle.")
    want = "A red circle and two blue squares."
    assert S.is_correct(4, "", want, "Two blue squares and a red circle.")
    assert not S.is_correct(4, "", want, "A red circle and a blue square.")
    assert not S.is_correct(4, "", want, "A red circle, two blue squares and a green triangle.")
    # the questions in their exact words, wherever the official format's image placeholder sits
    assert S.question_type("What colour is the circle?") == (1, "circle")
    assert S.question_type("<ImageHere>How many squares are there?") == (2, "square")
    assert S.question_type("What shape is the orange one?<ImageHere>") == (3, "orange")
    assert S.question_type("<ImageHere>\nDescribe the image.") == (4, "")
    assert S.question_type("What colour is the circle") is None and S.question_type("Describe the picture.") is None


def test_described_as_drawn():
    sc = S.Scene(600, 400, [S.Obj("square", "blue", 100, 100, 40), S.Obj("circle", "red", 300, 200, 40),
                            S.Obj("square", "blue", 500, 300, 40)])
    assert S.describe(sc) == "A red circle and two blue squares."
    assert S.answer(sc, 2, "triangle") == "There are 0 triangles."
    assert S.answer(sc, 3, "red") == "The red one is a circle."
    assert (3, "blue") not in S.valid_questions(sc) and (1, "square") not in S.valid_questions(sc)


def test_training_turns_never_give_an_answer_away():
    """grounded_turns: no question whose answer an earlier turn stated — never both the colour of an object
    (asked by its shape) and its shape (asked by its colour); the description, when asked, comes last; every
    question valid for the scene; all three counts asked."""
    for seed in range(400):
        rng = np.random.default_rng(seed)
        sc = S.random_scene(rng)
        turns = D.grounded_turns(sc, rng)
        valid = set(S.valid_questions(sc))
        assert all(t in valid for t in turns) and len(set(turns)) == len(turns)
        assert sorted(s for t, s in turns if t == 2) == sorted(S.SHAPES)
        if (4, "") in turns:
            assert turns[-1] == (4, "")
        objects = []
        for t, s in turns:
            if t == 1:
                objects.append(next(i for i, o in enumerate(sc.objects) if o.shape == s))
            elif t == 3:
                objects.append(next(i for i, o in enumerate(sc.objects) if o.colour == s))
        assert len(objects) == len(set(objects)), (seed, turns)


def test_seed_ranges_of_training_and_evaluation_are_disjoint():
    seeds = T.TRAIN_SEED_BASE + 4 * 1_000_000 + T.EASY_SEED_OFFSET + 1_000_000  # seed 4, a million easy pictures
    assert seeds <= T.EVAL_SEED_BASE


def test_curriculum_pictures_ask_only_the_chosen_kinds(tmp_path):
    """make_pictures with easy_objects=(1, 1) and easy_kinds=(3,): every easy picture holds one object and its
    one question is "What shape is the {colour} one?" with that object's colour, answered with its shape; the
    stored image is the size its scene says. Without the options a picture gets 1-2 objects and mixed kinds."""
    import json
    import os
    from PIL import Image
    p = T.make_pictures(str(tmp_path / "c"), 0, 40_000_000, turns=(1, 1), chitchat=0.0, easy=12,
                        easy_objects=(1, 1), easy_kinds=(3,), log=None)
    items = json.load(open(p))
    assert len(items) == 12
    for it in items:
        seed = int(it["id"].split("-")[1])
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng, int(rng.integers(1, 2)), (200, 560))
        assert len(scene.objects) == 1
        (q, a) = [c["value"] for c in it["conversations"]]
        o = scene.objects[0]
        assert q == S.question(3, o.colour) and a == S.answer(scene, 3, o.colour) and o.shape in a
        assert Image.open(os.path.join(os.path.dirname(p), it["image"])).size == (scene.width, scene.height)
    mixed = json.load(open(T.make_pictures(str(tmp_path / "m"), 0, 40_000_000, turns=(2, 2), chitchat=0.0,
                                           easy=30, log=None)))
    kinds = {S.question_type(c["value"])[0] for it in mixed for c in it["conversations"][::2]}
    assert len(kinds) >= 3


def test_read_stage_of_scenes_asks_the_chosen_kinds_of_several_objects(tmp_path):
    """train_default's --read_objects 2-2 --read_kinds 1: the read stage's data holds small two-object scenes, each
    asked "What colour is the {shape}?" about its one object of that shape, answered with that object's colour;
    a scene whose two objects share a shape (no kind-1 question) is drawn again from its seed's generator, so
    each picture is still the one its seed gives. The stage trains from work/init with that data."""
    import json
    import os
    from PIL import Image
    work = str(tmp_path / "w")
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "model"), "--read_stage", "24",
                                  "--read_objects", "2-2", "--read_kinds", "1"])
    seen = []

    def finetune(argv):  # records the call and leaves the run directory the real one writes
        seen.append(argv)
        os.makedirs(argv[argv.index("--output_dir") + 1])
        return 0
    assert T.read_stage(args, "init", finetune) == "init_read" and os.path.isdir(os.path.join(work, "init_read"))
    assert seen[0][:2] == ["--model_name_or_path", os.path.join(work, "init")]
    root = os.path.join(work, "read")
    items = json.load(open(os.path.join(root, "data.json")))
    assert len(items) == 24
    redrawn = 0
    for it in items:
        rng = np.random.default_rng(int(it["id"].split("-")[1]))
        scene = S.random_scene(rng, int(rng.integers(2, 3)), (200, 560))
        while len({o.shape for o in scene.objects}) == 1:
            scene, redrawn = S.random_scene(rng, 2, (200, 560)), redrawn + 1
        (q, a) = [c["value"] for c in it["conversations"]]
        kind, shape = S.question_type(q)
        (o,) = [o for o in scene.objects if o.shape == shape]
        assert kind == 1 and len(scene.objects) == 2 and a == S.answer(scene, 1, shape) and o.colour in a
        w, h = Image.open(os.path.join(root, it["image"])).size
        assert (w, h) == (round(scene.width * T.TRAIN_SCALE), round(scene.height * T.TRAIN_SCALE))
    assert redrawn >= 1  # 1 in 3 two-object scenes share a shape: 24 pictures without a redraw would be ~6e-5


def test_scene_read_stage_is_the_read_stage_of_scenes_after_the_lone_read(tmp_path):
    """train_default's --read_scenes 20: a second read stage from the lone-object read's output (init_read ->
    init_read_scenes) whose data is, picture for picture and turn for turn, the read stage's data under
    --read_objects 1-4 --read_kinds 1,2,3 (how run X was made); every item one question of kinds 1-3 about a small
    scene of 1-4 objects, answered as that scene answers it. Skipped once its output exists."""
    import json
    import os
    work = str(tmp_path / "w")
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "model"), "--read_scenes", "20"])
    seen = []

    def finetune(argv):
        seen.append(argv)
        os.makedirs(argv[argv.index("--output_dir") + 1])
        return 0
    assert T.scene_read_stage(args, "init_read", finetune) == "init_read_scenes"
    assert seen[0][:2] == ["--model_name_or_path", os.path.join(work, "init_read")] and len(seen) == 1
    assert T.scene_read_stage(args, "init_read", finetune) == "init_read_scenes" and len(seen) == 1  # not redone
    root = os.path.join(work, "read_scenes")
    items = json.load(open(os.path.join(root, "data.json")))
    other = str(tmp_path / "x")
    xargs = T.parser().parse_args(["--work", other, "--out", os.path.join(other, "model"), "--read_stage", "20",
                                   "--read_objects", "1-4", "--read_kinds", "1,2,3"])
    T.read_stage(xargs, "init", finetune)
    xroot = os.path.join(other, "read")
    assert items == json.load(open(os.path.join(xroot, "data.json"))) and len(items) == 20
    kinds, sizes = set(), set()
    for it in items:
        rng = np.random.default_rng(int(it["id"].split("-")[1]))
        scene = S.random_scene(rng, int(rng.integers(1, 5)), (200, 560))
        while not any(k in (1, 2, 3) for k, _ in S.valid_questions(scene)):
            scene = S.random_scene(rng, len(scene.objects), (200, 560))
        (q, a) = [c["value"] for c in it["conversations"]]
        kind, subject = S.question_type(q)
        assert kind in (1, 2, 3) and a == S.answer(scene, kind, subject)
        kinds.add(kind)
        sizes.add(len(scene.objects))
        assert open(os.path.join(root, it["image"]), "rb").read() == open(os.path.join(xroot, it["image"]), "rb").read()
    assert 2 in kinds and len(sizes) >= 3


def test_a_reused_work_directory_gets_the_new_pictures(tmp_path):
    """make_pictures into a directory that holds an earlier run's pictures under the same seeds (1-2 objects)
    rewrites them for the new flags (1 object): every stored picture equals the one a fresh directory gets, so
    the conversations never describe other pictures than the stored ones (they once did, silently)."""
    import os
    reused, fresh = str(tmp_path / "reused"), str(tmp_path / "fresh")
    T.make_pictures(reused, 0, 40_000_000, turns=(1, 1), chitchat=0.0, easy=6, easy_objects=(2, 2), log=None)
    before = {f: open(os.path.join(reused, "images", f), "rb").read() for f in os.listdir(os.path.join(reused, "images"))}
    for root in (reused, fresh):
        T.make_pictures(root, 0, 40_000_000, turns=(1, 1), chitchat=0.0, easy=6, easy_objects=(1, 1), log=None)
    names = sorted(os.listdir(os.path.join(fresh, "images")))
    assert names == sorted(os.listdir(os.path.join(reused, "images"))) == sorted(before)
    after = {f: open(os.path.join(reused, "images", f), "rb").read() for f in names}
    assert after == {f: open(os.path.join(fresh, "images", f), "rb").read() for f in names}
    assert all(after[f] != before[f] for f in names)


def test_count_flags_refuse_bad_input_in_one_line(capsys):
    """train_default's --questions/--easy_objects/--easy_kinds/--read_objects/--read_kinds: read as spans and kinds
    (1-4 objects); its counts, sizes, rates and shares as numbers in range (no -5 scenes, no batch of 0, no NaN
    rate); bad values end the run at argument parsing with the flag and the value named, before any picture is
    drawn. Widths that the heads of 32 channels do not divide are refused too."""
    import pytest
    assert T.span("1-2") == (1, 2) and T.span("3") == (3, 3) and T.kinds("") == () and T.kinds("1,3") == (1, 3)
    for argv, flag in ((["--easy_objects", "2-1"], "--easy_objects"), (["--easy_kinds", "5"], "--easy_kinds"),
                       (["--questions", "3-x"], "--questions"), (["--read_objects", "0-2"], "--read_objects"),
                       (["--read_objects", "2-5"], "--read_objects"), (["--read_kinds", "1,x"], "--read_kinds"),
                       (["--read_scenes", "-5"], "--read_scenes"), (["--read_stage", "-1"], "--read_stage"),
                       (["--easy", "-800"], "--easy"), (["--pictures", "4k"], "--pictures"),
                       (["--tower_dense", "2.5"], "--tower_dense"), (["--batch", "0"], "--batch"),
                       (["--keep", "-1"], "--keep"), (["--lr", "0"], "--lr"), (["--epochs", "nan"], "--epochs"),
                       (["--chitchat", "-0.1"], "--chitchat"), (["--tower_colour", "inf"], "--tower_colour"),
                       (["--fix_vit", "2"], "--fix_vit"), (["--lr", "-1e-4"], "--lr"),
                       (["--tower_colour", "-.5"], "--tower_colour")):
        with pytest.raises(SystemExit):
            T.main(argv + ["--work", "/nonexistent/never-made"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in err and argv[1] in err, err
    assert T.count("0") == 0 and T.positive("3") == 3 and T.share("0.25") == 0.25 and T.above_zero("1e-3") == 1e-3
    for argv in (["--vit_width", "100"], ["--llm_width", "96"]):
        with pytest.raises(SystemExit):
            T.main(argv + ["--work", "/nonexistent/never-made", "--out", "/nonexistent/m"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert argv[0] in err and argv[1] in err, err


def test_a_changed_recipe_must_name_its_out(capsys, tmp_path):
    """train_default writes into the package's shipped model unless --out says otherwise: a run whose flags
    change the weights (a pilot) and keep that default stops at argument parsing, naming the flag, before any
    picture is drawn or any file written; the shipped recipe's own flags pass the check."""
    import os
    import pytest
    before = sorted(os.listdir(T.PACKAGE_DIR))
    work = tmp_path / "work"
    for argv, flag in ((["--pictures", "0"], "--pictures"), (["--jit", "--fix_vit", "0"], "--fix_vit"),
                       (["--seed", "3"], "--seed")):
        with pytest.raises(SystemExit):
            T.main(argv + ["--work", str(work)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in err and "--out" in err, err
    assert not work.exists() and sorted(os.listdir(T.PACKAGE_DIR)) == before
    # the check reads the flags, not the picture count: with --out named the same pilot gets past it (and then
    # fails on the bad --tower_dense, which is checked after)
    with pytest.raises(SystemExit):
        T.main(["--pictures", "0", "--tower_warmup", "0", "--tower_dense", "5", "--work", str(work), "--out",
                str(tmp_path / "m")])
    assert "--tower_dense continues" in capsys.readouterr().err


def test_full_task_resumes_from_its_last_checkpoint(tmp_path):
    """train_default's full task after a kill: no checkpoint in work/run -> a fresh start; checkpoint-N folders
    there -> --resume_from_checkpoint, which ixc25-finetune reads as the last of them (tests/test_finetune_cli.py:
    a resumed run ends with the weights of an unbroken one)."""
    import os
    from ixc25_ms.train.args import parse_args
    args = T.parser().parse_args(["--work", str(tmp_path), "--out", str(tmp_path / "m")])
    assert "--resume_from_checkpoint" not in T.full_task_flags(args)
    os.makedirs(tmp_path / "run" / "trainer_state_only")
    assert "--resume_from_checkpoint" not in T.full_task_flags(args)
    for n in (400, 800):
        os.makedirs(tmp_path / "run" / f"checkpoint-{n}")
    flags = T.full_task_flags(args)
    assert flags[-2:] == ["--resume_from_checkpoint", "True"]
    assert parse_args(["--model_name_or_path", "init"] + flags).resume_from_checkpoint == "True"


def test_language_warmup_trains_the_language_model_on_scenes_told_in_words(tmp_path):
    """train_default's --language_warmup stage: ixc25-finetune on that many text-only conversations (scene in
    words, then questions; context_items from the stage's own seed range), 16 a step, from the recipe's initial
    checkpoint -> work/init_lang, an official-layout checkpoint whose language model moved and whose ViT and
    projector did not (no picture); a rerun finds init_lang and trains nothing."""
    import json
    import os
    from ixc25_ms.train.cli import main as finetune
    from ixc25_ms.weights.layout import load_state_dict
    work = str(tmp_path)
    T.init_checkpoint(os.path.join(work, "init"), 0)
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "model"), "--language_warmup", "32"])
    assert T.language_warmup(args, "init", finetune) == "init_lang"
    with open(os.path.join(work, "language.json")) as f:
        items = json.load(f)
    assert items == T.context_items(32, T.TRAIN_SEED_BASE + T.LANGUAGE_SEED_OFFSET)
    assert all("image" not in it and S.question_type(it["conversations"][0]["value"].split(". ")[-1]) for it in items)
    before, after = (load_state_dict(os.path.join(work, d)) for d in ("init", "init_lang"))
    assert set(before) == set(after)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert {"model.tok_embeddings.weight", "output.weight", "model.layers.0.attention.wqkv.weight"} <= moved
    assert not any(k.startswith(("vit.", "vision_proj.")) for k in moved), sorted(moved)
    assert not os.path.exists(os.path.join(work, "init_lang.run"))

    def refuse(argv):
        raise AssertionError("a finished language warm-up was trained again")
    assert T.language_warmup(args, "init", refuse) == "init_lang"


def test_a_stage_killed_part_way_resumes_to_the_weights_of_an_unbroken_one(tmp_path, monkeypatch, capsys):
    """A stage before the full task (here the language warm-up, 48 conversations: 3 steps of 16) keeps its last
    checkpoint every STAGE_SAVE_STEPS steps; killed after its first checkpoint, a rerun resumes from it
    (--resume_from_checkpoint) and ends with the weights of an unbroken run, bit for bit, its checkpoint folders
    removed; the unbroken run's output holds none either."""
    import os
    import shutil
    import pytest
    from ixc25_ms.train import trainer as TR
    from ixc25_ms.train.checkpointing import checkpoints
    from ixc25_ms.train.cli import main as finetune
    from ixc25_ms.weights.layout import load_state_dict
    monkeypatch.setattr(T, "STAGE_SAVE_STEPS", 1)
    init = str(tmp_path / "init")
    T.init_checkpoint(init, 0)
    runs = {}
    for name in ("unbroken", "killed"):
        work = str(tmp_path / name)
        shutil.copytree(init, os.path.join(work, "init"))
        args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "model"), "--language_warmup", "48"])
        if name == "killed":
            real, calls = TR.rotate, []

            def kill_after_first_checkpoint(*a, **k):
                real(*a, **k)
                calls.append(1)
                raise KeyboardInterrupt("killed")
            monkeypatch.setattr(TR, "rotate", kill_after_first_checkpoint)
            with pytest.raises(KeyboardInterrupt):
                T.language_warmup(args, "init", finetune)
            monkeypatch.setattr(TR, "rotate", real)
            assert [os.path.basename(d) for d in checkpoints(os.path.join(work, "init_lang.run"))] == ["checkpoint-1"]
            seen = []
            capsys.readouterr()
            T.language_warmup(args, "init", lambda argv: seen.append(argv) or finetune(argv))
            assert seen[0][-2:] == ["--resume_from_checkpoint", "True"]
            assert "checkpoint-1 at step 1" in capsys.readouterr().out  # two steps left, not three
        else:
            assert T.language_warmup(args, "init", finetune) == "init_lang"
        out = os.path.join(work, "init_lang")
        assert not checkpoints(out) and not os.path.exists(out + ".run")
        runs[name] = load_state_dict(out)
    assert set(runs["unbroken"]) == set(runs["killed"])
    assert all(np.array_equal(runs["unbroken"][k], runs["killed"][k]) for k in runs["unbroken"])
    assert not np.array_equal(runs["unbroken"]["output.weight"], load_state_dict(init)["output.weight"])


def test_read_stage_asks_lone_objects_their_colour_or_shape(tmp_path, monkeypatch):
    """train_default's --read_stage: ixc25-finetune on that many small one-object pictures (the stage's own seed
    range, stored at the training scale), each asked "What colour is the {shape}?" or "What shape is the {colour}
    one?" about its object, from the previous stage -> work/init_read (a relative --work, as a user types it); with
    --fix_vit 1 the ViT stays as it was while the language model and projector move; a rerun trains nothing."""
    import json
    import os
    from PIL import Image
    from ixc25_ms.train.cli import main as finetune
    from ixc25_ms.weights.layout import load_state_dict
    monkeypatch.chdir(tmp_path)
    work = "w"
    T.init_checkpoint(os.path.join(work, "init"), 0)
    args = T.parser().parse_args(["--work", work, "--out", os.path.join(work, "model"), "--read_stage", "32",
                                  "--fix_vit", "1"])
    assert T.read_stage(args, "init", finetune) == "init_read"
    root = os.path.join(work, "read")
    items = json.load(open(os.path.join(root, "data.json")))
    assert len(items) == 32
    kinds = set()
    for j, it in enumerate(items):
        seed = int(it["id"].split("-")[1])
        assert seed == T.TRAIN_SEED_BASE + T.READ_SEED_OFFSET + j
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng, int(rng.integers(1, 2)), (200, 560))
        (o,) = scene.objects
        (q, a) = [c["value"] for c in it["conversations"]]
        kind, subject = S.question_type(q)
        assert (kind, subject) in ((1, o.shape), (3, o.colour)), q
        assert a == S.answer(scene, kind, subject) and (o.colour if kind == 1 else o.shape) in a
        kinds.add(kind)
        w, h = Image.open(os.path.join(root, it["image"])).size
        assert (w, h) == (round(scene.width * T.TRAIN_SCALE), round(scene.height * T.TRAIN_SCALE))
    assert kinds == {1, 3}
    before, after = (load_state_dict(os.path.join(work, d)) for d in ("init", "init_read"))
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert {"model.tok_embeddings.weight", "output.weight", "vision_proj.0.weight"} <= moved
    assert not any(k.startswith("vit.") for k in moved), sorted(moved)
    assert not os.path.exists(os.path.join(work, "init_read.run"))

    def refuse(argv):
        raise AssertionError("a finished read stage was trained again")
    assert T.read_stage(args, "init", refuse) == "init_read"
