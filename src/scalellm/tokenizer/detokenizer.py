"""Incremental detokenization of one request's generated tokens, with stop strings.

Decoding token by token is not the same as decoding the whole sequence: a character can be
split over several byte tokens, SentencePiece drops the space of a sequence's first token, and a
stop string can span tokens. `IncrementalDetokenizer` decodes a small window of recent tokens
(vLLM's / SGLang's prefix and read offsets) so each step costs O(window), not O(length):

    window = ids[prefix:]                      anchor = ids[prefix:read]
    new    = decode(window)[len(decode(anchor)):]

and only moves the offsets when the window's text does not end in U+FFFD (an incomplete UTF-8
character) nor in a byte-fallback token ("<0xAB>"): HF's ByteFallback decoder turns a whole
run of byte tokens into U+FFFDs when the run is not valid UTF-8, so a valid emoji can still
become four U+FFFDs if the next token is a stray byte.

The text produced this way ("stable" text) is searched for stop strings, only in generated
text, never in the prompt. `take_delta()` hands out stable text except a trailing piece
that could still grow into a stop string.

Invariant: the concatenation of all `take_delta()` and `finish()` results equals
`tokenizer.decode(generated_ids, skip_special_tokens)` -- cut before the first stop string to
complete (or after it, with `include_stop_str_in_output`).

What this module does NOT know: models, sampling, EOS handling, max_tokens, streaming
protocols or logprobs. It does not stop generation itself; it reports the matched stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    """What the detokenizer needs; `scalellm.tokenizer.Tokenizer` provides it.

    Optional attributes: `byte_fallback_ids` and `all_special_ids` (frozensets of ids).
    """

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into safe-to-stream text."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self.prompt_len = len(prompt_token_ids)  # the prompt is never decoded nor searched
        self._skip_special = skip_special_tokens
        self._stops: list[str] = list(dict.fromkeys(s for s in (stop or ()) if s))
        self._include_stop = include_stop_str_in_output
        self._byte_ids: frozenset[int] = frozenset(getattr(tokenizer, "byte_fallback_ids", ()))
        self._special_ids: frozenset[int] = (
            frozenset(getattr(tokenizer, "all_special_ids", ())) if skip_special_tokens else frozenset()
        )
        self._keep = max((len(s) for s in self._stops), default=1) - 1  # context kept for stop search

        self._ids: list[int] = []
        self._prefix = 0  # window start (token index into generated ids)
        self._read = 0  # end of the tokens whose text is stable
        self._parts: list[str] = []  # all stable text, in pieces
        self._stable_len = 0
        self._recent = ""  # last `_keep` chars of stable text
        self._unemitted = ""  # stable text not yet handed out (already cut at the stop)
        self._emitted = 0
        self._cut: int | None = None  # length of the output once a stop string matched
        self._stop: str | None = None
        self._finished = False

    # ---------------------------------------------------------------- public API

    @property
    def token_ids(self) -> list[int]:
        """Generated ids so far (a copy)."""
        return list(self._ids)

    @property
    def matched_stop(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def output_text(self) -> str:
        """All stable generated text, cut at the stop string (after `finish()`: the whole output)."""
        text = "".join(self._parts)
        return text if self._cut is None else text[: self._cut]

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append generated tokens; returns the stop string if one has matched (now or before).

        Tokens given after a stop matched are ignored.
        """
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.update() after finish()")
        if self._stop is not None:
            return self._stop
        self._ids.extend(int(t) for t in new_token_ids)
        text = self._advance(force=False)
        if text:
            self._append(text)
        return self._stop

    def resume(self, earlier_ids: Sequence[int], emitted_chars: int) -> None:
        """Continue a stream begun elsewhere: `earlier_ids` were generated before and the
        client has the first `emitted_chars` characters of their text. Afterwards this
        object behaves as if it had produced them itself and handed out that much text,
        so a character split across the boundary or a held-back stop-string prefix is
        not lost."""
        if self._ids:
            raise RuntimeError("resume() must come before any update()")
        # NOTE: one token at a time, as they were generated: stable text depends on where
        # the window offsets moved, and a batch update can leave more of it unstable.
        for t in earlier_ids:
            self.update((t,))
        self._take(min(emitted_chars, len(self._unemitted)))

    def take_delta(self) -> str:
        """Text that is safe to emit now; never half a character nor a possible stop-string start."""
        if self._finished or self._stop is not None or self._include_stop:
            hold = 0
        else:
            hold = min(self._holdback(), len(self._unemitted))
        return self._take(len(self._unemitted) - hold)

    def finish(self) -> str:
        """The rest of the text, at the end of the request (flushes incomplete characters too)."""
        if not self._finished and self._stop is None:
            text = self._advance(force=True)
            if text:
                self._append(text)
        self._finished = True
        return self._take(len(self._unemitted))

    # ---------------------------------------------------------------- decoding window

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _advance(self, *, force: bool) -> str:
        """New stable text of the window; moves prefix/read offsets when the text is complete."""
        if self._read >= len(self._ids):
            return ""
        anchor = self._decode(self._prefix, self._read) if self._read > self._prefix else ""
        window = self._decode(self._prefix)
        if not force and (len(window) <= len(anchor) or window.endswith(_REPLACEMENT) or self._in_byte_run()):
            return ""  # nothing new yet, or the end may still change: wait
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(anchor) :]

    def _in_byte_run(self) -> bool:
        """Whether the last token that reaches the decoder is a byte-fallback token.

        Only tokens past `_read` are looked at: the offsets never move while this is true, so
        the last decoded token before `_read` is not a byte token.
        """
        if not self._byte_ids:
            return False
        for tid in reversed(self._ids[self._read :]):
            if tid not in self._special_ids:
                return tid in self._byte_ids
        return False

    # ---------------------------------------------------------------- stop strings

    def _append(self, text: str) -> None:
        """Add stable text; find the first stop string to complete in it."""
        base = self._stable_len - len(self._recent)  # absolute index of buffer[0]
        buffer = self._recent + text
        match = self._find_stop(buffer, len(self._recent))
        self._parts.append(text)
        self._stable_len += len(text)
        self._recent = buffer[max(0, len(buffer) - self._keep) :]
        if match is None:
            self._unemitted += text
            return
        start, stop = match
        self._stop = stop
        self._cut = base + start + (len(stop) if self._include_stop else 0)
        full = "".join(self._parts)[: self._cut]
        self._parts = [full]
        self._unemitted = full[self._emitted :]

    def _find_stop(self, buffer: str, old_len: int) -> tuple[int, str] | None:
        """Earliest-ending stop match that ends past `old_len` (ties: earliest start)."""
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = buffer.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                key = (i + len(s), i, s)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _holdback(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        recent = self._recent
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(recent)), hold, -1):
                if recent.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _take(self, n: int) -> str:
        if n <= 0:
            return ""
        out, self._unemitted = self._unemitted[:n], self._unemitted[n:]
        self._emitted += len(out)
        return out
