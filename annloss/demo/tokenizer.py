"""Hashing tokeniser for place names and region text.

Words, adjacent word pairs and character trigrams are hashed into a fixed number of buckets, so
the demo needs no vocabulary file and no download. The hash is CRC-32 from ``zlib``, which is
stable across processes and platforms; Python's built-in ``hash()`` is salted per process and
would give different token ids in every run.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["PADDING_ID", "HashingTokenizer"]

#: Token id used to pad rows of an encoded batch; real tokens are in [1, num_buckets].
PADDING_ID = 0

_WORD_PATTERN = re.compile(r"\w+")


class HashingTokenizer:
    """Map text to bucket ids of words, word bigrams and character trigrams.

    Args:
        num_buckets: number of hash buckets; token ids are in ``[1, num_buckets]``.
        max_tokens: row width of :meth:`encode`. Longer texts are truncated, keeping words first,
            then word bigrams, then character trigrams.
    """

    def __init__(self, num_buckets: int = 2**17, max_tokens: int = 32) -> None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.num_buckets = num_buckets
        self.max_tokens = max_tokens

    @property
    def vocabulary_size(self) -> int:
        """Rows an embedding table needs: every bucket plus the padding id."""
        return self.num_buckets + 1

    def pieces(self, text: str) -> list[str]:
        """Split ``text`` into the prefixed strings that are hashed, in truncation order."""
        words = _WORD_PATTERN.findall(text.casefold())
        pieces = [f"w:{word}" for word in words]
        pieces += [f"b:{first} {second}" for first, second in itertools.pairwise(words)]
        for word in words:
            # "<" and ">" mark the word boundaries, so a prefix trigram differs from an inner one.
            padded = f"<{word}>"
            pieces += [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
        return pieces

    def token_ids(self, text: str) -> list[int]:
        """Return the bucket ids of ``text``, untruncated, each in ``[1, num_buckets]``."""
        return [
            zlib.crc32(piece.encode("utf-8")) % self.num_buckets + 1 for piece in self.pieces(text)
        ]

    def encode(self, texts: Sequence[str] | Iterable[str]) -> np.ndarray:
        """Encode texts into an int64 array of shape ``(len(texts), max_tokens)``.

        Rows are padded with :data:`PADDING_ID`. Repeated texts are hashed once.
        """
        texts = list(texts)
        encoded = np.full((len(texts), self.max_tokens), PADDING_ID, dtype=np.int64)
        cache: dict[str, list[int]] = {}
        for row, text in enumerate(texts):
            ids = cache.get(text)
            if ids is None:
                ids = self.token_ids(text)[: self.max_tokens]
                cache[text] = ids
            encoded[row, : len(ids)] = ids
        return encoded
