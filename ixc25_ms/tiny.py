"""Deterministic tiny InternLM2-style sentencepiece tokenizer, trained on the spot for tests and demos."""
import io
import os
import sys

import sentencepiece as spm

# Fixed training text: mixed English / Chinese / code, with the chat turn layout.
CORPUS = """\
[UNUSED_TOKEN_146]user
Describe this image in detail.[UNUSED_TOKEN_145]
[UNUSED_TOKEN_146]assistant
The image shows a small red car parked in front of a white building. There are two trees on the left.[UNUSED_TOKEN_145]
[UNUSED_TOKEN_146]user
What is the weather like in the picture?[UNUSED_TOKEN_145]
[UNUSED_TOKEN_146]assistant
It looks sunny, with a clear blue sky and a few clouds near the horizon.[UNUSED_TOKEN_145]
[UNUSED_TOKEN_146]system
You are an AI assistant whose name is InternLM-XComposer.[UNUSED_TOKEN_145]
A picture is worth a thousand words. The model reads images, videos and text, and writes answers,
articles and web pages. It can compare two images and describe what changed between them.
Large vision language models combine a vision encoder with a language model. The vision encoder turns
an image into a sequence of features; a projector maps them into the embedding space of the language model.
In 2024 the team released version 2.5, which supports long contexts of 24000 tokens and 96K with RoPE.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 365 2048 3.14159 1e-5 0.8 1.005
这是一张图片。请描述这张图片。
图片中有一个大模型。这是模型。
def greet(name):
    \"\"\"Return a greeting.\"\"\"
    return f"Hello, {name}!"

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5

for i in range(10):
    if i % 2 == 0:
        print(i, greet("world"))
import numpy as np
x = np.zeros((3, 4), dtype=np.float32)
y = [a + b for a, b in zip(range(5), range(5, 10))]
{"query": "Describe this image.", "history": [], "max_new_tokens": 1024, "top_p": 0.8}
Please describe the image in detail. The picture contains a cat, a dog and a red ball on the grass.
Write an article about the history of the city, with three sections and a short summary at the end.
Generate the HTML code of this web page with a title, a menu, an image gallery and a contact form.
The assistant answers the question, then the user asks another question about the same image.
When the video starts, a man walks into the room, opens the window and looks at the garden outside.
Compare the two pictures: the first one was taken in the morning and the second one in the evening.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
Symbols: -> => != == <= >= * _ + = / ; :
"""

MARKERS = ["[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_130]"]
MIN_VOCAB, MAX_VOCAB = 355, 1530  # measured with sentencepiece 0.2.3 for CORPUS


def train_tiny_tokenizer(out_path, vocab_size=400, corpus=None, pieces=()):
    """Train a BPE sentencepiece model with the official InternLM2 settings; write it to out_path.

    Same settings as the golden tiny tokenizer (and the real one): BPE, byte_fallback, split_digits,
    identity normalizer, no dummy prefix, whitespace kept, <unk>=0 <s>=1 </s>=2, then the
    USER_DEFINED markers [UNUSED_TOKEN_146]=3, [UNUSED_TOKEN_145]=4, [UNUSED_TOKEN_130]=5.
    Deterministic (one thread, fixed corpus): equal arguments give byte-identical files.
    vocab_size must lie in [MIN_VOCAB, MAX_VOCAB] (the corpus' characters + 262 meta/byte pieces, and the
    number of merges the corpus allows). `corpus`: other training lines (the bounds are then the caller's).
    `pieces`: more USER_DEFINED pieces after the markers (matched before BPE wherever they occur).
    Returns out_path.
    """
    if corpus is None and not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB}] for the built-in corpus, got {vocab_size}")
    buf = io.BytesIO()
    with open(os.devnull, "w") as devnull:
        # sentencepiece's log redirection needs a real stderr fd (absent under pytest capture or a GUI)
        try:
            sys.stderr.fileno()
            quiet = {"logstream": devnull}
        except (AttributeError, OSError, ValueError):
            quiet = {"minloglevel": 2}
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS.splitlines() if corpus is None else list(corpus)),
            model_writer=buf,
            model_prefix="",
            **quiet,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=list(MARKERS) + list(pieces),
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            num_threads=1,
        )
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(buf.getvalue())
    return out_path
