"""The composition helpers of IXC2.5: write_artical ('write' LoRA) and the webpage methods ('web' LoRA)."""
from __future__ import annotations

import os
import re
from typing import Optional

from .chat import as_image_list, eos_ids, interleav_wrap_chat
from .generation import GenerationConfig, generate
from .prompt import EOT, SOT

WRITE_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n")
UNSPLASH = r"""https://source\.unsplash\.com/random/(\d+)x(\d+)/\?([^'"]+)"""


def _strip_markers(text: str) -> str:
    return text.replace(EOT, "").replace(SOT, "")


def _generate_text(model, wrapped, streamer=None, **gen_kwargs) -> str:
    """Generation from interleav_wrap_chat's output; the response with the turn markers removed."""
    inputs, im_mask, _ = wrapped
    gen = GenerationConfig.build(model.cfg, **gen_kwargs)
    out = model.timed("generate_s", generate, model, inputs["inputs_embeds"], im_mask, None, gen, streamer)
    return _strip_markers(model.tokenizer.decode([int(i) for i in out[0]], skip_special_tokens=True))


def _web_generate(model, inst, image, max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed):
    wrapped = interleav_wrap_chat(model, inst, image)
    return _generate_text(model, wrapped, do_sample=do_sample, temperature=temperature, num_beams=num_beams,
                          repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, infer_mode="web",
                          eos_token_id=model.cfg.eos_token_id, seed=None if seed == -1 else seed)


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
    wrapped = interleav_wrap_chat(model, inst, image, meta_instruction=meta, max_length=max_length)
    n = wrapped[2]
    return _generate_text(model, wrapped, streamer, do_sample=do_sample, num_beams=num_beams,
                          temperature=temperature, repetition_penalty=repetition_penalty,
                          max_new_tokens=max(max_length - n, 1), top_p=0.8, top_k=40, length_penalty=1.0,
                          eos_token_id=eos_ids(model.tokenizer), infer_mode="write",
                          seed=None if seed == -1 else seed)


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
    if not as_image_list(image):
        raise ValueError("screen_2_webpage needs a screenshot image")
    inst = " Generate the HTML code of this web image with Tailwind CSS."
    out = _web_generate(model, inst, image, max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed)
    return _write_html(out, output_path)
