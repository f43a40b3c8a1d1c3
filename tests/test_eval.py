"""ixc25-eval: answers scored per question kind and per objects in the picture; bad data files refused in one line."""
import json
import os

import numpy as np
import pytest

from ixc25_ms import eval as E
from ixc25_ms import shapes as S


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "user", "value": q}, {"from": "assistant", "value": a}]
    return out


ITEMS = [  # one picture of 1 object, one of 3; expected answers as the data file gives them
    {"id": "one", "image": "a.png", "conversations": _turns(
        ("What colour is the circle?", "The circle is red."),
        ("Describe the image.", "A red circle."))},
    {"id": "three", "image": "b.png", "conversations": _turns(
        ("How many squares are there?", "There are 2 squares."),
        ("What shape is the blue one?", "The blue one is a triangle."),
        ("Describe the image.", "Two green squares and a blue triangle."))},
    {"id": "hello", "conversations": _turns(("Hello!", "Hi! Show me a picture."))},
]
ANSWERS = {  # what the fake model says: right, right | wrong count, right shape, wrong description | chit-chat
    "one": ["The circle is red.", "A red circle."],
    "three": ["There are 0 squares.", "The blue one is a triangle.", "A green square and a blue triangle."],
    "hello": ["Hi!"],
}


class FakeModel:
    """Answers from a table, recording each call's images and history (evaluate asks turn by turn)."""

    def __init__(self):
        self.calls = []

    def encode_img(self, image, hd=24):
        return image

    @staticmethod
    def item(images):  # the ITEMS id a call's picture belongs to
        return {"a.png": "one", "b.png": "three"}.get(os.path.basename(images[0]), "hello") if images else "hello"

    def chat(self, tok, q, images, history=None, **kw):
        item = self.item(images)
        self.calls.append((item, q, list(images), len(history)))
        got = ANSWERS[item][len(history)]
        return got, history + [(q, got)]


def test_objects_in_reads_the_description():
    assert [E.objects_in(i) for i in ITEMS] == [1, 3, None]


def test_scores_per_kind_and_per_objects_in_the_picture(tmp_path):
    m = FakeModel()
    res = E.evaluate(m, None, ITEMS, str(tmp_path / "data.json"))
    assert [c[:2] for c in m.calls][:2] == [("one", "What colour is the circle?"), ("one", "Describe the image.")]
    assert [c[3] for c in m.calls] == [0, 1, 0, 1, 2, 0]  # history grows within an item, restarts with the next
    assert all(c[2] == [str(tmp_path / n)] for c, n in zip(m.calls, ["a.png"] * 2 + ["b.png"] * 3))
    assert res["counts"] == {1: {"correct": 1, "total": 1}, 2: {"correct": 0, "total": 1},
                             3: {"correct": 1, "total": 1}, 4: {"correct": 1, "total": 2}}
    assert res["by_objects"] == {1: {1: {"correct": 1, "total": 1}}, 2: {3: {"correct": 0, "total": 1}},
                                 3: {3: {"correct": 1, "total": 1}},
                                 4: {1: {"correct": 1, "total": 1}, 3: {"correct": 0, "total": 1}}}
    text = E.table(json.loads(json.dumps(res)))  # as read back from the --json file (string keys)
    assert "| 4 | Describe the image. | 1 | 2 | 50.0 % |" in text
    assert "| type | 1 object | 3 objects |" in text and "| 4 | 1 / 1 = 100.0 % | 0 / 1 = 0.0 % |" in text
    assert "| 2 | - | 0 / 1 = 0.0 % |" in text
    assert res["unscored"] == 1 and "1 other turn(s) asked, none of the four questions: not scored" in text


def test_image_placeholders_are_not_part_of_the_question(tmp_path):
    """The official format may mark the picture's place with <ImageHere> (and give "image" as a list): the turn is
    still scored as the question it asks, and the model is asked the turn as written."""
    items = [{"id": "one", "image": ["a.png"], "conversations": _turns(
        ("<ImageHere>What colour is the circle?", "The circle is red."),
        ("Describe the image.", "A red circle."))}]
    m = FakeModel()
    res = E.evaluate(m, None, items, str(tmp_path / "data.json"))
    assert [c[1] for c in m.calls] == ["<ImageHere>What colour is the circle?", "Describe the image."]
    assert res["counts"][1] == {"correct": 1, "total": 1} and res["counts"][4] == {"correct": 1, "total": 1}
    assert res["unscored"] == 0 and E.objects_in(items[0]) == 1


class Killed(Exception):
    pass


class DiesAt(FakeModel):
    """A FakeModel killed when it is first asked about item `at` (by its ITEMS index)."""

    def __init__(self, at):
        super().__init__()
        self.at = ITEMS[at]["id"]

    def chat(self, tok, q, images, history=None, **kw):
        if self.item(images) == self.at:
            raise Killed
        return super().chat(tok, q, images, history, **kw)


def test_a_killed_evaluation_resumes_from_its_progress_file(tmp_path):
    """Answers are appended to the progress file item by item; a run killed at the third item, started again
    with the same items and settings, asks only that item and gives the unbroken run's result. A progress file
    of another run (--alone here), or one whose last line a kill cut off, costs nothing but its items."""
    data, prog = str(tmp_path / "data.json"), str(tmp_path / "p.jsonl")
    whole = E.evaluate(FakeModel(), None, ITEMS, data)
    with pytest.raises(Killed):
        E.evaluate(DiesAt(2), None, ITEMS, data, progress=prog, key={"model": "m"})
    assert len(open(prog).read().splitlines()) == 3  # the run's key, items 0 and 1
    m = FakeModel()
    res = E.evaluate(m, None, ITEMS, data, progress=prog, key={"model": "m"})
    assert [c[0] for c in m.calls] == ["hello"] and res["resumed_items"] == 2
    assert res["answers"] == whole["answers"] and res["counts"] == whole["counts"]
    assert res["by_objects"] == whole["by_objects"] and res["unscored"] == whole["unscored"]
    for key, alone, asked in (({"model": "other"}, False, 6), ({"model": "m"}, True, 6)):
        m = ByQuestion()
        E.evaluate(m, None, ITEMS, data, progress=prog, key={"model": "m"})  # a finished file of the same run
        m = ByQuestion()
        E.evaluate(m, None, ITEMS, data, alone=alone, progress=prog, key=key)
        assert len(m.calls) == asked
    with pytest.raises(Killed):
        E.evaluate(DiesAt(2), None, ITEMS, data, progress=prog, key={"model": "m"})
    text = open(prog).read()
    open(prog, "w").write(text[:-7])  # item 1's line cut off part way
    m = FakeModel()
    assert E.evaluate(m, None, ITEMS, data, progress=prog, key={"model": "m"})["answers"] == whole["answers"]
    assert [c[0] for c in m.calls] == ["three"] * 3 + ["hello"]


class ByQuestion(FakeModel):
    """Answers by the question, so a question gets the same answer with or without history."""

    def chat(self, tok, q, images, history=None, **kw):
        item = self.item(images)
        self.calls.append((item, q, list(images), len(history)))
        turns = [t["value"] for t in next(i for i in ITEMS if i["id"] == item)["conversations"][0::2]]
        got = ANSWERS[item][turns.index(q)]
        return got, history + [(q, got)]


def test_alone_asks_every_question_without_history(tmp_path):
    """--alone: the same questions, each in a chat of its own (history 0 every time), the picture still given and
    the objects still read off the item's description; with history the same fake model sees 0, 1, 0, 1, 2, 0."""
    m = ByQuestion()
    res = E.evaluate(m, None, ITEMS, str(tmp_path / "data.json"), alone=True)
    assert [c[3] for c in m.calls] == [0] * 6
    assert [c[1] for c in m.calls] == [t["value"] for i in ITEMS for t in i["conversations"][0::2]]
    assert all(c[2] == [str(tmp_path / n)] for c, n in zip(m.calls, ["a.png"] * 2 + ["b.png"] * 3))
    assert res["alone"] is True and [r["objects"] for r in res["answers"]] == [1, 1, 3, 3, 3, None]
    assert res["counts"][2] == {"correct": 0, "total": 1} and res["counts"][4] == {"correct": 1, "total": 2}
    m2 = ByQuestion()
    assert E.evaluate(m2, None, ITEMS, str(tmp_path / "data.json"))["alone"] is False
    assert [c[3] for c in m2.calls] == [0, 1, 0, 1, 2, 0]


@pytest.mark.parametrize("items, says", [
    ({"id": 1}, "expected a JSON list"),
    ([{"id": "x", "image": "a.png"}], "item 0 (id 'x'): field 'conversations'"),
    ([{"conversations": _turns(("Hello!", "Hi!"))[:1]}], "item 0: field 'conversations' has 1 turns"),
    ([ITEMS[2], {"conversations": [{"from": "user"}, {"from": "assistant", "value": "Hi"}]}],
     "item 1: conversations[0] needs a string field 'value'"),
    ([{"id": "p", "image": "missing.png", "conversations": ITEMS[0]["conversations"]}],
     "item 0 (id 'p'): field 'image': no file missing.png"),
    ([], "expected a JSON list of items, got an empty one"),
    ([ITEMS[2]], "no user turn asks one of the four questions in their exact words"),
    ([{"id": "t", "conversations": _turns(("<ImageHere>What colour is the circle?", "The circle is red."))}],
     "item 0 (id 't'): conversations[0]: 1 <ImageHere> placeholder(s) in the chat so far for 0 picture(s)"),
])
def test_bad_data_file_refused_in_one_line(tmp_path, capsys, items, says):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(items))
    assert E.main(["--data", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and says in err, err


def test_placeholders_counted_over_the_history(tmp_path):
    """Chat sees the earlier questions as history, so an <ImageHere> in every turn of a one-picture item gives the
    second turn two placeholders for one picture (chat refuses that prompt): refused before the model loads, the
    item and turn named; asked --alone, each turn has its one placeholder and passes."""
    from PIL import Image
    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    items = [{"id": "every", "image": "a.png", "conversations": _turns(
        ("<ImageHere>What colour is the circle?", "The circle is red."),
        ("<ImageHere>Describe the image.", "A red circle."))}]
    with pytest.raises(ValueError, match=r"item 0 \(id 'every'\): conversations\[2\]: 2 <ImageHere> placeholder\(s\) "
                                         r"in the chat so far for 1 picture"):
        E.check_items(items, str(tmp_path / "data.json"))
    E.check_items(items, str(tmp_path / "data.json"), alone=True)


def test_placeholder_count_over_a_chat():
    """prompt.placeholder_mismatch, which ixc25-eval and ixc25-demo check questions with before the model loads:
    the tags of the chat so far against the pictures (none allowed for one picture: it goes first)."""
    from ixc25_ms.prompt import placeholder_mismatch as check
    tag = "<ImageHere>"
    assert check(["Describe the image.", f"{tag}How many circles are there?"], 1) is None  # 0 then 1 tag
    assert check([f"{tag}Describe the image.", "What colour is the circle?"], 1) is None  # 1, 1 (history)
    assert check([f"{tag}Describe the image.", f"{tag}Describe the image."], 1) == (
        1, f"2 {tag} placeholder(s) in the chat so far for 1 picture(s)")
    assert check([f"{tag}Describe the image.", f"{tag}Describe the image."], 1, alone=True) is None
    assert check([f"{tag}{tag}Compare them.", "Which is larger?"], 2) is None
    assert check(["Compare them."], 2)[0] == 0 and check(["Hello!"], 0) is None
    assert check([f"Hello {tag}"], 0) == (0, f"1 {tag} placeholder(s) in the chat so far for 0 picture(s)")


def test_unreadable_picture_or_model_refused_in_one_line(tmp_path, capsys):
    """A picture file that is not a picture (named in the data) stops the run before the model loads, naming the
    item, the field and the file; so does a model directory that cannot be loaded."""
    (tmp_path / "fake.png").write_bytes(b"not a png")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([ITEMS[2], {"id": "f", "image": "fake.png", "conversations": ITEMS[0]["conversations"]}]))
    assert E.main(["--data", str(path), "--model", str(tmp_path / "never-made")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "item 1 (id 'f'): field 'image'" in err and "fake.png" in err and \
        "not a recognised image" in err, err
    path.write_text(json.dumps([ITEMS[2], {"conversations": _turns(("Describe the image.", "A red circle."))}]))
    for flags in (["--limit", "-3"], ["--hd_num", "0"]):
        with pytest.raises(SystemExit):
            E.main(["--data", str(path)] + flags)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert flags[0] in err and flags[1] in err and ("--hd_num" in err) == (flags[0] == "--hd_num"), err
    (tmp_path / "cut.json").write_text('[{"conversations": [')  # a file cut short; one never written
    for data, says in (("cut.json", "not valid JSON: line 1 column 21"), ("none.json", "cannot read (No such file")):
        assert E.main(["--data", str(tmp_path / data)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"ixc25-eval: error: {tmp_path / data}: {says}"), err
    assert E.main(["--data", str(path), "--json", str(tmp_path / "no-dir" / "r.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--json" in err and "no-dir" in err and "no such directory" in err, err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    for model, says in ((tmp_path / "never-made", "not a directory"), (tmp_path / "m", "missing required key")):
        assert E.main(["--data", str(path), "--model", str(model)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(model) in err and says in err, err


def test_cli_on_the_default_model_writes_the_tables_and_json(tmp_path, capsys):
    """The real path: two freshly drawn pictures (seeds never trained on), all four questions each, through
    ixc25-eval on the shipped model; the JSON has one row per question, each scored by shapes.is_correct."""
    items = []
    for seed in (71_000_000, 71_000_001):
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng, 2)
        S.render(scene, rng).save(tmp_path / f"{seed}.png")
        conv = S.conversation(scene, rng, 4)
        items.append({"id": str(seed), "image": f"{seed}.png", "conversations": _turns(*[(q, a) for *_, q, a in conv])})
    (tmp_path / "data.json").write_text(json.dumps(items))
    out = tmp_path / "res.json"
    assert E.main(["--data", str(tmp_path / "data.json"), "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    asked = sum(len(i["conversations"]) // 2 for i in items)
    assert asked >= 6 and len(res["answers"]) == asked and sum(c["total"] for c in res["counts"].values()) == asked
    for r in res["answers"]:
        assert r["objects"] == 2 and r["correct"] == S.is_correct(r["type"], S.question_type(r["question"])[1],
                                                                   r["expected"], r["answer"])
    assert "| type | 2 objects |" in printed and not os.path.exists(str(out) + ".progress.jsonl")


def test_cli_alone_flag_reaches_evaluate(tmp_path, monkeypatch, capsys):
    """ixc25-eval --alone: the flag reaches evaluate, and the JSON says the questions were asked alone."""
    import ixc25_ms
    from PIL import Image
    for n in ("a.png", "b.png"):  # real pictures: the data check decodes each one
        Image.new("RGB", (8, 8), (240, 240, 232)).save(tmp_path / n)
    (tmp_path / "data.json").write_text(json.dumps(ITEMS))
    m = ByQuestion()
    monkeypatch.setattr(ixc25_ms, "load", lambda *a, **k: (m, None))
    out = tmp_path / "res.json"
    assert E.main(["--data", str(tmp_path / "data.json"), "--json", str(out), "--quiet", "--alone"]) == 0
    assert json.loads(out.read_text())["alone"] is True and [c[3] for c in m.calls] == [0] * 6
    assert "| 1 | What colour is the {shape}? | 1 | 1 | 100.0 % |" in capsys.readouterr().out
