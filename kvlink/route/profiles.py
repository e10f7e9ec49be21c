"""Profiles the throughput model and the simulator run on: prefill time and KV size by length,
and the request length distribution.

``PrefillProfile`` fits ``T(l) = a + b*l + c*l^2`` (linear layers and GEMMs grow linearly,
full attention quadratically) by least squares through measured points. ``LengthDist`` is a
log-normal truncated to ``[lo, hi]``, discretised on a log grid for expectations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvlink.errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True)
class PrefillProfile:
    """Prefill time of one instance: ``T(l) = a + b*l + c*l^2`` seconds."""

    name: str
    a: float
    b: float
    c: float

    @classmethod
    def fit(cls, name: str, lengths, seconds) -> "PrefillProfile":
        """Least-squares quadratic through measured ``(length, seconds)`` points (at least 3)."""
        x = np.asarray(lengths, float)
        y = np.asarray(seconds, float)
        if x.size < 3 or x.size != y.size:
            raise ConfigError("a prefill profile needs at least three (length, seconds) points")
        a, b, c = np.linalg.lstsq(np.vstack([np.ones_like(x), x, x * x]).T, y, rcond=None)[0]
        return cls(name, float(a), float(b), float(c))

    def __call__(self, length):
        length = np.asarray(length, float)
        return self.a + self.b * length + self.c * length * length

    def scaled(self, name: str, linear: float, quadratic: float) -> "PrefillProfile":
        """Another hardware kind: the constant and linear terms scaled by ``linear``, the
        attention term by ``quadratic``."""
        return PrefillProfile(name, self.a * linear, self.b * linear, self.c * quadratic)


@dataclass(frozen=True)
class KvSizeProfile:
    """KV (plus state) bytes of one request: ``fixed + per_token * l`` (a hybrid's fixed state plus
    its full-attention KV), fitted through measured points or taken from a :class:`CacheSpec`."""

    fixed: float
    per_token: float

    @classmethod
    def fit(cls, lengths, nbytes) -> "KvSizeProfile":
        per_token, fixed = np.polyfit(np.asarray(lengths, float), np.asarray(nbytes, float), 1)
        return cls(float(fixed), float(per_token))

    @classmethod
    def from_spec(cls, spec) -> "KvSizeProfile":
        return cls(float(spec.bytes_at(0)), float(spec.kv_bytes_per_token))

    def __call__(self, length):
        return self.fixed + self.per_token * np.asarray(length, float)


@dataclass(frozen=True)
class LengthDist:
    """Input lengths: log-normal (``mu``, ``sigma`` of ln tokens) truncated to ``[lo, hi]``."""

    mu: float
    sigma: float
    lo: int
    hi: int
    points: int = 20001

    def __post_init__(self) -> None:
        if not 0 < self.lo < self.hi or self.sigma <= 0:
            raise ConfigError("need 0 < lo < hi and sigma > 0")

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths, weights)``: a log-spaced grid and probabilities summing to 1."""
        z = np.linspace(math.log(self.lo), math.log(self.hi), self.points)
        w = np.exp(-0.5 * ((z - self.mu) / self.sigma) ** 2)
        return np.exp(z), w / w.sum()

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` lengths (rejection sampling of the truncated log-normal)."""
        out = np.empty(0)
        while out.size < n:
            draw = np.exp(rng.normal(self.mu, self.sigma, 2 * n))
            out = np.concatenate([out, draw[(draw >= self.lo) & (draw <= self.hi)]])
        return np.round(out[:n]).astype(np.int64)


class Empirical:
    """A length distribution from observed samples (the scheduler's view of live traffic)."""

    def __init__(self, lengths):
        values = np.sort(np.asarray(lengths, float))
        if values.size == 0:
            raise ConfigError("no observed lengths")
        self._grid = values
        self._w = np.full(values.size, 1.0 / values.size)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        return self._grid, self._w
