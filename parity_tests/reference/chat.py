"""Our PyTorch reference of one official chat() turn (greedy): prompt assembly, vision path, cached decoding."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from parity_tests.reference.language import RefLM
from parity_tests.reference.towers import vision_reference

SOT, EOT, TAG = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "<ImageHere>"
VISION = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")


class RefChat:
    """chat(tokenizer, query, [image], history, do_sample=False) written from the spec (§1, §7, §8, §11):
    '<ImageHere>' first when one image has no tag, only the first text part with BOS (an empty one included),
    hd_num 6 for several images, image tokens with the partial LoRA, generation seeded with a placeholder BOS
    that joins the repetition-penalty set, stop at </s> or [UNUSED_TOKEN_145]."""

    def __init__(self, cfg, state, tokenizer, preprocess):
        self.cfg, self.tok = cfg, tokenizer
        self.lm = RefLM(cfg, state)
        self.vis = vision_reference({k: v for k, v in state.items() if k.startswith(VISION)}, cfg.vision)
        self.preprocess = preprocess  # (image, hd_num) -> normalised pixels (1, 3, H, W)

    def prompt(self, query: str, history: Sequence[Tuple[str, str]]) -> str:
        text = "".join(f"{SOT}user\n{q}{EOT}\n{SOT}assistant\n{a}{EOT}\n" for q, a in history)
        return text + f"{SOT}user\n{query}{EOT}\n{SOT}assistant\n"

    @torch.no_grad()
    def embeds(self, query: str, images: List, history=(), hd_num: int = 24):
        text = self.prompt(query, history)
        if len(images) == 1 and TAG not in text:
            text = TAG + text
        if len(images) > 1:
            hd_num = 6
        parts = text.split(TAG)
        pieces, mask = [], []
        for i, part in enumerate(parts):
            if i == 0 or part:
                ids = self.tok(part, add_special_tokens=(i == 0)).input_ids
                pieces.append(self.lm.embed(torch.tensor([ids])))
                mask.append(torch.zeros(len(ids), dtype=torch.bool))
            if i < len(images):
                _, emb = self.vis.encode(self.preprocess(images[i], hd_num))
                pieces.append(emb)
                mask.append(torch.ones(emb.shape[1], dtype=torch.bool))
        return torch.cat(pieces, 1), torch.cat(mask)[None]

    @torch.no_grad()
    def chat(self, query: str, images: List, history=(), hd_num: int = 24, max_new_tokens: int = 48,
             repetition_penalty: float = 1.005) -> str:
        embeds, im = self.embeds(query, images, history, hd_num)
        stop = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids(EOT)}
        seen = [self.cfg.bos_token_id]  # generate(inputs_embeds=...) starts from a placeholder BOS
        logits, _, past = self.lm.forward(embeds, im)
        n = embeds.shape[1]
        out = []
        for _ in range(max_new_tokens):
            s = logits[0, -1].double().clone()
            for t in set(seen):
                s[t] = s[t] * repetition_penalty if s[t] < 0 else s[t] / repetition_penalty
            nxt = int(torch.argmax(s))
            out.append(nxt)
            seen.append(nxt)
            if nxt in stop:
                break
            n += 1
            logits, _, past = self.lm.forward(self.lm.embed(torch.tensor([[nxt]])), None,
                                              torch.ones(1, n, dtype=torch.long), past=past)
        return self.tok.decode(out, skip_special_tokens=True).split(EOT)[0]
