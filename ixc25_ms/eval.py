"""`ixc25-eval`: accuracy per question type of a model on shape pictures (official conversation format)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

from . import shapes as S
from .processing import ImageError, load_image
from .prompt import placeholder_mismatch

TYPE_NAMES = {1: "colour of the {shape}", 2: "how many {shape}s", 3: "shape of the {colour} one", 4: "describe"}


def _image_path(p: str, data_path: str) -> str:
    """Paths as the official data: relative to the working directory; else relative to the data file."""
    if os.path.isabs(p) or os.path.exists(p):
        return p
    return os.path.join(os.path.dirname(os.path.abspath(data_path)), p)


def _images(item: dict) -> list:
    """The item's "image" field as a list: none, one path or several."""
    image = item.get("image")
    return [] if image is None else [image] if isinstance(image, str) else image


def objects_in(item: dict) -> Optional[int]:
    """How many objects the item's picture holds, read off the expected answer of its "Describe the image."
    turn (which names every object); None when no turn describes it."""
    conv = item.get("conversations", [])
    for q_turn, a_turn in zip(conv[0::2], conv[1::2]):
        qt = S.question_type(q_turn["value"])
        if qt is not None and qt[0] == 4:
            return sum(S.facts(a_turn["value"]).values()) or None
    return None


def check_items(items, data_path: str, alone: bool = False) -> None:
    """One-line ValueError naming the item and field for anything evaluate cannot read: each item a dict whose
    "conversations" alternate user/assistant turns with a string "value", its "image" (if any) a path or a
    list of paths that exist and decode as pictures, as many `<ImageHere>` placeholders in the chat up to each
    turn (that turn alone with `alone`) as it has pictures (or none for one picture: it goes first, as chat
    puts it); and at least one question of the four kinds in the file, else nothing would be scored."""
    if not isinstance(items, list) or not items:
        raise ValueError("expected a JSON list of items" + (", got an empty one" if items == [] else ""))
    for k, item in enumerate(items):
        name = f"item {k}" + (f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else "")
        if not isinstance(item, dict):
            raise ValueError(f"{name}: expected an object, got {type(item).__name__}")
        _check_turns(name, item.get("conversations"))
        paths = _images(item)
        _check_pictures(name, paths, data_path)
        _check_placeholders(name, item["conversations"], len(paths), alone)
    if not any(S.question_type(t["value"]) for item in items for t in item["conversations"][0::2]):
        words = "; ".join(repr(q) for q in S.QUESTIONS.values())
        raise ValueError(f"no user turn asks one of the four questions in their exact words ({words}): "
                         "nothing to score")


def _check_turns(name: str, conv) -> None:
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{name}: field 'conversations' must be a non-empty list of turns")
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{name}: conversations[{j}] needs a string field 'value'")
    if len(conv) % 2:
        raise ValueError(f"{name}: field 'conversations' has {len(conv)} turns; expected user/assistant pairs")


def _check_pictures(name: str, paths, data_path: str) -> None:
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{name}: field 'image' must be a path or a list of paths")
    for p in paths:
        full = _image_path(p, data_path)
        if not os.path.exists(full):
            raise ValueError(f"{name}: field 'image': no file {p}")
        try:  # decoded here, so that a broken picture stops the run before the model loads, not at item 400
            load_image(full)
        except ImageError as e:
            raise ValueError(f"{name}: field 'image': {e}") from None


def _check_placeholders(name: str, conv: list, pictures: int, alone: bool) -> None:
    bad = placeholder_mismatch([t["value"] for t in conv[0::2]], pictures, alone)
    if bad:
        raise ValueError(f"{name}: conversations[{2 * bad[0]}]: {bad[1]} in field 'image'")


def evaluate(model, tokenizer, items: List[dict], data_path: str, hd_num: Optional[int] = None, log=None,
             reference=None, alone: bool = False, progress: Optional[str] = None, key: Optional[dict] = None) -> dict:
    """Chats through every item (one question per turn, earlier turns as history, greedy) and scores each
    answer against the item's own reference answer with shapes.is_correct. Returns counts, accuracy per type,
    the same by objects in the picture (objects_in; "by_objects": type -> objects -> counts) and every answer.
    `reference`: a PyTorch RefChat (parity_tests.reference.chat) asked the same turns with the same history: the
    answers' identity is recorded too. `alone`: every question asked in a chat of its own (the picture, no
    history), which tells what the model reads off the picture from what it copies or mistakes from earlier
    answers; the objects in the picture are still read off the item's description.
    `progress`: a file where each item's answers are appended as it is done; a run killed part way and started
    again with the same items, settings and `key` (what else names the run: the model, its quantisation) skips
    the items it holds; a file of another run is started afresh. The caller removes it once the result is kept."""
    rows = []  # one per question, with the item's object count
    t0 = time.perf_counter()
    encode = model.encode_img
    memo = {}  # the turns of one item ask about the same picture: its embeddings are computed once

    def encode_once(image, hd=24):
        key = (image, hd) if isinstance(image, str) else None
        if key is None:
            return encode(image, hd)
        if key not in memo:
            memo.clear()
            memo[key] = encode(image, hd)
        return memo[key]
    model.encode_img = encode_once
    try:
        run_key = dict(key or {}, hd_num=hd_num, alone=alone, reference=reference is not None,
                       items=hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest())
        done = _resume(progress, run_key, log)
        with open(progress, "a" if done else "w", encoding="utf-8") if progress else nullcontext() as f:
            if not done and progress:
                f.write(json.dumps({"key": run_key}) + "\n")
            return _run(model, tokenizer, items, data_path, hd_num, log, rows, t0, reference, alone, done, f)
    finally:
        del model.encode_img


def _resume(progress: Optional[str], run_key: dict, log) -> Dict[int, List[dict]]:
    """Item index -> its answer rows, from a progress file of the same run (its first line holds the run's key);
    {} when there is none or it belongs to another run. A line cut off by a kill ends the reading."""
    if not progress or not os.path.exists(progress):
        return {}
    done = {}
    with open(progress, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        if json.loads(lines[0]).get("key") != run_key:
            if log:
                log(f"[eval] {progress} is another run's progress: starting afresh")
            return {}
        for line in lines[1:]:
            rec = json.loads(line)
            done[int(rec["item"])] = rec["rows"]
    except (ValueError, KeyError, TypeError, AttributeError):  # the cut-off last line, or not ours at all
        pass
    if log and done:
        log(f"[eval] resuming: {len(done)} items already answered in {progress}")
    return done


def _tally(rows: List[dict]):
    """{"correct", "total"} of the scored rows per type (every type, 0 if unasked) and per type and object count."""
    counts = {t: {"correct": 0, "total": 0} for t in S.QUESTIONS}
    by: Dict[int, Dict[int, Dict[str, int]]] = {}
    for r in rows:
        if r["type"] is None:
            continue
        cells = [counts[r["type"]]]
        if r["objects"] is not None:
            cells.append(by.setdefault(r["type"], {}).setdefault(r["objects"], {"correct": 0, "total": 0}))
        for c in cells:
            c["correct"] += int(r["correct"])
            c["total"] += 1
    return counts, {t: dict(sorted(v.items())) for t, v in sorted(by.items())}


def _run(model, tokenizer, items, data_path, hd_num, log, rows, t0, reference, alone, done, progress) -> dict:
    for k, item in enumerate(items):
        if k in done:
            rows += done[k]
            continue
        first = len(rows)
        images = [_image_path(p, data_path) for p in _images(item)]
        history = []
        n_objects = objects_in(item)
        conv = item.get("conversations", [])
        for q_turn, a_turn in zip(conv[0::2], conv[1::2]):
            q, expected = q_turn["value"], a_turn["value"]
            if alone:
                history = []
            kw = {} if hd_num is None else {"hd_num": hd_num}
            ref = None if reference is None else reference.chat(q, images, history, hd_num or 24)
            got, history = model.chat(tokenizer, q, images, history=history, do_sample=False, num_beams=1,
                                      max_new_tokens=48, **kw)
            qt = S.question_type(q)
            ok = None if qt is None else S.is_correct(qt[0], qt[1], expected, got)
            rows.append({"id": item.get("id", k), "question": q, "expected": expected, "answer": got,
                         "type": None if qt is None else qt[0], "correct": ok, "objects": n_objects,
                         **({} if ref is None else {"reference": ref, "same_as_reference": ref == got})})
        if progress is not None:
            progress.write(json.dumps({"item": k, "rows": rows[first:]}) + "\n")
            progress.flush()
        if log and (k + 1) % 50 == 0:
            log(f"[eval] {k + 1}/{len(items)} items, {time.perf_counter() - t0:.0f} s")
    counts, by = _tally(rows)
    acc = {t: (c["correct"] / c["total"] if c["total"] else None) for t, c in counts.items()}
    out = {"items": len(items), "alone": alone, "counts": counts, "unscored": sum(r["type"] is None for r in rows),
           "accuracy": acc, "by_objects": by, "seconds": time.perf_counter() - t0, "resumed_items": len(done),
           "answers": rows}
    if reference is not None:
        same = [r["same_as_reference"] for r in rows]
        out["same_as_reference"] = {"identical": sum(same), "total": len(same)}
    return out


def table(res: dict) -> str:
    """Markdown tables of an evaluate() result (or of its --json file, whose keys are strings): per kind, then per
    kind and objects in the picture."""
    lines = ["| type | question | correct | total | accuracy |", "|---|---|---|---|---|"]
    counts = {int(t): c for t, c in res["counts"].items()}
    for t in S.QUESTIONS:
        c = counts[t]
        acc = "-" if c["total"] == 0 else f"{100 * c['correct'] / c['total']:.1f} %"
        lines.append(f"| {t} | {S.QUESTIONS[t]} | {c['correct']} | {c['total']} | {acc} |")
    if res.get("unscored"):  # chit-chat and any other turn: asked (history goes on), not scored
        lines.append(f"\n{res['unscored']} other turn(s) asked, none of the four questions: not scored")
    by = {int(t): {int(n): c for n, c in v.items()} for t, v in res.get("by_objects", {}).items()}
    ns = sorted({n for v in by.values() for n in v})
    if ns:  # the same by objects in the picture (items that say it: a "Describe the image." turn)
        lines += ["", "| type | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for t in S.QUESTIONS:
            cells = [by.get(t, {}).get(n) for n in ns]
            lines.append(f"| {t} | " + " | ".join("-" if not c else f"{c['correct']} / {c['total']} = "
                                                   f"{100 * c['correct'] / c['total']:.1f} %" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ixc25-eval", description="Accuracy per question type on shape pictures: "
                                 "every question of the data file asked in a chat turn, answers checked.")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--data", required=True, help="JSON list of items in the official conversation format")
    ap.add_argument("--json", default=None, help="write the results (with every answer) here; answers are kept in "
                    "JSON.progress.jsonl as they come, and a killed run started again goes on from there")
    ap.add_argument("--hd_num", type=int, default=None, help="HD crops cap (default: chat's)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N items")
    ap.add_argument("--quantize", choices=("int8", "fp16"), default=None, help="weight-only quantised LLM "
                    "(ixc25_ms.load(quantize=...)); with --reference the answers are compared with fp32 PyTorch")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--reference", action="store_true", help="also answer with our PyTorch reference (same weights, "
                    "fp32, greedy) and count identical answers")
    ap.add_argument("--alone", action="store_true", help="ask every question in a chat of its own (the picture, no "
                    "history) instead of after the item's earlier turns")
    args = ap.parse_args(argv)
    if args.limit < 0:
        ap.error(f"--limit must be >= 0, got {args.limit}")
    if args.hd_num is not None and args.hd_num < 1:
        ap.error(f"--hd_num must be >= 1, got {args.hd_num}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):  # told now, not after the run
        print(f"ixc25-eval: error: --json {args.json}: no such directory", file=sys.stderr)
        return 1
    import ixc25_ms
    try:
        with open(args.data, encoding="utf-8") as f:
            items = json.load(f)
        check_items(items, args.data, args.alone)
    except json.JSONDecodeError as e:
        print(f"ixc25-eval: error: {args.data}: not valid JSON: line {e.lineno} column {e.colno} ({e.msg})",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ixc25-eval: error: {args.data}: cannot read ({e.strerror or e})", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"ixc25-eval: error: {args.data}: {e}", file=sys.stderr)
        return 1
    if args.limit:
        items = items[:args.limit]
    try:
        model, tok = ixc25_ms.load(args.model or ixc25_ms.DEFAULT_MODEL, use_jit=True, quantize=args.quantize)
    except ixc25_ms.LOAD_ERRORS as e:
        print(f"ixc25-eval: error: {e}", file=sys.stderr)
        return 1
    reference = None
    if args.reference:
        from parity_tests.reference.chat import RefChat
        from .processing import preprocess_image
        from .weights.layout import load_state_dict
        reference = RefChat(model.cfg, load_state_dict(args.model or ixc25_ms.DEFAULT_MODEL), tok,
                            lambda image, hd: preprocess_image(image, hd_num=hd, crop=model.vit.resolution))
    model_dir = os.path.abspath(args.model or ixc25_ms.DEFAULT_MODEL)
    files = [os.path.join(model_dir, n) for n in sorted(os.listdir(model_dir))]
    key = {"model": model_dir, "quantize": args.quantize,  # the same directory with other weights is another run
           "files": [[os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)] for f in files if os.path.isfile(f)]}
    progress = args.json + ".progress.jsonl" if args.json else None
    res = evaluate(model, tok, items, args.data, args.hd_num, None if args.quiet else
                   (lambda m: print(m, file=sys.stderr)), reference, args.alone, progress, key)
    print(table(res))
    if reference is not None:
        s = res["same_as_reference"]
        print(f"identical answers, MindSpore vs the PyTorch reference: {s['identical']} of {s['total']} "
              f"({100 * s['identical'] / max(1, s['total']):.1f} %)")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.json)
        os.remove(progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
