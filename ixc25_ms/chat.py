"""Chat on IXC2.5: the official prompt assembly (interleav_wrap_chat), chat / stream_chat, and a text streamer."""
from __future__ import annotations

import os
import sys
from typing import Iterator, List

import numpy as np
from mindspore import Tensor, ops

from .generation import GenerationConfig, generate, iter_generate
from .prompt import EOT, IMAGE_TAG, build_chat_text, interleave, text_prompt

META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image.")
build_prompt = build_chat_text  # the official name of the text template


def as_image_list(image) -> list:
    if image is None:
        return []
    if isinstance(image, (str, os.PathLike, np.ndarray)) or hasattr(image, "size") and hasattr(image, "mode"):
        return [image]
    return list(image)


def interleav_wrap_chat(model, query, image, history=(), meta_instruction="", max_length=16384, hd_num=24):
    """The official prompt assembly -> ({'inputs_embeds': (1,L,H)}, im_mask (1,L) bool Tensor, L before the cut).

    One image and no <ImageHere>: the tag goes at the very start. Several images: hd_num forced to 6.
    Only the first text part gets BOS (an empty first part still yields [BOS]); text parts and image
    embeddings are concatenated, then truncated to max_length. The prompt structure (ids, roles) is
    `model.last_prompt`."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("model.tokenizer is not set (ixc25_ms.load sets it; or assign model.tokenizer = tokenizer)")
    images = as_image_list(image)
    if len(images) > 1:
        hd_num = 6
    image_embeds = []

    def encode(i):  # images are encoded in order, only as long as the prompt is not past max_length
        image_embeds.append(model.encode_img(images[i], hd_num).astype(model.compute_dtype))
        return int(image_embeds[-1].shape[1])

    prompt = interleave(tok, build_chat_text(query, history, meta_instruction), len(images), encode, max_length,
                        bos_on_empty_first=True)
    model.last_prompt = prompt
    emb = model.embed_prompt(prompt, image_embeds)[:, :max_length]
    return {"inputs_embeds": emb}, Tensor(prompt.im_mask()[None, :max_length]), len(prompt)


def build_inputs(tokenizer, query, history=(), meta_instruction=""):
    """Text-only path (image=None): the official prepends the literal '<s>' and adds BOS too."""
    return text_prompt(tokenizer, "<s>" + build_chat_text(query, history, meta_instruction)).ids()[None]


def eos_ids(tokenizer) -> List[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)]


def prepare_chat(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction):
    """-> (embeds (1,L,H), im_mask (1,L), prompt ids (1,L) for the text-only path else None)."""
    if model.tokenizer is None:
        model.tokenizer = tokenizer
    meta = meta_instruction if use_meta else ""
    if image is None:
        ids = build_inputs(tokenizer, query, history, meta)
        return model.embed(ids), np.zeros(ids.shape, bool), ids
    inputs, im_mask, _ = interleav_wrap_chat(model, query, image, history, meta, hd_num=hd_num)
    return inputs["inputs_embeds"], im_mask, None


def finish(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).split(EOT)[0]


def chat_config(model, tokenizer, **kwargs) -> GenerationConfig:
    """The generation settings of a chat turn: the caller's, stopping at </s> or the end-of-turn marker."""
    return GenerationConfig.build(model.cfg, **dict(kwargs, eos_token_id=eos_ids(tokenizer)))


def chat(model, tokenizer, query, image=(), hd_num=24, history=(), streamer=None, max_new_tokens=1024,
         do_sample=True, num_beams=1, temperature=1.0, top_p=0.8, repetition_penalty=1.005, infer_mode="base",
         use_meta=False, meta_instruction=META_INSTRUCTION, **kwargs):
    """One turn, as the official chat(): returns (response, history + [(query, response)])."""
    embeds, im_mask, ids = prepare_chat(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction)
    gen = chat_config(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                      temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                      infer_mode=infer_mode, **kwargs)
    out = model.timed("generate_s", generate, model, embeds, im_mask, None, gen, streamer, prompt_ids=ids)
    response = finish(tokenizer, out[0])
    return response, list(history) + [(query, response)]


def stream_chat(model, tokenizer, query, image=(), hd_num=24, history=(), max_new_tokens=1024, do_sample=True,
                temperature=1.0, top_p=0.8, repetition_penalty=1.005, infer_mode="base", use_meta=False,
                meta_instruction=META_INSTRUCTION, **kwargs) -> Iterator[str]:
    """Yields text pieces as they decode; their concatenation equals chat()'s response for the same settings."""
    embeds, im_mask, ids = prepare_chat(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction)
    gen = chat_config(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                      top_p=top_p, repetition_penalty=repetition_penalty, infer_mode=infer_mode, **kwargs)
    dec = tokenizer.incremental_decoder(skip_special_tokens=True)
    sent, full = 0, ""
    for nxt in iter_generate(model, embeds, im_mask, None, gen, prompt_ids=ids):
        full += dec.put(int(nxt[0]))
        cut = full.find(EOT)
        visible = full if cut < 0 else full[:cut]
        # hold back a possible partial marker at the end
        safe = len(visible) if cut >= 0 else max(len(visible) - len(EOT) + 1, sent)
        for k in range(len(EOT) - 1, 0, -1):
            if cut < 0 and visible.endswith(EOT[:k]):
                safe = min(safe, len(visible) - k)
                break
        if safe > sent:
            yield visible[sent:safe]
            sent = safe
        if cut >= 0:
            return
    full += dec.flush()
    rest = full.split(EOT)[0]
    if len(rest) > sent:
        yield rest[sent:]


class TextStreamer:
    """Prints text as tokens arrive (transformers' streamer protocol: put(ids), end())."""

    def __init__(self, tokenizer, file=None):
        self.dec = tokenizer.incremental_decoder(skip_special_tokens=True)
        self.file = file or sys.stdout

    def put(self, ids):
        text = self.dec.put([int(i) for i in np.asarray(ids).reshape(-1)][:1])
        if text:
            print(text, end="", file=self.file, flush=True)

    def end(self):
        print(self.dec.flush(), file=self.file, flush=True)
