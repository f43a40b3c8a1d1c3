"""The prompt structure shared by chat and fine-tuning: text segments of token ids, image slots, a role per token."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

IMAGE_TAG = "<ImageHere>"
IMAGE_ID = -100  # the id stream's value at image positions (the official training code's convention)
SOT, EOT = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"  # start / end of a turn (USER_DEFINED pieces)
# role codes per token
PAD, IMAGE, OTHER, SYSTEM, USER, ASSISTANT = range(6)
ROLE_NAMES = ("pad", "image", "other", "system", "user", "assistant")
_TURN_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def turn(role: str, content: str) -> str:
    return f"{SOT}{role}\n{content}{EOT}\n"


@dataclass
class Segment:
    """A run of text token ids, or one image slot (`image` = its index among the prompt's images)."""

    ids: Optional[np.ndarray] = None  # text: int64 (n,)
    image: Optional[int] = None
    length: int = 0  # tokens: len(ids) for text, the image's token count for an image slot

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclass
class Prompt:
    """Segments in sequence order. `ids()` is the id stream with IMAGE_ID at image positions, from which chat
    builds embeddings and fine-tuning builds labels; `roles()` gives each token's role."""

    segments: List[Segment] = field(default_factory=list)
    eot_id: Optional[int] = None
    sot_id: Optional[int] = None
    role_of: dict = field(default_factory=dict)  # token id sequence after SOT (as a tuple) -> role code

    def __len__(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def num_images(self) -> int:
        return sum(1 for s in self.segments if s.is_image)

    def ids(self) -> np.ndarray:
        return np.concatenate([s.ids if not s.is_image else np.full(s.length, IMAGE_ID, np.int64)
                               for s in self.segments]) if self.segments else np.zeros(0, np.int64)

    def im_mask(self) -> np.ndarray:
        return self.ids() == IMAGE_ID

    def roles(self, tokenizer=None) -> np.ndarray:
        """Role code per token: image slots IMAGE; a turn (its SOT marker through the EOT marker and the newline
        after it) the turn's role; anything else (BOS, trailing text) OTHER."""
        ids = self.ids()
        out = np.full(len(ids), OTHER, np.int64)
        role, i = OTHER, 0
        while i < len(ids):
            t = ids[i]
            if t == IMAGE_ID:
                out[i] = IMAGE
            elif t == self.sot_id and tokenizer is not None:
                role, n = _read_role(ids, i + 1, tokenizer)
                out[i:i + 1 + n] = role
                i += 1 + n
                continue
            else:
                out[i] = role
                if t == self.eot_id and role != OTHER:  # the newline after the EOT marker closes the turn
                    if i + 1 < len(ids) and tokenizer is not None and tokenizer.decode([int(ids[i + 1])]) == "\n":
                        out[i + 1] = role
                        i += 1
                    role = OTHER
            i += 1
        return out


def _read_role(ids, start: int, tokenizer):
    """The role name after a SOT marker: tokens decoded up to the first newline -> (role code, tokens read)."""
    text, n = "", 0
    while start + n < len(ids) and ids[start + n] != IMAGE_ID:
        text += tokenizer.decode([int(ids[start + n])])
        n += 1
        if "\n" in text:
            break
    return _TURN_ROLES.get(text.split("\n")[0].strip(), OTHER), n


def tags_fit(tags: int, n_images: int) -> bool:
    """The official rule for a prompt's `<ImageHere>` tags: one per picture, or none for one picture (it then goes
    first)."""
    return tags == n_images or (tags == 0 and n_images == 1)


def placeholder_mismatch(questions: Sequence[str], n_images: int, alone: bool = False):
    """(index, why) of the first of these user turns, asked in order with `n_images` pictures, that chat would
    refuse, or None. Chat counts the `<ImageHere>` tags of the chat so far (the earlier questions come back as
    history; each turn alone with `alone`): they must equal the pictures, or be none for one picture (it then
    goes first)."""
    tags = 0
    for k, q in enumerate(questions):
        tags = q.count(IMAGE_TAG) + (0 if alone else tags)
        if not tags_fit(tags, n_images):
            return k, f"{tags} {IMAGE_TAG} placeholder(s) in the chat so far for {n_images} picture(s)"
    return None


def interleave(tokenizer, text: str, n_images: int, image_tokens: Callable[[int], int], max_length: int,
               bos_on_empty_first: bool) -> Prompt:
    """Splits `text` at `<ImageHere>` into text segments and image slots, the official way.

    One image and no tag: the tag goes at the very start (so the image comes first). Text parts are tokenized
    separately; only the first gets BOS — with `bos_on_empty_first` (chat's interleav_wrap_chat) the first part
    is tokenized even when empty ([BOS]); without it (training's interleav_wrap) empty parts are skipped and BOS
    goes to the first non-empty one. `image_tokens(i)` gives image i's token count (chat encodes the image
    there). Parts stop being appended once the running length exceeds max_length (the caller truncates)."""
    tags = text.count(IMAGE_TAG)
    if not tags_fit(tags, n_images):
        raise ValueError(f"the prompt has {tags} {IMAGE_TAG} tag(s) for {n_images} image(s)")
    if tags == 0 and n_images == 1:
        text = IMAGE_TAG + text
    parts = text.split(IMAGE_TAG)
    prompt = Prompt(eot_id=_piece(tokenizer, EOT), sot_id=_piece(tokenizer, SOT))
    total, need_bos = 0, True
    for i, part in enumerate(parts):
        if part or (need_bos and bos_on_empty_first):
            ids = np.asarray(tokenizer(part, add_special_tokens=need_bos).input_ids, np.int64)
            need_bos = False
            prompt.segments.append(Segment(ids=ids, length=len(ids)))
            total += len(ids)
        if i < n_images:
            n = int(image_tokens(i))
            prompt.segments.append(Segment(image=i, length=n))
            total += n
        if total > max_length:
            break
    return prompt


def text_prompt(tokenizer, text: str, add_bos: bool = True) -> Prompt:
    """A prompt of one text segment."""
    ids = np.asarray(tokenizer(text, add_special_tokens=add_bos).input_ids, np.int64)
    return Prompt([Segment(ids=ids, length=len(ids))], eot_id=_piece(tokenizer, EOT), sot_id=_piece(tokenizer, SOT))


def _piece(tokenizer, piece: str) -> Optional[int]:
    i = tokenizer.convert_tokens_to_ids(piece)
    return None if i is None or i == getattr(tokenizer, "unk_token_id", None) else int(i)


def build_chat_text(query: str, history: Sequence = (), meta_instruction: str = "") -> str:
    """System turn (when given), history turns, then the user turn and the assistant header."""
    prompt = turn("system", meta_instruction) if meta_instruction else ""
    for q, a in history:
        prompt += turn("user", q) + turn("assistant", a)
    return prompt + turn("user", query) + f"{SOT}assistant\n"
