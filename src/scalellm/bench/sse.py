"""Incremental Server-Sent Events parser (the WHATWG event-stream format).

Bytes go in as they arrive from the socket, in pieces of any size; complete events
come out. Handles what real servers send: events split across reads (even inside
a CRLF), CRLF / LF / CR line ends, comment lines (`: keep-alive`), `event:` lines,
multi-line `data:` fields, and `id:` / `retry:` fields (read and ignored).

What this module does NOT know: HTTP, JSON, or what an OpenAI chunk looks like.
"""

from __future__ import annotations

_LF = b"\n"
_CR = b"\r"
_COLON = 58  # ord(":")


class SSEParser:
    """Feed bytes with `feed`; get back a list of (event name, data) pairs.

    The event name is b"message" unless an `event:` line set it; data is the
    event's `data:` lines joined with "\\n" (the spec's rule). An event with no
    data line is not dispatched (also the spec's rule).
    """

    __slots__ = ("_tail", "_data", "_event", "_skip_lf")

    def __init__(self) -> None:
        self._tail = b""  # an incomplete last line, kept for the next feed
        self._data: list[bytes] = []
        self._event = b""
        # NOTE: a read that ends in CR may be the first half of a CRLF; the CR already
        # ended the line, so a LF opening the next read is dropped rather than read
        # as a second (blank, event-dispatching) line.
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        # fast path: one whole `data: ...` event in one read, nothing pending (the usual case)
        if (not self._tail and not self._data and not self._skip_lf and chunk[:6] == b"data: "
                and chunk[-2:] == b"\n\n" and chunk.count(_LF) == 2 and _CR not in chunk):
            return [(b"message", chunk[6:-2])]
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == _LF:
                chunk = chunk[1:]
        if _CR in chunk:
            self._skip_lf = chunk.endswith(_CR)
            chunk = chunk.replace(b"\r\n", _LF).replace(_CR, _LF)
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(_LF)
        self._tail = lines.pop()
        events: list[tuple[bytes, bytes]] = []
        for line in lines:
            if not line:  # a blank line dispatches the event
                if self._data:
                    events.append((self._event or b"message", _LF.join(self._data)))
                    self._data = []
                self._event = b""
                continue
            if line[0] == _COLON:  # comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
            # "id", "retry" and unknown fields are ignored, as the spec says
        return events

    def close(self) -> list[tuple[bytes, bytes]]:
        """End of stream: an unterminated last line is read as a complete one.

        The spec drops an event not followed by a blank line; servers that close the
        connection right after their last `data:` line are common enough that we keep it.
        """
        events = self.feed(b"\n\n") if (self._tail or self._data) else []
        self._tail, self._data, self._event, self._skip_lf = b"", [], b"", False
        return events
