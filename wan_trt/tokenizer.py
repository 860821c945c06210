"""umT5 prompt tokenisation with the `tokenizers` library (no transformers at run time).

The tiny preset's tokenizer is built offline and deterministically: a Unigram model over single
characters plus a few whole words, with the T5 conventions (``<pad>`` = 0, ``</s>`` = 1 appended,
``<unk>`` = 2). Real checkpoints ship ``tokenizer.json`` (google/umt5-xxl), read the same way.
"""

from __future__ import annotations

import html
import re
import string
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from wan_trt.presets import DEFAULT_PROMPT, TEXT_TOKENS

_SPECIALS = ["<pad>", "</s>", "<unk>"]
_TINY_WORDS = ["the", "person", "in", "video", "is", "doing", "actions", "a", "dancer", "moves", "talks"]


def build_tiny_tokenizer() -> Tokenizer:
    """A small umT5-style tokenizer whose vocabulary never depends on training randomness."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _SPECIALS]
    pieces += [("▁" + w, -2.0) for w in _TINY_WORDS]
    pieces.append(("▁", -3.0))
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + DEFAULT_PROMPT))
    pieces += [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def clean_prompt(text: str) -> str:
    """The reference pipeline's prompt cleaning: fix text encoding, unescape HTML, collapse spaces."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unchanged without it
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def tokenize(tokenizer: Tokenizer, prompt: str, length: int = TEXT_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, each ``[1, length]`` int64, truncated and padded like umT5's pipeline."""
    encoding = tokenizer.encode(clean_prompt(prompt))
    ids = encoding.ids[:length]
    if len(encoding.ids) > length:
        ids[-1] = 1  # keep the end-of-sequence token, as a truncating T5 tokenizer does
    input_ids = np.zeros((1, length), dtype=np.int64)
    mask = np.zeros((1, length), dtype=np.int64)
    input_ids[0, : len(ids)] = ids
    mask[0, : len(ids)] = 1
    return input_ids, mask
