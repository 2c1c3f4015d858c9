"""Token ids to the text a person sees: per-token pieces, stop sequences, and token labels."""

from __future__ import annotations

from typing import Any

MAX_CHAR_BYTES = 4  # a UTF-8 character is at most 4 bytes, so it spans at most 4 byte-level tokens


class PieceDecoder:
    """The text each new token adds, decoding only the tokens not yet shown: a token that ends inside a
    UTF-8 character adds "" and the token that completes the character adds all of it. The pieces join
    to the text of all the tokens (byte-level tokenizers decode by concatenating bytes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < MAX_CHAR_BYTES:
            return ""  # maybe an incomplete character: wait for the next token
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's piece of the text of `ids` (see `PieceDecoder`); the last one takes what is left."""
    decoder = PieceDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


def token_label(tokenizer: Any, token: int) -> str:
    """A token on its own, for lists of alternatives: its text (U+FFFD for a token that is part of a
    UTF-8 character), `<|endoftext|>` for the end-of-text token."""
    if token == getattr(tokenizer, "eot_id", None):
        return "<|endoftext|>"
    return tokenizer.decode([token])


class StopScanner:
    """Holds a row's text back while it could still become a stop sequence, and finds the first one.

    `feed(piece)` returns how much of the row's text (a length in characters) is now safe to show and
    whether a stop sequence was found (the text then ends where it starts)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[int, bool]:
        if not self.stops:
            self.text += piece
            return len(self.text), False
        start = max(0, len(self.text) - max(len(s) for s in self.stops) + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
            return len(self.text), True
        held = 0
        for stop in self.stops:  # the longest end of the text that begins a stop sequence
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return len(self.text) - held, False
