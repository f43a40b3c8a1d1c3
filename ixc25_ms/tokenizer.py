"""InternLM2 tokenizer on sentencepiece, mirroring the official (transformers 4.33) InternLM2Tokenizer."""
import os

import numpy as np
import sentencepiece as spm

VOCAB_FILE = "tokenizer.model"
EOT_PIECE = "[UNUSED_TOKEN_145]"  # end of turn
SOT_PIECE = "[UNUSED_TOKEN_146]"  # start of turn

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text):
    """transformers' `clean_up_tokenization` (the official convert_tokens_to_string always applies it)."""
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text


class BatchEncoding(dict):
    """dict of model inputs that also allows attribute access (`enc.input_ids`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _to_id_list(ids):
    """Flatten ints / lists / numpy / torch / mindspore 1-D ids into a list of Python ints."""
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    if hasattr(ids, "asnumpy"):
        ids = ids.asnumpy()
    elif hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim > 1:
        raise ValueError(f"decode expects one sequence of ids, got shape {arr.shape}; use batch_decode")
    return [int(i) for i in arr.reshape(-1)]


def _as_tensor(rows, return_tensors):
    """Turn equal-length rows of ints into a (B, L) int64 array/tensor of the requested kind."""
    if len({len(r) for r in rows}) > 1:
        raise ValueError("sequences have different lengths; pass padding=True to stack them")
    arr = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    if return_tensors == "np":
        return arr
    if return_tensors == "pt":
        import torch
        return torch.from_numpy(arr)
    if return_tensors == "ms":
        import mindspore
        return mindspore.Tensor(arr)
    raise ValueError(f"return_tensors must be None, 'np', 'pt' or 'ms', got {return_tensors!r}")


class InternLM2Tokenizer:
    """SentencePiece tokenizer with the behaviour of the official InternLM2/IXC2.5 tokenizer.

    BOS is prepended when `add_special_tokens` (add_bos_token=True, add_eos_token=False); pad is '</s>'.
    Text is encoded by sentencepiece alone, so a literal "<s>" becomes the pieces "<s", ">", and the
    USER_DEFINED turn markers `[UNUSED_TOKEN_146]` / `[UNUSED_TOKEN_145]` are matched inside text.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, add_bos_token=True, add_eos_token=False, padding_side="right", **kwargs):
        """Load `vocab_file` (a sentencepiece .model); extra HF kwargs are accepted and ignored."""
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"tokenizer model not found: {vocab_file}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(vocab_file)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise ValueError(f"{vocab_file} is not a sentencepiece model ({exc})") from None
        self.sp_model = sp
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.padding_side = padding_side
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = "<s>", "</s>", "<unk>", "</s>"
        self._special_ids = frozenset(i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id)
                                      if i is not None and i >= 0)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load from a directory holding tokenizer.model, or from the .model file itself."""
        path = os.fspath(path)
        vocab_file = os.path.join(path, VOCAB_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"tokenizer model not found: {vocab_file}")
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("use_fast", None)
        return cls(vocab_file, **kwargs)

    # ---- ids of special pieces
    def _lookup(self, piece):
        i = self.sp_model.piece_to_id(piece)
        return i if self.sp_model.id_to_piece(i) == piece else None

    @property
    def vocab_size(self):
        """Number of sentencepiece pieces."""
        return self.sp_model.get_piece_size()

    def __len__(self):
        return self.vocab_size

    @property
    def bos_token_id(self):
        """Id of '<s>'."""
        return self._lookup(self.bos_token)

    @property
    def eos_token_id(self):
        """Id of '</s>'."""
        return self._lookup(self.eos_token)

    @property
    def pad_token_id(self):
        """Id of the pad token ('</s>', same as eos)."""
        return self._lookup(self.pad_token)

    @property
    def unk_token_id(self):
        """Id of '<unk>'."""
        return self._lookup(self.unk_token)

    @property
    def eot_token_id(self):
        """Id of '[UNUSED_TOKEN_145]' (end of turn), None when the model lacks it."""
        return self._lookup(EOT_PIECE)

    @property
    def sot_token_id(self):
        """Id of '[UNUSED_TOKEN_146]' (start of turn), None when the model lacks it."""
        return self._lookup(SOT_PIECE)

    @property
    def all_special_tokens(self):
        """HF special tokens (the ones skip_special_tokens removes)."""
        return [self.bos_token, self.eos_token, self.unk_token]

    @property
    def all_special_ids(self):
        """Ids of `all_special_tokens`."""
        return [self.bos_token_id, self.eos_token_id, self.unk_token_id]

    def get_vocab(self):
        """Mapping piece -> id."""
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    # ---- encoding
    def tokenize(self, text):
        """Text -> list of pieces (no special tokens added)."""
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """Add BOS (and EOS when add_eos_token) around one or two id lists."""
        out = ([self.bos_token_id] if self.add_bos_token else []) + list(token_ids_0)
        if token_ids_1 is not None:
            out = out + list(token_ids_1)
        if self.add_eos_token:
            out = out + [self.eos_token_id]
        return out

    def encode(self, text, add_special_tokens=True):
        """Text -> list of ids, with BOS when add_special_tokens."""
        ids = self.sp_model.encode(text)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text, add_special_tokens=True, return_tensors=None, padding=False,
                 return_attention_mask=True):
        """Encode a string (or a list of strings) -> BatchEncoding with input_ids (+ attention_mask).

        return_tensors: None (lists), 'np' (int64 (B, L) arrays), 'pt' (torch) or 'ms' (mindspore).
        A single string gives B = 1 for tensors and a flat list otherwise, as in transformers.
        padding: True / 'longest' pads a batch to its longest row with pad_token_id on `padding_side`.
        """
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([text] if single else text)]
        masks = [[1] * len(r) for r in rows]
        if padding not in (False, None, "do_not_pad"):
            if padding not in (True, "longest"):
                raise ValueError(f"padding must be False, True or 'longest', got {padding!r}")
            n = max((len(r) for r in rows), default=0)
            for k, r in enumerate(rows):
                fill, mfill = [self.pad_token_id] * (n - len(r)), [0] * (n - len(r))
                if self.padding_side == "left":
                    rows[k], masks[k] = fill + r, mfill + masks[k]
                else:
                    rows[k], masks[k] = r + fill, masks[k] + mfill
        enc = BatchEncoding()
        if return_tensors is not None:
            enc["input_ids"] = _as_tensor(rows, return_tensors)
            if return_attention_mask:
                enc["attention_mask"] = _as_tensor(masks, return_tensors)
        else:
            enc["input_ids"] = rows[0] if single else rows
            if return_attention_mask:
                enc["attention_mask"] = masks[0] if single else masks
        return enc

    # ---- conversion
    def convert_tokens_to_ids(self, tokens):
        """Piece (or list of pieces) -> id (or list); unknown pieces give unk_token_id."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self.sp_model.piece_to_id(tokens)
        return [self.sp_model.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """Id (or list of ids) -> piece (or list); skip_special_tokens drops bos/eos/unk/pad."""
        if isinstance(ids, (int, np.integer)):
            return self.sp_model.id_to_piece(int(ids))
        return [self.sp_model.id_to_piece(i) for i in _to_id_list(ids)
                if not (skip_special_tokens and i in self._special_ids)]

    def convert_tokens_to_string(self, tokens):
        """Pieces -> text, exactly as the official convert_tokens_to_string."""
        return self._ids_to_string([self.sp_model.piece_to_id(t) for t in tokens])

    def _ids_to_string(self, ids):
        # Official algorithm: runs of normal pieces go through sp.decode, special tokens are emitted as
        # text with a space put *before* the pending run when the previous token was not special; then
        # clean_up_tokenization; then " " + text (its prefix-space check compares a str against a set of
        # ints, so it always fires) and [1:], which cancel.
        out, run, prev_special = "", [], False
        for i in ids:
            if i in self._special_ids:
                if not prev_special:
                    out += " "
                out += self.sp_model.decode(run) + self.sp_model.id_to_piece(i)
                run, prev_special = [], True
            else:
                run.append(i)
                prev_special = False
        out += self.sp_model.decode(run)
        return clean_up_tokenization(out)

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """Ids -> text like the official tokenizer (transformers 4.33.2).

        skip_special_tokens drops bos/eos/unk/pad only; the turn markers are ordinary (USER_DEFINED)
        pieces and stay. Note the official quirks kept here: `clean_up_tokenization` is always applied
        (" ." -> "." etc.), and with special tokens kept a space appears before each run of text that
        precedes a special token (decode([1, x]) == " <s>" + text).
        """
        ids = _to_id_list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        text = self._ids_to_string(ids)
        if clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs):
        """decode() for each sequence of a batch."""
        if hasattr(sequences, "asnumpy"):
            sequences = sequences.asnumpy()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def incremental_decoder(self, skip_special_tokens=True):
        """A new IncrementalDecoder bound to this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


def _utf8_len(lead):
    """Sequence length a UTF-8 lead byte announces (lenient, as sentencepiece: C0-DF 2, E0-EF 3, F0-FF 4)."""
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get newly completed text.

    Holds back (a) byte-fallback pieces that end in an unfinished UTF-8 sequence and (b) the last
    characters when a space sits among them, since `clean_up_tokenization` (" ." -> ".", " n't" ->
    "n't", ...) may still rewrite them. With skip_special_tokens=True (what chat uses) the
    concatenation of put() results and flush() equals tokenizer.decode(ids, skip_special_tokens=True).
    With skip_special_tokens=False, bos/eos/unk are emitted as their text but without the official
    decode's extra space before the preceding run (that space would have to be inserted into text
    already streamed).
    """

    _HOLD = 3  # longest cleanup pattern (" n't") minus 1

    def __init__(self, tokenizer, skip_special_tokens=True):
        """Bind to an InternLM2Tokenizer."""
        self.tok = tokenizer
        self.sp = tokenizer.sp_model
        self.skip_special_tokens = skip_special_tokens
        self._byte_val = {}
        self.reset()

    def reset(self):
        """Forget all state."""
        self._pending = []  # ids not yet turned into text (trailing byte pieces)
        self._raw = ""      # decoded text not yet cleaned up and emitted
        self.text = ""      # everything emitted so far

    def _byte(self, i):
        # value of a byte-fallback piece '<0xAB>', or None
        if i not in self._byte_val:
            self._byte_val[i] = int(self.sp.id_to_piece(i)[3:5], 16) if self.sp.is_byte(i) else None
        return self._byte_val[i]

    def _incomplete_tail(self):
        # do the trailing byte pieces end inside a UTF-8 sequence that later bytes may complete?
        tail = []
        for i in reversed(self._pending[-4:]):
            b = self._byte(i)
            if b is None:
                break
            tail.append(b)
        for k, b in enumerate(tail):  # tail is reversed: tail[0] is the last byte
            if 0x80 <= b < 0xC0:
                continue
            return _utf8_len(b) > k + 1
        return False

    def _emit(self, final=False):
        raw = self._raw
        cut = len(raw)
        if not final:
            while cut > 0 and " " in raw[max(0, cut - self._HOLD):cut]:
                cut -= 1
        out = clean_up_tokenization(raw[:cut])
        self._raw = raw[cut:]
        self.text += out
        return out

    def put(self, token_id):
        """Add one id (or an iterable of ids); return the text that became final."""
        if not isinstance(token_id, (int, np.integer)):
            return "".join(self.put(i) for i in _to_id_list(token_id))
        i = int(token_id)
        if i in self.tok._special_ids:
            if self.skip_special_tokens:
                return ""
            self._raw += self.sp.decode(self._pending) + self.sp.id_to_piece(i)
            self._pending = []
            return self._emit()
        self._pending.append(i)
        if self._byte(i) is not None and self._incomplete_tail():
            return ""
        self._raw += self.sp.decode(self._pending)
        self._pending = []
        return self._emit()

    def flush(self):
        """End of stream: return everything still held back (unfinished bytes decode to U+FFFD)."""
        self._raw += self.sp.decode(self._pending)
        self._pending = []
        return self._emit(final=True)

    end = flush
