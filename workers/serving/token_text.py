"""What one token is, for a client reading log-probabilities: its text and its raw bytes.

A byte-level BPE token (GPT-2, Llama 3, SmolLM2) may hold part of a UTF-8 character, so its
text is not always printable on its own. Its *bytes* are exact: the token's symbols mapped
back through the byte-level alphabet (SentencePiece vocabularies: ``<0xNN>`` byte tokens and
``▁`` for a space). Its *text* is those bytes decoded, or, when they are not whole UTF-8,
``bytes:\\xNN…`` (OpenAI's and vLLM's convention). Special tokens are their own text.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Sequence
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable symbol of each byte → the byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))  # fmt: skip
    symbols = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + n)
            n += 1
    return {chr(s): b for b, s in zip(printable, symbols, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    parts = (getattr(backend, "decoder", None), getattr(backend, "pre_tokenizer", None))
    return any("ByteLevel" in repr(p) for p in parts if p is not None)


class TokenText:
    """Token id → (text, bytes) for one tokenizer; results are cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, bytes]] = {}

    def bytes_of(self, token: int) -> bytes:
        return self.of(token)[1]

    def text_of(self, token: int) -> str:
        return self.of(token)[0]

    def of(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._compute(token)
        return hit

    def _compute(self, token: int) -> tuple[str, bytes]:
        tok = self.tokenizer
        symbol = tok.convert_ids_to_tokens(int(token))
        if symbol is None:
            return "", b""
        if token in self.special:
            return symbol, symbol.encode()
        raw: bytes | None = None
        if self.byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in symbol):
                raw = bytes(table[ch] for ch in symbol)
        if raw is None:
            m = _BYTE_TOKEN.match(symbol)
            if m:
                raw = bytes([int(m.group(1), 16)])
            elif "▁" in symbol:
                raw = symbol.replace("▁", " ").encode()
            else:
                raw = tok.decode([int(token)], skip_special_tokens=False).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, raw

    def offsets(self, tokens: Sequence[int], start: int = 0) -> list[int]:
        """The character offset of each token in the text its bytes make, from ``start``.

        A token that ends inside a character starts where that character does.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out, chars = [], start
        for t in tokens:
            out.append(chars)
            chars += len(decoder.decode(self.bytes_of(t)))
        return out
