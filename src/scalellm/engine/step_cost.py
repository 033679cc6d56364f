"""How long will a step take? A cost model fitted to the steps measured so far.

    seconds ~= a + b * num_decodes + c * num_prefill_tokens

a: what every step pays whatever its size (per-op and Python overhead, weights read once),
b: one decode row (its linears, its LM-head row, attention over its context, sampling),
c: one prefill token (linears and attention; no LM head, no sampling).

Fitted by exponentially weighted least squares, the newest step weighing most (contexts
grow, the machine's load changes). Steps that carried prefill tokens are also kept in a
second memory that only newer such steps displace: between bursts a server runs hundreds
of decode-only steps, which say nothing of c, and with one memory c's evidence decayed
away and a burst was scheduled as if a prefill token cost a decode row (~3x too much on
CPU: a c=64 burst's TTFT p99 went from ~2 s to ~5 s with a 100 ms target). A ridge says
what to assume when the steps seen cannot tell the terms apart:
- a is pulled toward 0: steps of one size cannot split a from b, and a larger per-row
  cost is the safe guess for a scheduler deciding whether one more row still fits;
- c is tied to b: until a step has carried prefill tokens, a prefill token costs a row.
A fit with a negative term (noise) falls back to one cost per token, a = 0.

Knows nothing of requests or scheduling: shapes in, seconds out.
"""

from __future__ import annotations

_SCALE = 64.0  # rows per feature unit: keeps the normal equations well conditioned
_DECAY = 0.9  # weight of a step one step older (~10 steps in the fit)
# the same in the memory of steps with prefill tokens, per such step (~3 steps): a burst's
# first capped steps must correct what the last burst taught within a step or two
_PREFILL_DECAY = 0.7
_RIDGE = 0.01  # the prior's strength, relative to the weight of the steps in the fit


class StepCostModel:
    def __init__(self, decay: float = _DECAY, ridge: float = _RIDGE, prefill_decay: float = _PREFILL_DECAY) -> None:
        self.decay = decay
        self.prefill_decay = prefill_decay
        self.ridge = ridge
        # weighted sums over steps of x x^T and x t, x = (1, decodes / S, prefill / S): every
        # step (decayed each step), and the steps with prefill tokens (decayed each such step)
        self._xx = [[0.0] * 3 for _ in range(3)]
        self._xt = [0.0] * 3
        self._pxx = [[0.0] * 3 for _ in range(3)]
        self._pxt = [0.0] * 3
        self._coef: tuple[float, float, float] | None = None  # (a, b, c) in seconds, per row / token

    @property
    def is_fitted(self) -> bool:
        return self._coef is not None

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(a seconds per step, b seconds per decode row, c seconds per prefill token)."""
        return self._coef

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        x = (1.0, num_decodes / _SCALE, num_prefill_tokens / _SCALE)
        sums = [(self._xx, self._xt, self.decay)]
        if num_prefill_tokens:
            sums.append((self._pxx, self._pxt, self.prefill_decay))
        for xx, xt, decay in sums:
            for i in range(3):
                xt[i] = decay * xt[i] + x[i] * seconds
                for j in range(3):
                    xx[i][j] = decay * xx[i][j] + x[i] * x[j]
        self._coef = self._fit()

    def predict(self, num_decodes: int, num_prefill_tokens: int) -> float:
        """Seconds for a step of this shape (once `is_fitted`)."""
        a, b, c = self._fitted()
        return a + b * num_decodes + c * num_prefill_tokens

    def max_prefill_tokens(self, seconds: float, num_decodes: int) -> int:
        """The most prefill tokens a step with `num_decodes` decodes can carry within `seconds` (>= 0)."""
        a, b, c = self._fitted()
        room = seconds - a - b * num_decodes
        if room <= 0:
            return 0
        return int(room / c + 1e-6) if c > 0 else 1 << 30  # (a fit's rounding: 63.9999... is 64)

    def _fitted(self) -> tuple[float, float, float]:
        if self._coef is None:
            raise RuntimeError("StepCostModel: no step observed yet")
        return self._coef

    def _fit(self) -> tuple[float, float, float]:
        xx = [[self._xx[i][j] + self._pxx[i][j] for j in range(3)] for i in range(3)]
        xt = [self._xt[i] + self._pxt[i] for i in range(3)]
        weight = xx[0][0]  # sum of the steps' weights
        lam = self.ridge * weight
        m = [row[:] for row in xx]
        m[0][0] += lam  # a -> 0
        m[1][1] += lam  # (b - c)^2: b and c -> each other
        m[2][2] += lam
        m[1][2] -= lam
        m[2][1] -= lam
        coef = _solve3(m, xt)
        if coef is not None and min(coef) >= 0 and coef[1] + coef[2] > 0:
            a, b, c = coef
            return a, b / _SCALE, c / _SCALE
        # one cost per token: least squares of t = s * (d + p) / S
        tokens_t = xt[1] + xt[2]
        tokens_sq = xx[1][1] + 2 * xx[1][2] + xx[2][2]
        s = tokens_t / tokens_sq / _SCALE if tokens_sq > 0 else 0.0
        return 0.0, s, s


def _solve3(m: list[list[float]], r: list[float]) -> tuple[float, float, float] | None:
    """Solve the 3x3 system m x = r by Gaussian elimination with partial pivoting."""
    a = [m[i][:] + [r[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda i: abs(a[i][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for i in range(col + 1, 3):
            f = a[i][col] / a[col][col]
            for j in range(col, 4):
                a[i][j] -= f * a[col][j]
    x = [0.0, 0.0, 0.0]
    for i in (2, 1, 0):
        x[i] = (a[i][3] - sum(a[i][j] * x[j] for j in range(i + 1, 3))) / a[i][i]
    return x[0], x[1], x[2]
