"""Safety: who may call (API keys), how much (token-bucket rate limits), what size
(body, prompt, max_tokens, n), and what text may pass (input and output filters).

Plain Python, no I/O of its own: the HTTP layer (scalellm.api.app) asks the Guard
(scalellm.api.guard) which calls into these pieces. Knows nothing of engines,
replicas or routing.

- Keys are stored as SHA-256 digests and looked up by digest, then confirmed with
  `hmac.compare_digest`, so the time a comparison takes says nothing about the key.
  Each key has an id (safe to log) and optional limits of its own.
- Rate limits are token buckets refilled continuously: `requests_per_min` is charged
  one per request at admission; `tokens_per_min` is charged prompt + completion
  tokens when a request finishes (usage is only known then) and admission requires
  the bucket not to be in debt.
- Filters are literal strings (case-insensitive) or regexes with a declared maximum
  match length; `reject` refuses input (400, code content_filter) or ends output
  (finish_reason content_filter); `redact` replaces the match. Streamed output holds
  back at most (longest pattern - 1) characters.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal


# -- API keys ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key limits; 0 means unlimited."""

    requests_per_min: float = 0.0
    tokens_per_min: float = 0.0
    max_concurrency: int = 0


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str  # safe to log; never the secret
    digest: bytes  # sha256(secret)
    limits: KeyLimits = KeyLimits()

    @staticmethod
    def from_secret(secret: str, key_id: str | None = None, limits: KeyLimits = KeyLimits()) -> ApiKey:
        if not secret:
            raise ValueError("an API key must not be empty")
        digest = hashlib.sha256(secret.encode()).digest()
        return ApiKey(key_id or f"key-{digest.hex()[:8]}", digest, limits)


def parse_keys(text: str, limits: KeyLimits = KeyLimits()) -> list[ApiKey]:
    """Keys from a file's text or an environment variable: entries separated by newlines
    or commas, each `secret` or `key_id:secret`; `#` starts a comment."""
    keys = []
    for line in text.replace(",", "\n").splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        key_id, sep, secret = entry.partition(":")
        keys.append(ApiKey.from_secret(secret.strip(), key_id.strip(), limits) if sep
                    else ApiKey.from_secret(entry, None, limits))
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate API key ids")
    return keys


class KeyStore:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).digest()
        key = self._by_digest.get(digest)
        # NOTE: the dict lookup is on a digest (timing reveals nothing usable about the
        # secret); compare_digest still confirms so equality is never short-circuited.
        if key is not None and hmac.compare_digest(key.digest, digest):
            return key
        return None


# -- rate limits ------------------------------------------------------------------------
class TokenBucket:
    """`rate_per_min` tokens per minute, holding at most one minute's worth."""

    def __init__(self, rate_per_min: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_min / 60.0
        self.capacity = rate_per_min
        self.level = rate_per_min
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def try_take(self, n: float = 1.0) -> float:
        """Take n tokens: 0.0 on success, else seconds until they would be there."""
        self._refill()
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate

    def wait_until_positive(self) -> float:
        """0.0 when the bucket is not in debt, else seconds until it is out of it."""
        self._refill()
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate

    def charge(self, n: float) -> None:
        """Take n tokens, going into debt if needed (usage known only afterwards)."""
        self._refill()
        self.level -= n


# -- content filters --------------------------------------------------------------------
Action = Literal["reject", "redact"]


@dataclass(frozen=True, slots=True)
class FilterRule:
    pattern: str
    action: Action = "reject"
    regex: bool = False
    max_len: int = 0  # regexes: the longest text a match can span (bounds the stream hold-back)
    replacement: str = "[REDACTED]"

    def __post_init__(self) -> None:
        if self.action not in ("reject", "redact"):
            raise ValueError(f"filter action must be reject or redact, got {self.action!r}")
        if not self.pattern:
            raise ValueError("a filter pattern must not be empty")
        if self.regex:
            re.compile(self.pattern)
            if self.max_len <= 0:
                raise ValueError(f"regex filter {self.pattern!r} needs max_len (longest match, in characters)")

    @property
    def span(self) -> int:
        return self.max_len if self.regex else len(self.pattern)


class FilterHit(Exception):
    """A `reject` rule matched. `safe_text` is the text before the match."""

    def __init__(self, rule: FilterRule, safe_text: str = "") -> None:
        super().__init__(f"content filter matched ({rule.action})")
        self.rule = rule
        self.safe_text = safe_text


class ContentFilter:
    """A set of rules compiled into one regex; longer literals are tried first."""

    def __init__(self, rules: Iterable[FilterRule]) -> None:
        self.rules = sorted(rules, key=lambda r: -r.span)
        parts = [f"(?P<r{i}>{r.pattern if r.regex else re.escape(r.pattern)})" for i, r in enumerate(self.rules)]
        self._re = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self.span = max((r.span for r in self.rules), default=0)

    def __bool__(self) -> bool:
        return self._re is not None

    def _rule(self, m: re.Match) -> FilterRule:
        return self.rules[int(m.lastgroup[1:])]  # type: ignore[index]

    def apply(self, text: str) -> str:
        """Whole text: redactions applied; raises FilterHit on a reject rule."""
        out, _ = self._scan(text, len(text), final=True)
        return out

    def _scan(self, buf: str, safe: int, final: bool) -> tuple[str, int]:
        """Process matches starting before `safe` (final decisions); returns the output
        text and how many characters of `buf` it consumed."""
        if self._re is None:
            return buf, len(buf)
        out: list[str] = []
        pos = 0
        for m in self._re.finditer(buf):
            if not final and m.start() >= safe:
                break
            rule = self._rule(m)
            if rule.action == "reject":
                raise FilterHit(rule, "".join(out) + buf[pos:m.start()])
            out.append(buf[pos:m.start()])
            out.append(rule.replacement)
            pos = m.end()
        end = len(buf) if final else max(safe, pos)
        out.append(buf[pos:end])
        return "".join(out), end

    def stream(self) -> StreamFilter:
        return StreamFilter(self)


class StreamFilter:
    """Filters one streamed choice: `feed` returns text safe to send now; `finish` the rest.

    A match starting at position s spans at most `span` characters, so once the buffer
    holds s + span characters the decision at s is final; at most span - 1 characters
    wait for the next delta."""

    def __init__(self, f: ContentFilter) -> None:
        self._f = f
        self._pending = ""

    def feed(self, text: str) -> str:
        buf = self._pending + text
        safe = len(buf) - self._f.span + 1
        if safe <= 0:
            self._pending = buf
            return ""
        try:
            out, used = self._f._scan(buf, safe, final=False)
        except FilterHit as hit:
            self._pending = ""
            raise
        self._pending = buf[used:]
        return out

    def finish(self) -> str:
        buf, self._pending = self._pending, ""
        out, _ = self._f._scan(buf, len(buf), final=True)
        return out


# -- request limits ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Hard caps on what one request may ask for; 0 means unlimited."""

    max_body_bytes: int = 32 << 20
    max_prompt_chars: int = 0
    max_tokens: int = 0
    max_n: int = 0


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    keys: tuple[ApiKey, ...] = ()
    default_key_limits: KeyLimits = KeyLimits()  # for keys without limits of their own
    limits: RequestLimits = RequestLimits()
    input_filters: tuple[FilterRule, ...] = ()
    output_filters: tuple[FilterRule, ...] = ()


def text_of_prompts(prompts: Iterable[object]) -> Iterable[str]:
    for p in prompts:
        if isinstance(p, str):
            yield p


_ANON = ApiKey("anonymous", b"", KeyLimits())


def anonymous() -> ApiKey:
    return _ANON


@dataclass(slots=True)
class KeyState:
    """Live counters for one key."""

    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0
    limits: KeyLimits = field(default_factory=KeyLimits)
