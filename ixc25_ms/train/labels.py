"""Training targets exactly as the official `mask_human_targets` builds them, and the official conversation text."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..prompt import EOT, IMAGE_ID, SOT

IGNORE = -100  # label of untrained positions (image tokens, user turns, padding)
USER_ROLES = ("human", "user")  # case-insensitive; every other `from` is the assistant, as conv2text does


def conv2text(conversations: Sequence[dict]) -> str:
    """The official `conv2text`: each turn `[UNUSED_TOKEN_146]{user|assistant}\\n{value.strip()}[UNUSED_TOKEN_145]\\n`,
    then the literal `</s>` — which the official slow tokenizer encodes as the text pieces `</`, `s`, `>`, not as
    the EOS id (so it is masked as text after the last answer, see `mask_human_targets`)."""
    out = ""
    for turn in conversations:
        role = "user" if str(turn["from"]).lower() in USER_ROLES else "assistant"
        out += f"{SOT}{role}\n{str(turn['value']).strip()}{EOT}\n"
    return out + "</s>"


def mask_human_targets(ids: np.ndarray, eot_id: int, eos_id: int) -> np.ndarray:
    """Labels from one id stream (image positions already IGNORE), the official walk with its quirks:

    - at each end-of-turn id: an even occurrence (end of a user turn) masks `[last_eoa, i + 6)` — the fixed `+6`
      covers `\\n [UNUSED_TOKEN_146] ass istant \\n` in the official tokenizer; an odd one (end of an answer) sets
      `last_eoa = i + 1`, so the answer, its end-of-turn id and (for the last answer) the `\\n` after it train;
    - at the first EOS id: everything after it is masked and the walk stops (the EOS itself trains) — reached
      only by padded text-only rows, whose pad id is the EOS id (see batch.py);
    - a stream ending without EOS on an even count (cut inside a user turn, or after the last answer) is masked
      after `last_eoa + 1`.
    The official compares with the hard-coded ids 92542 and 2; here they are looked up by piece by the caller."""
    targets = np.array(ids, np.int64, copy=True)
    end_count, last_eoa, last = 0, 0, None
    for i, t in enumerate(ids):
        last = int(t)
        if last == eot_id:
            if end_count % 2 == 0:
                targets[last_eoa:i + 6] = IGNORE
            else:
                last_eoa = i + 1
            end_count += 1
        elif last == eos_id:
            targets[i + 1:] = IGNORE
            break
    if last != eos_id and end_count % 2 == 0:
        targets[last_eoa + 1:] = IGNORE
    return targets


def count_trained(labels: np.ndarray) -> int:
    """Positions that contribute to the loss after the one-token shift (a label at position 0 never does)."""
    return int((np.asarray(labels)[..., 1:] != IGNORE).sum())


assert IMAGE_ID == IGNORE  # image positions of the id stream are untrained labels as they stand
