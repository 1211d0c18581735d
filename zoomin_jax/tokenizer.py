"""CLIP BPE tokenizer, token-for-token open_clip's `get_tokenizer('ViT-L-14')`.

Text cleaning is open_clip's own (ftfy, double html.unescape, whitespace collapse, lower-case);
splitting, byte-level mapping and BPE are the `tokenizers` library's, configured with CLIP's regex,
vocabulary and merges (the merges file open_clip bundles, shipped in zoomin_jax/assets, MIT).
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Sequence

import ftfy
import numpy as np

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")
CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=4)
def bpe_tokenizer(bpe_path: str = DEFAULT_BPE_PATH):
    """A `tokenizers.Tokenizer` with CLIP's vocabulary; ids match open_clip's SimpleTokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
    # Sorted by code point this is GPT-2's bytes_to_unicode order: printable bytes map to
    # themselves, the rest to 256 and up.
    byte_chars = sorted(ByteLevel.alphabet())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                     end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.add_special_tokens([SOT, EOT])
    return tokenizer


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             bpe_path: str = DEFAULT_BPE_PATH) -> np.ndarray:
    """Token ids int32 [N, context_length]: SOT, BPE ids, EOT, zero padding; EOT kept last when cut."""
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = bpe_tokenizer(bpe_path)
    sot, eot = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
    encodings = tokenizer.encode_batch([clean(t) for t in texts], add_special_tokens=False)
    out = np.zeros((len(texts), context_length), np.int32)
    for row, encoding in zip(out, encodings):
        ids = [sot, *encoding.ids[:context_length - 2], eot]
        row[:len(ids)] = ids
    return out
