"""The default model's training data: drawn shape pictures in the official conversation format, the tower's tag
files, text-only scenes, the tokenizer's corpus (ixc25_ms.shapes draws each picture from its seed)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

TRAIN_SEED_BASE, EVAL_SEED_BASE = 0, 10_000_000  # picture i of the training set uses seed BASE + i
# Training pictures are stored at 2/3 of the drawn size: the training transform (ceil(1.5 w / 560) columns) then
# cuts them into the crop grid that chat's inference transform (ceil(w / 560)) cuts the full-size picture into,
# at the same final resolution, so the model trains on the grids and scales it will be asked about.
TRAIN_SCALE = 2 / 3


EASY_SEED_OFFSET = 5_000_000  # easy picture j of the training set uses seed BASE + EASY_SEED_OFFSET + j
CONTEXT_SEED_OFFSET = 7_000_000  # text-only context item j draws its scene from seed BASE + CONTEXT_SEED_OFFSET + j
TOWER_SEED_OFFSET = 8_000_000  # tower warm-up picture j uses seed BASE + TOWER_SEED_OFFSET + j
PAIR_SEED_OFFSET = 9_000_000  # --tower_pair picture j: seed BASE + this + j
SCENE_SEED_OFFSET = 6_000_000  # --tower_scenes picture j: seed BASE + this + j
LANGUAGE_SEED_OFFSET = 30_000_000  # language warm-up item j: seed BASE + this + j (above every picture range)
READ_SEED_OFFSET = 50_000_000  # read-stage picture j: seed BASE + this + j


TOWER_TAGS = ("shape", "pair", "both", "pairs", "shapes", "centres")


def centre_cells(where, scene, values, view: int, patch: int):
    """The mask `where` (an 'L' image of `scene` scaled so its longer side is `view`, as the warm-up's square_view
    scales the picture) with object i's centre patch set to values[i]: the one patch of the warm-up's square view
    (the picture centred on a `view` square, a grid of `patch`) that holds the object's centre, so each object
    marks one token whatever its size (a later object's cell covers an earlier one's). A cell cut by the picture's
    edge keeps only its inside part, under half a patch when the centre lies in the edge patch: no centre label
    there."""
    a = np.array(where)
    h, w = a.shape
    sx, sy, ox, oy = w / scene.width, h / scene.height, (view - w) // 2, (view - h) // 2  # square_view's placement
    for o, v in zip(scene.objects, values):
        x0 = int((o.cx * sx + ox) // patch) * patch - ox  # the cell's corner, in the mask's pixels
        y0 = int((o.cy * sy + oy) // patch) * patch - oy
        a[max(0, y0): y0 + patch, max(0, x0): x0 + patch] = v
    from PIL import Image
    return Image.fromarray(a)


def tower_pictures(root: str, n: int, seed_base: int, tags: str = "shape", view: int = 560, patch: int = 28) -> str:
    """n pictures for the tower warm-up (ixc25_ms.train.tower_warmup) under root/images and root/tags.json, picture
    j drawn from seed seed_base + j, with a mask of where each tag lies (root/masks: value k marks the item's k-th
    tag, 0 the background). tags "shape": one object (200-560 px, shapes.one_object_scene) tagged with its shape;
    "pair": the same pictures tagged "colour shape" (one of 18, so the tower keeps colour beside shape); "both": the
    same pictures with two tags, the colour and the shape (a binary cross-entropy each; the mask marks the shape);
    "pairs": 1-4 objects (shapes.random_scene, 200-1200 px) tagged with every "colour shape" pair they show;
    "shapes": such scenes tagged with every shape they show, each object's mask marking its own shape (so the
    per-patch loss asks each token for its own object's shape, not the picture's), stored as the warm-up sees
    them (longer side `view` px: square_view then scales by 1, the same pixels, a smaller file); "centres": such
    scenes, each object's region marked with its shape and the one patch holding its centre (centre_cells, a grid
    of `patch` in the warm-up's view) with "{shape} centre", so the per-patch loss marks one token per object: what
    a count needs (the picture's tags: its shapes and their centres)."""
    from ixc25_ms import shapes as S
    if tags not in TOWER_TAGS:
        raise ValueError(f"tower tags must be one of {', '.join(TOWER_TAGS)}, got {tags!r}")
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    def tag(o):  # the tag the mask marks
        return o.shape if tags in ("shape", "both", "shapes", "centres") else f"{o.colour} {o.shape}"

    def all_tags(o):  # every tag the object gives its picture
        return {tag(o), o.colour} if tags == "both" else {tag(o), f"{o.shape} centre"} if tags == "centres" \
            else {tag(o)}

    items = []
    for j in range(n):
        path, mask = os.path.join("images", f"{seed_base + j}.png"), os.path.join("masks", f"{seed_base + j}.png")
        if tags in ("pairs", "shapes", "centres"):
            rng = np.random.default_rng(seed_base + j)
            scene = S.random_scene(rng)
            im = S.render(scene, rng)
        else:
            scene, im = S.one_object_scene(seed_base + j)
        names = sorted(set().union(*map(all_tags, scene.objects)))
        where = S.region_map(scene, [1 + names.index(tag(o)) for o in scene.objects])
        if (tags == "shapes" and max(im.size) > view) or tags == "centres":  # square_view's own scaling, done here
            from PIL import Image
            from ixc25_ms.train.tower_warmup import fit
            im, where = fit(im, view, Image.BICUBIC), fit(where, view, Image.NEAREST)
        if tags == "centres":
            where = centre_cells(where, scene, [1 + names.index(f"{o.shape} centre") for o in scene.objects], view, patch)
        save_png(im, os.path.join(root, path))
        save_png(where, os.path.join(root, mask))
        items.append({"image": path, "tags": names, "mask": mask})
    out = os.path.join(root, "tags.json")
    with open(out + ".tmp", "w") as f:
        json.dump(items, f)
    os.replace(out + ".tmp", out)
    return out


def save_png(im, path: str) -> None:
    """Every picture is written, never kept from an earlier run: a work directory reused with other flags (a
    picture's seed drawn with other --easy_objects, say) once kept the earlier pictures under the new
    conversations. Written under a temporary name, then renamed."""
    im.save(path + ".tmp", format="PNG", compress_level=1)
    os.replace(path + ".tmp", path)


def make_pictures(root: str, n: int, seed_base: int, turns=(1, 4), chitchat: float = 0.08, scale: float = 1.0,
                  easy: int = 0, context: float = 0.0, describe_last: bool = False, easy_objects=(1, 2),
                  easy_kinds=None, log=print) -> str:
    """n pictures under root/images and root/data.json (official conversation format); picture i drawn from
    seed seed_base + i (stored at `scale` of its size); `turns` (low, high) questions per picture, or None for
    the questions of grounded_turns; `easy` extra small pictures (200-560 px, 1-2 objects: one crop, where a
    shape fills more patches); `chitchat` of n extra text-only items; `context` of n extra text-only
    items whose first user turn states a scene in words before the question (context_items); `describe_last`:
    "Describe the image." moved to the end of its conversation, so no answer can be read off a description in
    the history (the held-out set keeps the drawn order); `easy_objects` (low, high) objects in an easy picture;
    `easy_kinds`: only these question kinds on easy pictures (a curriculum: (3,) asks only "What shape is the
    {colour} one?"; an easy scene that allows none of them, as kind 1 of two circles, is drawn again from its
    seed's generator). Returns the JSON path."""
    from ixc25_ms import shapes as S
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    items = []
    t = time.perf_counter()
    for i in range(n + easy):
        seed = seed_base + i if i < n else seed_base + EASY_SEED_OFFSET + i - n
        rng = np.random.default_rng(seed)
        scene = S.random_scene(rng) if i < n else S.random_scene(
            rng, int(rng.integers(easy_objects[0], easy_objects[1] + 1)), (200, 560))
        while i >= n and easy_kinds and not any(k in easy_kinds for k, _ in S.valid_questions(scene)):
            scene = S.random_scene(rng, len(scene.objects), (200, 560))  # e.g. kind 1 of two circles: drawn again
        path = os.path.join("images", f"{seed}.png")
        full = os.path.join(root, path)
        im = S.render(scene, rng)
        if scale != 1.0:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           resample=3)  # bicubic, antialiased
        save_png(im, full)
        if i >= n and easy_kinds:  # the curriculum's kinds only, in a random order
            valid = [x for x in S.valid_questions(scene) if x[0] in easy_kinds]
            pick = rng.permutation(len(valid))[: int(rng.integers(turns[0], turns[1] + 1)) if turns else len(valid)]
            qa = S.asked(scene, [valid[j] for j in pick])
        elif turns is None:  # every question the picture allows whose answer no earlier turn gives away
            qa = S.asked(scene, grounded_turns(scene, rng))
        else:
            qa = S.conversation(scene, rng, int(rng.integers(turns[0], turns[1] + 1)))
            if describe_last:  # stable: the other questions keep their drawn order
                qa = sorted(qa, key=lambda x: x[0] == 4)
        conv = []
        for _, _, q, a in qa:
            conv += [{"from": "human", "value": q}, {"from": "bot", "value": a}]
        items.append({"id": f"shapes-{seed}", "image": path, "conversations": conv})
        if log and (i + 1) % 1000 == 0:
            log(f"[default] {i + 1} pictures ({time.perf_counter() - t:.0f} s)")
    rng = np.random.default_rng(seed_base - 1 if seed_base else 12345)
    for k in range(int(round(chitchat * n))):
        conv = []
        for j in rng.choice(len(S.CHITCHAT), size=int(rng.integers(1, 3)), replace=False):
            q, a = S.CHITCHAT[int(j)]
            conv += [{"from": "human", "value": q}, {"from": "bot", "value": a}]
        items.append({"id": f"chat-{k}", "conversations": conv})
    items += context_items(int(round(context * n)), seed_base + CONTEXT_SEED_OFFSET)
    out = os.path.join(root, "data.json")
    with open(out, "w") as f:
        json.dump(items, f)
    return out


def context_items(n: int, seed_base: int) -> list:
    """n text-only conversations: the first user turn is a scene in words and a question ("A red circle and two
    blue squares. What colour is the circle?"), then 1-3 more of the four questions; every answer is in the text.
    They teach the language model, over ~40 tokens instead of ~1,000, to find the object a question names and
    to copy its words into the answer — the skill a picture's answers need once the ViT has seen the objects
    (teacher-forced, the shipped model of 2026-12-04 copied the question's subject only ~35 % of the time)."""
    from ixc25_ms import shapes as S
    items = []
    for k in range(n):
        rng = np.random.default_rng(seed_base + k)
        scene = S.random_scene(rng)
        qa = [x for x in S.conversation(scene, rng, int(rng.integers(2, 5))) if x[0] != 4]
        conv = []
        for j, (_, _, q, a) in enumerate(qa):
            conv += [{"from": "human", "value": f"{S.describe(scene)} {q}" if j == 0 else q}, {"from": "bot", "value": a}]
        if conv:
            items.append({"id": f"context-{seed_base + k}", "conversations": conv})
    return items


def grounded_turns(scene, rng) -> list:
    """Questions for one training conversation, none answerable from the turns before it, so every answer must
    come from the picture: the three counts, then for each object unique in its shape or colour one question
    about it (its colour by its shape, or its shape by its colour — asking both lets the second copy the first),
    in a random order; half the time the description last (it repeats what the answers said). Conversations
    with the description anywhere teach the model to read answers off its own description (a run of
    2026-12-03 with every question in a random order stayed at chance on the pictures: notes/default-model.md)."""
    from ixc25_ms import shapes as S
    turns = [(2, s) for s in S.SHAPES]
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[int(i)]
        ways = ([(1, o.shape)] if scene.count(o.shape) == 1 else []) + (
            [(3, o.colour)] if len(scene.with_colour(o.colour)) == 1 else [])
        if ways:
            turns.append(ways[int(rng.integers(len(ways)))])
    turns = [turns[int(j)] for j in rng.permutation(len(turns))]
    return turns + ([(4, "")] if rng.random() < 0.5 else [])


def corpus_lines():
    """The text the tokenizer learns: every question and answer form, the chit-chat, the turn layout."""
    from ixc25_ms import shapes as S
    lines = [q + " " + a for q, a in S.CHITCHAT]
    for shape in S.SHAPES:
        for colour in S.COLOURS:
            lines += [S.question(1, shape), S.question(2, shape), S.question(3, colour),
                      f"The {shape} is {colour}.", f"The {colour} one is a {shape}."]
            lines += [f"{S.NUMBERS[n].capitalize()} {colour} {shape}s and {S.NUMBERS[n]} {colour} {shape}s."
                      for n in range(2, 5)]  # counts in words, sentence-initial and inside
        lines += [f"There are {n} {shape}s." for n in range(5)] + [f"There is 1 {shape}."]
    lines += [S.question(4, ""), "A red circle, an orange square and a green triangle."]
    turn = "[UNUSED_TOKEN_146]user\n{}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n{}[UNUSED_TOKEN_145]\n"
    return lines + [turn.format(q, a) for q, a in S.CHITCHAT] * 3
