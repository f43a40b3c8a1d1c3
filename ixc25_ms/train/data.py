"""Training data: the official `--data_path` (.txt of `json [ratio]` lines or one .json), checked item by item."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ..prompt import IMAGE_TAG
from .labels import USER_ROLES, conv2text


class DataError(ValueError):
    """Bad training data; the message names the file, the item and the field."""


@dataclass
class Sample:
    """One conversation: its official text and image paths (as given: relative to the working directory)."""

    source: str  # the JSON file
    index: int  # position of the item in that file
    item_id: str
    text: str
    images: List[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.source}: item {self.index} (id {self.item_id!r})"


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what} (relative to the working directory {os.getcwd()})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: line {e.lineno} column {e.colno} ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def parse_item(item, source: str, index: int) -> Sample:
    """An official item -> Sample, or DataError naming file, item and field."""
    where = f"{source}: item {index}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    item_id = str(item.get("id", index))
    where = f"{where} (id {item_id!r})"
    conv = item.get("conversations")
    if conv is None:
        raise DataError(f"{where}: no 'conversations' field")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{k}] needs string fields 'from' and 'value'")
        is_user = turn["from"].lower() in USER_ROLES
        if is_user != (k % 2 == 0):
            want = "a user turn ('human'/'user')" if k % 2 == 0 else "an assistant turn"
            raise DataError(f"{where}: conversations[{k}] 'from' is {turn['from']!r}, expected {want}: roles must "
                            f"alternate, starting with the user")
    images = item.get("image", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    text = conv2text(conv)
    tags = text.count(IMAGE_TAG)
    if tags != len(images) and not (len(images) == 1 and tags == 0):
        raise DataError(f"{where}: {tags} {IMAGE_TAG} placeholder(s) for {len(images)} image(s) (one image may go "
                        f"without a placeholder; otherwise each image needs one)")
    for p in images:
        if not os.path.isfile(p):
            raise DataError(f"{where}: image {p!r} not found (paths are relative to the working directory "
                            f"{os.getcwd()})")
    return Sample(source, index, item_id, text, list(images))


def read_json_file(path: str) -> List[Sample]:
    data = _read_json(path, "data file")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return [parse_item(item, path, i) for i, item in enumerate(data)]


def load_samples(data_path: str, given_num: bool = False, seed: int = 0, log=print) -> List[Sample]:
    """Every sample of `--data_path`, the official way: a .json file, or a .txt of `json_path [ratio]` lines.
    ratio (given_num False): keep int(len * ratio) items — a random subset when < 1, random repeats added when
    > 1; given_num True: int(ratio * 1000) items the same way (the ratio is then required). Subsets and repeats
    are drawn with Python's `random` seeded by `seed` (the official leaves them unseeded)."""
    rng = random.Random(seed)
    if data_path.endswith(".json"):
        return read_json_file(data_path)
    if not data_path.endswith(".txt"):
        raise DataError(f"{data_path}: --data_path must be a .txt list of JSON files or one .json file")
    if not os.path.isfile(data_path):
        raise DataError(f"{data_path}: no such data list (relative to the working directory {os.getcwd()})")
    with open(data_path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    out: List[Sample] = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise DataError(f"{data_path}: line {n}: expected 'json_path [ratio]', got {line!r}")
        try:
            ratio = float(parts[1]) if len(parts) == 2 else None
        except ValueError:
            raise DataError(f"{data_path}: line {n}: ratio {parts[1]!r} is not a number") from None
        if given_num and ratio is None:
            raise DataError(f"{data_path}: line {n}: --given_num True needs a ratio on every line")
        samples = read_json_file(parts[0])
        if not samples:
            raise DataError(f"{parts[0]}: the file has no items")
        want = int(ratio * 1000) if given_num else (None if ratio is None else int(len(samples) * ratio))
        if want is not None and want < len(samples):
            samples = rng.sample(samples, want)
        elif want is not None and want > len(samples):
            samples = samples + [rng.choice(samples) for _ in range(want - len(samples))]
        log(f"Load {len(samples)} samples from {parts[0]}" + ("" if ratio is None else f" (ratio {ratio:g})"))
        out.extend(samples)
    if not out:
        raise DataError(f"{data_path}: lists no data file")
    return out


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The default sampling: a permutation of the n samples per epoch, fixed by (seed, epoch) alone."""
    return list(random.Random(f"{seed}:{epoch}").sample(range(n), n))


def official_draws(samples: Sequence[Sample], n_draws: int, draw_size: int, seed: int, epoch: int) -> List[int]:
    """The official sampling (`--sampling official`): every draw picks one dataset — image datasets first, as
    Mix_dataset does, weighted by size — then `draw_size` items of it uniformly *with replacement*
    (Sample_dataset.get_item: random.randrange, the index ignored), so an epoch may skip and repeat items."""
    rng = random.Random(f"official:{seed}:{epoch}")
    groups = {}
    for i, s in enumerate(samples):
        groups.setdefault((bool(s.images), s.source), []).append(i)
    image_groups = [g for k, g in groups.items() if k[0]]
    text_groups = [g for k, g in groups.items() if not k[0]]
    out, use_multi = [], 0
    for _ in range(n_draws):
        pool = image_groups if image_groups and (use_multi < draw_size or not text_groups) else text_groups
        g = rng.choices(pool, weights=[len(x) for x in pool], k=1)[0]
        out.extend(g[rng.randrange(len(g))] for _ in range(draw_size))
        use_multi += 1
        if use_multi > draw_size * 2:
            use_multi = 0
    return out


def image_sizes(sample: Sample) -> List[tuple]:
    """(width, height) of each image, from the file header only."""
    from PIL import Image
    sizes = []
    for p in sample.images:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"{sample.where}: image {p!r} cannot be read ({type(e).__name__}: {e})") from None
    return sizes


def describe(samples: Sequence[Sample]) -> str:
    n_img = sum(1 for s in samples if s.images)
    return f"{len(samples)} samples ({n_img} with images, {len(samples) - n_img} text-only)"


def check_pieces(tokenizer) -> None:
    """The turn markers must exist as pieces (the labels are found by piece)."""
    for piece in ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"):
        i = tokenizer.convert_tokens_to_ids(piece)
        if i is None or tokenizer.convert_ids_to_tokens(i) != piece:
            raise DataError(f"the tokenizer has no piece {piece!r}; IXC2.5 training needs the official turn markers")


def assistant_header_warning(tokenizer) -> Optional[str]:
    """The official label mask (`mask_human_targets`) skips a fixed 6 positions after a user turn's end: the
    end-of-turn id and `\\n [UNUSED_TOKEN_146] ass istant \\n` as the official tokenizer splits them. A tokenizer
    that splits the header otherwise shifts every answer's labels: a warning (None when it splits as official)."""
    n = len(tokenizer.encode("\n[UNUSED_TOKEN_146]assistant\n", add_special_tokens=False))
    if n == 5:
        return None
    what = (f"the first {5 - n} token(s) of every answer get no label" if n < 5 else
            f"the last {n - 5} token(s) of every assistant header are trained as answer text")
    return (f"the tokenizer encodes the assistant header '\\n[UNUSED_TOKEN_146]assistant\\n' as {n} pieces, the "
            f"official label mask counts 5 (the official tokenizer splits 'ass' + 'istant'): {what}")


def optional_int(x: Optional[str]) -> Optional[int]:
    return None if x is None else int(x)
