"""Our own reference of the official IXC2.5 fine-tuning data side: text, training image transform, ids, labels."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from parity_tests.reference.vision import normalize_rgb

IGNORE = -100  # label of an untrained position, and the id stream's value at image positions
IMAGE_TAG = "<ImageHere>"
EOT_PIECE = "[UNUSED_TOKEN_145]"  # end of turn
SOT_PIECE = "[UNUSED_TOKEN_146]"  # start of turn
# mask_human_targets masks [last_eoa, i + 6) at the end of a user turn (eot at i): the eot itself and the 5
# pieces after it, which the official tokenizer makes of "\n[UNUSED_TOKEN_146]assistant\n"
# ('\n', '[UNUSED_TOKEN_146]', 'ass', 'istant', '\n'). The offset is fixed in the official code.
USER_END_SPAN = 6


class TrainDataError(ValueError):
    """A training item is malformed (missing or wrongly typed field)."""


def conv2text(conversations, where: str = "item") -> str:
    """Official `conv2text`: one `[UNUSED_TOKEN_146]{role}\\n{value.strip()}[UNUSED_TOKEN_145]\\n` per turn,
    role 'user' when `from` is human/user (any case), else 'assistant'; the literal '</s>' is appended."""
    if not isinstance(conversations, list):
        raise TrainDataError(f"{where}: 'conversations' must be a list, got {type(conversations).__name__}")
    out = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            raise TrainDataError(f"{where}: conversations[{k}] needs string fields 'from' and 'value'")
        role = "user" if turn["from"].lower() in ("human", "user") else "assistant"
        out.append(f"{SOT_PIECE}{role}\n{turn['value'].strip()}{EOT_PIECE}\n")
    # The literal text '</s>': the official (transformers 4.33 slow) tokenizer encodes it as the three
    # pieces '</', 's', '>', not as the eos id.
    return "".join(out) + "</s>"


# ----------------------------------------------------------------------------------------- image transform
def train_hd_plan(width: int, height: int, hd_num: int = 18, resolution: int = 560) -> Tuple[int, int, bool]:
    """(new_w, new_h, transposed) of R560_HD18_Identity_transform's resize, in landscape axes."""
    trans = width < height
    if trans:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    # official: randrange(low, up + 1) with low == up == min(ceil(1.5 w / res), scale): deterministic
    scale = min(math.ceil(width * 1.5 / resolution), scale)
    new_w = int(scale * resolution)
    new_h = int(new_w / ratio)
    if scale < 1 or new_h < 1:
        raise TrainDataError(f"image {width}x{height} cannot be planned for hd_num={hd_num} "
                             f"(scale {scale}, resized height {new_h})")
    return new_w, new_h, trans


def train_transform_pil(img: Image.Image, hd_num: int = 18, resolution: int = 560) -> Image.Image:
    """The official training geometry on a PIL image: RGB, transpose portrait, bilinear resize, white padding
    centred top/bottom to a multiple of `resolution`, transpose back."""
    # official order: Image.open(path).convert('RGB') first, then the transform (alpha is dropped, not
    # composited; this differs from the inference loader)
    img = img.convert("RGB")
    new_w, new_h, trans = train_hd_plan(img.size[0], img.size[1], hd_num, resolution)
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    # torchvision's resize of a PIL image is PIL's own resize (bilinear, with PIL's antialiasing)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    tar = int(math.ceil(new_h / resolution) * resolution)
    top = int((tar - new_h) / 2)  # official padding_336: centred, the odd pixel goes to the bottom
    if tar != new_h:
        canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
        canvas.paste(img, (0, top))
        img = canvas
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def train_transform(img: Image.Image, hd_num: int = 18, resolution: int = 560) -> torch.Tensor:
    """Official ImageProcessorHD: geometry above, then ToTensor + CLIP normalise -> float32 (1,3,H,W)."""
    return normalize_rgb(np.array(train_transform_pil(img, hd_num, resolution), dtype=np.uint8))


def image_token_count(pixel_shape: Sequence[int], resolution: int = 560) -> int:
    """Tokens of one image in the GN layout: (h*w + 1)*400 + 1 + (h + 1)*20 for an h x w grid of crops."""
    h, w = pixel_shape[-2] // resolution, pixel_shape[-1] // resolution
    return (h * w + 1) * 400 + 1 + (h + 1) * 20


# ----------------------------------------------------------------------------------------------- labels
def mask_human_targets(ids: Sequence[int], eot_id: int, eos_id: int) -> List[int]:
    """Official label walk over one id stream (image positions already IGNORE).

    At the k-th end-of-turn id (0-based): even k closes a user turn -> positions [last_eoa, i + 6) become
    IGNORE (everything since the last answer, plus the assistant header); odd k closes an answer ->
    last_eoa = i + 1 (the '\\n' after it, masked later with the next user turn). At the first eos id:
    everything after it is IGNORE and the walk stops (the eos itself stays a target). Without an eos and
    with an even count (the stream ended after an answer, or was cut inside a user turn) everything after
    last_eoa + 1 becomes IGNORE, so the '\\n' after the last answer stays trained.
    """
    targets = list(ids)
    count, last_eoa, hit_eos = 0, 0, False
    for i, t in enumerate(ids):
        if t == eot_id:
            if count % 2 == 0:
                end = min(i + USER_END_SPAN, len(targets))
                targets[last_eoa:end] = [IGNORE] * max(end - last_eoa, 0)
            else:
                last_eoa = i + 1
            count += 1
        elif t == eos_id:
            targets[i + 1:] = [IGNORE] * (len(targets) - i - 1)
            hit_eos = True
            break
    if not hit_eos and count % 2 == 0:
        targets[last_eoa + 1:] = [IGNORE] * max(len(targets) - last_eoa - 1, 0)
    return targets


def special_ids(tokenizer) -> Tuple[int, int, int, int]:
    """(bos, eot, eos, pad) ids looked up from the tokenizer (never hard-coded)."""
    eot = tokenizer.convert_tokens_to_ids(EOT_PIECE)
    if eot is None or tokenizer.convert_ids_to_tokens(eot) != EOT_PIECE:
        raise TrainDataError(f"the tokenizer has no {EOT_PIECE} piece")
    return tokenizer.bos_token_id, eot, tokenizer.eos_token_id, tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------- wrapping
@dataclass
class WrappedSample:
    """One conversation as the official interleav_wrap builds it (before batch padding)."""

    ids: List[int]  # token ids, IGNORE at image positions
    im_mask: List[int]  # 1 on image positions
    labels: List[int]  # mask_human_targets(ids)
    segments: List[Tuple[str, object]] = field(default_factory=list)  # ('text', [ids]) / ('image', k)


def wrap_sample(text: str, image_lens: Sequence[int], tokenizer, max_length: int) -> WrappedSample:
    """Official interleav_wrap for one text with len(image_lens) images of the given token counts.

    One image and no '<ImageHere>' -> the tag goes in front (image first, BOS after it). Part k (when
    non-empty) is tokenized, the first non-empty part with BOS; image k follows part k. Appending stops once
    the running length exceeds max_length. Labels come from the stream before any cut."""
    _, eot, eos, _ = special_ids(tokenizer)
    n_img = len(image_lens)
    if n_img == 1 and IMAGE_TAG not in text:
        text = IMAGE_TAG + text
    ids, im_mask, segs = [], [], []
    need_bos = True
    for k, part in enumerate(text.split(IMAGE_TAG)):
        if part:
            p = tokenizer.encode(part, add_special_tokens=need_bos)
            need_bos = False
            ids += p
            im_mask += [0] * len(p)
            segs.append(("text", p))
        if k < n_img:
            ids += [IGNORE] * image_lens[k]
            im_mask += [1] * image_lens[k]
            segs.append(("image", k))
        if len(ids) > max_length:
            break
    return WrappedSample(ids, im_mask, mask_human_targets(ids, eot, eos), segs)


def pad_image_batch(samples: Sequence[WrappedSample], pad_id: int, max_length: int) -> dict:
    """Official batch of wrapped samples: right padding (id pad_id, label IGNORE, attention 0, im_mask 0),
    then every row cut to min(longest, max_length). Returns int64 tensors (B, L)."""
    n = min(max(len(s.ids) for s in samples), max_length)
    rows = {"input_ids": [], "labels": [], "attention_mask": [], "im_mask": []}
    for s in samples:
        extra = max(n - len(s.ids), 0)
        rows["input_ids"].append((s.ids + [pad_id] * extra)[:n])
        rows["labels"].append((s.labels + [IGNORE] * extra)[:n])
        rows["attention_mask"].append(([1] * len(s.ids) + [0] * extra)[:n])
        rows["im_mask"].append((s.im_mask + [0] * extra)[:n])
    return {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}


def text_batch(texts: Sequence[str], tokenizer, max_length: int) -> dict:
    """Official text2emb for a text-only batch: tokenizer(texts, padding='longest', truncation=True,
    max_length, add_special_tokens=True): BOS + ids cut to max_length, right-padded with the pad id (2);
    labels from mask_human_targets ON THE PADDED ids. Quirk kept: in a padded row the first pad is the eos
    id, so it is a trained target, and the '</', 's', '>' pieces before it are trained too (the walk sees
    an eos and never reaches its even-count rule); the longest row has no pad and trains none of them."""
    bos, eot, eos, pad = special_ids(tokenizer)
    rows = [([bos] + tokenizer.encode(t, add_special_tokens=False))[:max_length] for t in texts]
    n = max(len(r) for r in rows)
    ids = [r + [pad] * (n - len(r)) for r in rows]
    att = [[1] * len(r) + [0] * (n - len(r)) for r in rows]
    labels = [mask_human_targets(r, eot, eos) for r in ids]
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids), "labels": t(labels), "attention_mask": t(att), "im_mask": torch.zeros_like(t(ids))}


def item_text_and_images(item, where: str) -> Tuple[str, Optional[List[str]]]:
    """(conversation text, image paths or None) of one official JSON item."""
    if not isinstance(item, dict) or "conversations" not in item:
        raise TrainDataError(f"{where}: missing field 'conversations'")
    text = conv2text(item["conversations"], where)
    if "image" not in item:
        return text, None
    img = item["image"]
    if isinstance(img, str):
        return text, [img]
    if isinstance(img, list) and img and all(isinstance(p, str) for p in img):
        return text, list(img)
    raise TrainDataError(f"{where}: field 'image' must be a path or a non-empty list of paths")
