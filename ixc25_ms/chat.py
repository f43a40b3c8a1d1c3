"""Prompt assembly (interleav_wrap_chat), chat/stream_chat, streamers and the composition helpers of IXC2.5."""
from __future__ import annotations

import os
import re
import sys
from typing import Iterator, List, Optional, Sequence

import numpy as np
from mindspore import Tensor, ops

from .generate import GenerationConfig, iter_generate

IMAGE_TAG = "<ImageHere>"
META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image.")
WRITE_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n")
UNSPLASH = r"""https://source\.unsplash\.com/random/(\d+)x(\d+)/\?([^'"]+)"""


def turn(role: str, content: str) -> str:
    return f"[UNUSED_TOKEN_146]{role}\n{content}[UNUSED_TOKEN_145]\n"


def build_prompt(query: str, history=(), meta_instruction: str = "") -> str:
    """System turn (when given), history turns, then the user turn and the assistant header."""
    prompt = turn("system", meta_instruction) if meta_instruction else ""
    for q, a in history:
        prompt += turn("user", q) + turn("assistant", a)
    return prompt + turn("user", query) + "[UNUSED_TOKEN_146]assistant\n"


def _as_list(image) -> list:
    if image is None:
        return []
    if isinstance(image, (str, os.PathLike, np.ndarray)) or hasattr(image, "size") and hasattr(image, "mode"):
        return [image]
    return list(image)


def interleav_wrap_chat(model, query, image, history=(), meta_instruction="", max_length=16384, hd_num=24):
    """The official prompt assembly -> ({'inputs_embeds': (1,L,H)}, im_mask (1,L) bool Tensor, L).

    One image and no <ImageHere>: the tag goes at the very start. Several images: hd_num forced to 6.
    Only the first text part gets BOS (an empty first part still yields [BOS]); text parts and image
    embeddings are concatenated, then truncated to max_length."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("model.tokenizer is not set (ixc25_ms.load sets it; or assign model.tokenizer = tokenizer)")
    images = _as_list(image)
    model.max_length = max_length
    prompt = build_prompt(query, history, meta_instruction)
    if len(images) == 1 and IMAGE_TAG not in prompt:
        prompt = IMAGE_TAG + prompt
    parts = prompt.split(IMAGE_TAG)
    if len(parts) != len(images) + 1:
        raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TAG} tag(s) for {len(images)} image(s)")
    if len(images) > 1:
        hd_num = 6
    embeds, masks, total, need_bos = [], [], 0, True
    for i, part in enumerate(parts):
        if need_bos or part:
            ids = tok(part, add_special_tokens=need_bos).input_ids
            need_bos = False
            embeds.append(model.embed(np.asarray(ids, np.int64)[None]))
            masks.append(np.zeros(len(ids), bool))
            total += len(ids)
        if i < len(images):
            img = model.encode_img(images[i], hd_num).astype(model.compute_dtype)
            embeds.append(img)
            masks.append(np.ones(int(img.shape[1]), bool))
            total += int(img.shape[1])
        if total > max_length:
            break
    emb = ops.cat([e.astype(model.compute_dtype) for e in embeds], 1)[:, :max_length]
    im_mask = np.concatenate(masks)[None, :max_length]
    return {"inputs_embeds": emb}, Tensor(im_mask), total


def build_inputs(tokenizer, query, history=(), meta_instruction=""):
    """Text-only path (image=None): the official prepends the literal '<s>' and adds BOS too."""
    ids = tokenizer("<s>" + build_prompt(query, history, meta_instruction), add_special_tokens=True).input_ids
    return np.asarray(ids, np.int64)[None]


def eos_ids(tokenizer) -> List[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")]


def _prepare_chat(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction):
    if model.tokenizer is None:
        model.tokenizer = tokenizer
    meta = meta_instruction if use_meta else ""
    if image is None:
        ids = build_inputs(tokenizer, query, history, meta)
        return model.embed(ids), np.zeros(ids.shape, bool), ids
    inputs, im_mask, _ = interleav_wrap_chat(model, query, image, history, meta, hd_num=hd_num)
    return inputs["inputs_embeds"], im_mask, None


def _finish(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).split("[UNUSED_TOKEN_145]")[0]


def chat(model, tokenizer, query, image=(), hd_num=24, history=(), streamer=None, max_new_tokens=1024,
         do_sample=True, num_beams=1, temperature=1.0, top_p=0.8, repetition_penalty=1.005, infer_mode="base",
         use_meta=False, meta_instruction=META_INSTRUCTION, **kwargs):
    """One turn, as the official chat(): returns (response, history + [(query, response)])."""
    embeds, im_mask, ids = _prepare_chat(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction)
    out = model.generate(inputs_embeds=embeds, im_mask=im_mask, input_ids=ids, streamer=streamer,
                         max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                         temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                         eos_token_id=eos_ids(tokenizer), infer_mode=infer_mode, **kwargs)
    response = _finish(tokenizer, out[0])
    return response, list(history) + [(query, response)]


def stream_chat(model, tokenizer, query, image=(), hd_num=24, history=(), max_new_tokens=1024, do_sample=True,
                temperature=1.0, top_p=0.8, repetition_penalty=1.005, infer_mode="base", use_meta=False,
                meta_instruction=META_INSTRUCTION, seed=None, top_k=50, **unused) -> Iterator[str]:
    """Yields text pieces as they decode; their concatenation equals chat()'s response for the same settings."""
    embeds, im_mask, ids = _prepare_chat(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                           top_k=top_k, repetition_penalty=repetition_penalty, eos_token_id=eos_ids(tokenizer),
                           pad_token_id=model.cfg.pad_token_id, bos_token_id=model.cfg.bos_token_id,
                           infer_mode=infer_mode, seed=seed)
    dec = tokenizer.incremental_decoder(skip_special_tokens=True)
    marker = "[UNUSED_TOKEN_145]"
    sent, full = 0, ""
    for nxt in iter_generate(model, embeds, im_mask, None, gen, prompt_ids=ids):
        full += dec.put(int(nxt[0]))
        cut = full.find(marker)
        visible = full if cut < 0 else full[:cut]
        # hold back a possible partial marker at the end
        safe = len(visible) if cut >= 0 else max(len(visible) - len(marker) + 1, sent)
        for k in range(len(marker) - 1, 0, -1):
            if cut < 0 and visible.endswith(marker[:k]):
                safe = min(safe, len(visible) - k)
                break
        if safe > sent:
            yield visible[sent:safe]
            sent = safe
        if cut >= 0:
            return
    full += dec.flush()
    rest = full.split(marker)[0]
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


# ------------------------------------------------------------------------------------ composition helpers
def _strip_markers(text: str) -> str:
    return text.replace("[UNUSED_TOKEN_145]", "").replace("[UNUSED_TOKEN_146]", "")


def _web_generate(model, inst, image, max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed):
    inputs, im_mask, _ = interleav_wrap_chat(model, inst, image)
    out = model.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, do_sample=do_sample,
                         temperature=temperature, num_beams=num_beams, repetition_penalty=repetition_penalty,
                         max_new_tokens=max_new_tokens, infer_mode="web", eos_token_id=model.cfg.eos_token_id,
                         seed=None if seed == -1 else seed)
    return _strip_markers(model.tokenizer.decode([int(i) for i in out[0]], skip_special_tokens=True))


def _write_html(out: str, path: Optional[str]) -> str:
    out = re.sub(UNSPLASH, r"https://picsum.photos/\1/\2", out)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(out)
        os.replace(tmp, path)
    return out


def write_artical(model, inst, image=(), hd_num=25, history=(), streamer=None, max_new_tokens=1024, do_sample=True,
                  num_beams=1, temperature=1.0, top_p=0.8, repetition_penalty=1.005, max_length=8192, seed=-1,
                  use_meta=False, **kwargs):
    """Article writing ('write' LoRA): max_new_tokens = max_length - prompt length, top_p 0.8, top_k 40,
    stops on </s> or [UNUSED_TOKEN_145]. History is ignored, as in the official. Runs on CPU."""
    meta = WRITE_META_INSTRUCTION if use_meta else ""
    inputs, im_mask, n = interleav_wrap_chat(model, inst, image, meta_instruction=meta, max_length=max_length)
    out = model.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, do_sample=do_sample,
                         num_beams=num_beams, temperature=temperature, repetition_penalty=repetition_penalty,
                         max_new_tokens=max(max_length - n, 1), top_p=0.8, top_k=40, length_penalty=1.0,
                         eos_token_id=[model.cfg.eos_token_id, model.tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")],
                         infer_mode="write", streamer=streamer, seed=None if seed == -1 else seed)
    return _strip_markers(model.tokenizer.decode([int(i) for i in out[0]], skip_special_tokens=True))


def write_webpage(model, inst, image=(), max_new_tokens=4800, do_sample=True, num_beams=2, temperature=1.0,
                  repetition_penalty=3.0, seed=-1, use_meta=False, task="Instruction-aware Webpage Generation",
                  output_path: Optional[str] = None, **kwargs):
    """Webpage from an instruction ('web' LoRA). Writes HTML only to `output_path` when given."""
    out = _web_generate(model, inst, image, max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed)
    return _write_html(out, output_path)


def resume_2_webpage(model, inst, image=(), max_new_tokens=4800, do_sample=True, num_beams=2, temperature=1.0,
                     repetition_penalty=3.0, seed=-1, use_meta=False, task="Resume-to-Personal Page",
                     output_path: Optional[str] = None, **kwargs):
    """`inst` is a Markdown resume path: HTML pass, then a JavaScript pass merged into it."""
    try:
        with open(inst, encoding="utf-8") as f:
            resume = f.read()
    except OSError as e:
        raise ValueError(f"{inst}: cannot read the resume ({e.strerror}); resume_2_webpage takes a Markdown file path") from None
    args = (max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed)
    html = _web_generate(model, " Generate a personal page using the content in the resume:" + resume, image, *args)
    js = _web_generate(model, " Generate JavaScript events for the html code:" + html, image, *args)
    if re.search(r"</script>", html):
        scripts = re.findall(r"<script>([\s\S]*?)</script>", js)
        html = re.sub(r"(</script>)", lambda m: f"\n{scripts}\n" + m.group(1), html)
    elif re.search(r"</html>", html):
        html = re.sub(r"(</html>)", lambda m: f"\n{js}\n" + m.group(1), html)
    return _write_html(html, output_path)


def screen_2_webpage(model, inst, image=(), max_new_tokens=4800, do_sample=True, num_beams=2, temperature=1.0,
                     repetition_penalty=3.0, seed=-1, use_meta=False, task="Screenshot-to-Webpage",
                     output_path: Optional[str] = None, **kwargs):
    """HTML from a screenshot; the instruction is fixed, as in the official. Needs an image."""
    if not _as_list(image):
        raise ValueError("screen_2_webpage needs a screenshot image")
    inst = " Generate the HTML code of this web image with Tailwind CSS."
    out = _web_generate(model, inst, image, max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed)
    return _write_html(out, output_path)
