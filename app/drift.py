"""Drift monitoring with the statistics batch norm already keeps: pure numpy, no HTTP.

A model exported by ``bnserve-export`` carries, in metadata ``drift_reference`` (format
``bnserve-drift/1``), what each watched tensor should look like on training-like data: per channel
a mean and a standard deviation (the input standardisation for the input features; beta and
|gamma| * sqrt(var / (var + eps)) for a batch norm's output, exposed as an extra graph output
``drift.<group>``). A tensor is [N, C, *spatial]; statistics pool each channel over the examples
and every axis after the channel axis, as batch norm does.

The estimator is the lecture's exponentially weighted average ``v = beta * v + (1 - beta) * theta``
with ``1 - beta = alpha = 1 / time_constant``, one step per observed example, of each channel's
per-example mean and per-example mean square; the variance is E[x^2] - E[x]^2 of those averages.

The start: the averages begin at 0, so early on they are biased towards 0. We correct that as the
lecture series does (divide by 1 - beta^t), computed as the same recursion run on the constant 1,
so the corrected value is exactly the weighted average of the examples seen so far (after one
example, that example). ``examples`` says how many the estimate rests on; with fewer than about a
time constant it is noisy (the service exports scores to /metrics only past
BNSERVE_DRIFT_MIN_EXAMPLES, so that a fresh worker cannot raise an alert).

For precision the recursion runs on standardised values (x - mean) / std per channel: the same
averages up to an affine change, without the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
Values are taken as float32, as served. ``observe`` only buffers: [N, C] tensors are copied side
by side into one float32 row per example (a single numpy call, no reference kept to the caller's
arrays); larger ones are kept as they are, up to ``block_bytes``. Blocks of up to ``block``
examples are folded in with the closed form of n recursion steps,
m <- beta^n m + sum_j alpha beta^(n-1-j) x_j, equal to the step-by-step recursion up to rounding.
Examples with a non-finite value in any watched tensor are left out (counted in ``dropped``): one
inf would otherwise poison the averages for good.

Scores per channel: mean shift |m - mean| / std and log variance ratio log(v / std^2). Channels
whose reference std is about 0 (dead channels, gamma ~ 0; constant features) have no scale to
measure a shift with: they are skipped (NaN scores) and counted.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

# The interface written by model_export/drift_reference.py (not imported: serving needs no onnx).
KEY = "drift_reference"
FORMAT = "bnserve-drift/1"
PREFIX = "drift."  # every graph output named so is a monitoring output
KINDS = ("input", "batchnorm")
DEAD_STD = 1e-6  # std <= DEAD_STD * max(1, |mean|): float32 resolution, nothing left to measure
VAR_FLOOR = 1e-12  # v floored at VAR_FLOOR * std^2, so a constant stream scores log 1e-12, not -inf
DEFAULT_BLOCK = 256  # examples buffered before they are folded in
DEFAULT_BLOCK_BYTES = 8 << 20  # or fewer, when their tensors are this large (images)

Array = NDArray[np.float64]
F32 = NDArray[np.float32]


@dataclass(frozen=True)
class GroupRef:
    """One watched tensor: what each of its channels should show on training-like data."""

    name: str
    kind: str  # "input" or "batchnorm"
    tensor: str  # graph input ("features") or drift.* output
    channel_names: tuple[str, ...] | None
    mean: Array
    std: Array

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dead(self) -> NDArray[np.bool_]:
        dead: NDArray[np.bool_] = self.std <= DEAD_STD * np.maximum(1.0, np.abs(self.mean))
        return dead


def _fail(where: str, why: str) -> ValueError:
    return ValueError(f"{KEY}: {where}: {why}")


def _vector(raw: Any, where: str, n: int | None) -> Array:
    if not isinstance(raw, list) or not raw or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
        raise _fail(where, "must be a non-empty list of numbers")
    a = np.asarray(raw, dtype=np.float64)
    if not np.isfinite(a).all():
        raise _fail(where, "must be finite")
    if n is not None and a.shape[0] != n:
        raise _fail(where, f"has {a.shape[0]} values, the group has {n} channels")
    return a


def _group(raw: Any, i: int) -> GroupRef:
    where = f"groups[{i}]"
    if not isinstance(raw, dict):
        raise _fail(where, "must be an object")
    name, kind, tensor = raw.get("name"), raw.get("kind"), raw.get("tensor")
    if not isinstance(name, str) or not name:
        raise _fail(where, "needs a non-empty string 'name'")
    where = f"group {name!r}"
    if kind not in KINDS:
        raise _fail(where, f"'kind' must be one of {list(KINDS)}, got {kind!r}")
    if not isinstance(tensor, str) or not tensor:
        raise _fail(where, "needs a non-empty string 'tensor'")
    if (kind == "batchnorm") != tensor.startswith(PREFIX):
        raise _fail(where, f"a batchnorm group watches a {PREFIX}* output, an input group "
                           f"a graph input; got kind {kind!r} with tensor {tensor!r}")
    mean = _vector(raw.get("mean"), f"{where}: 'mean'", None)
    std = _vector(raw.get("std"), f"{where}: 'std'", mean.shape[0])
    if (std < 0).any():
        raise _fail(where, "'std' must be >= 0")
    names = raw.get("channel_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise _fail(where, "'channel_names' must be null or a list of strings")
        if len(names) != mean.shape[0]:
            raise _fail(where, f"has {len(names)} channel_names for {mean.shape[0]} channels")
    return GroupRef(name, kind, tensor, None if names is None else tuple(names), mean, std)


@dataclass(frozen=True)
class Reference:
    """A parsed, validated ``drift_reference``."""

    groups: tuple[GroupRef, ...]

    @classmethod
    def parse(cls, text: str) -> Reference:
        """The reference in ``text``; ValueError saying what is wrong when it is malformed."""
        try:
            raw = json.loads(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{KEY}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{KEY}: must be a JSON object")
        if raw.get("format") != FORMAT:
            raise ValueError(f"{KEY}: 'format' must be {FORMAT!r}, got {raw.get('format')!r}")
        groups = raw.get("groups")
        if not isinstance(groups, list) or not groups:
            raise ValueError(f"{KEY}: 'groups' must be a non-empty list")
        parsed = tuple(_group(g, i) for i, g in enumerate(groups))
        for what in ("name", "tensor"):
            seen = [getattr(g, what) for g in parsed]
            dup = {s for s in seen if seen.count(s) > 1}
            if dup:
                raise ValueError(f"{KEY}: two groups share the {what} {sorted(dup)[0]!r}")
        return cls(parsed)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The monitoring outputs (drift.*) the graph must provide."""
        return tuple(g.tensor for g in self.groups if g.kind == "batchnorm")

    @property
    def watched(self) -> tuple[str, ...]:
        """Every tensor ``observe`` needs: the monitoring outputs and the watched inputs."""
        return tuple(g.tensor for g in self.groups)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class GroupReport:
    """One group's estimate and scores, per channel (NaN: skipped channel, or no example yet)."""

    ref: GroupRef
    mean: Array  # estimated, in the tensor's units
    std: Array
    mean_shift: Array  # |m - mean| / std
    log_var_ratio: Array  # log(v / std^2)

    @property
    def skipped(self) -> int:
        return int(self.ref.dead.sum())

    @property
    def score(self) -> Array:
        """What ranks channels: the larger of mean shift and |log variance ratio|."""
        score: Array = np.fmax(self.mean_shift, np.abs(self.log_var_ratio))
        return score

    @property
    def worst_mean_shift(self) -> float:
        return _nanmax(self.mean_shift)

    @property
    def worst_abs_log_var_ratio(self) -> float:
        return _nanmax(np.abs(self.log_var_ratio))

    def worst(self, top: int) -> list[int]:
        """Up to ``top`` scored channels, the worst first."""
        score = self.score
        live = np.flatnonzero(np.isfinite(score))
        return [int(c) for c in live[np.argsort(-score[live], kind="stable")][:top]]

    def channel(self, c: int) -> dict[str, Any]:
        r = self.ref
        return {"channel": c, "name": None if r.channel_names is None else r.channel_names[c],
                "mean_shift": _finite_or_none(float(self.mean_shift[c])),
                "log_var_ratio": _finite_or_none(float(self.log_var_ratio[c])),
                "mean": _finite_or_none(float(self.mean[c])),
                "std": _finite_or_none(float(self.std[c])),
                "expected_mean": float(r.mean[c]), "expected_std": float(r.std[c])}

    def as_dict(self, top: int) -> dict[str, Any]:
        r = self.ref
        return {"name": r.name, "kind": r.kind, "tensor": r.tensor, "channels": r.channels,
                "skipped_channels": self.skipped,
                "worst_mean_shift": _finite_or_none(self.worst_mean_shift),
                "worst_abs_log_var_ratio": _finite_or_none(self.worst_abs_log_var_ratio),
                "worst": [self.channel(c) for c in self.worst(top)]}


def _nanmax(a: Array) -> float:
    finite = a[np.isfinite(a)]
    return float(finite.max()) if finite.size else math.nan


@dataclass(frozen=True)
class DriftReport:
    examples: int  # served examples the estimate rests on
    dropped: int  # examples left out for a non-finite value
    time_constant: float
    groups: tuple[GroupReport, ...]

    def group(self, name: str) -> GroupReport:
        return next(g for g in self.groups if g.ref.name == name)

    def summary(self) -> dict[str, Any]:
        """The worst channel over all groups (by score), and each score's worst."""
        best: tuple[float, GroupReport, int] | None = None
        for g in self.groups:
            for c in g.worst(1):
                if best is None or g.score[c] > best[0]:
                    best = (float(g.score[c]), g, c)
        shifts = [g.worst_mean_shift for g in self.groups]
        ratios = [g.worst_abs_log_var_ratio for g in self.groups]
        return {"worst_mean_shift": _finite_or_none(_nanmax(np.asarray(shifts))),
                "worst_abs_log_var_ratio": _finite_or_none(_nanmax(np.asarray(ratios))),
                "worst": None if best is None else {"group": best[1].ref.name,
                                                    **best[1].channel(best[2])}}

    def as_dict(self, top: int = 5) -> dict[str, Any]:
        """JSON-able (NaN becomes null): per group its worst ``top`` channels, and a summary."""
        return {"examples": self.examples, "dropped_examples": self.dropped,
                "time_constant": self.time_constant, "summary": self.summary(),
                "groups": [g.as_dict(top) for g in self.groups]}


class _Channels:
    """One group's running averages of standardised values, per channel."""

    def __init__(self, ref: GroupRef) -> None:
        self.ref = ref
        self.centre = ref.mean
        self.scale = np.where(ref.dead, 1.0, ref.std)  # dead channels: only shifted, not scaled
        self.m = np.zeros(ref.channels)  # EWMA of the per-example mean of z = (x - centre) / scale
        self.s = np.zeros(ref.channels)  # EWMA of the per-example mean of z^2

    def per_example(self, x: F32) -> tuple[Array, Array]:
        """Each example's per-channel mean of z and of z^2, [n, C] each."""
        if x.ndim == 2:  # [N, C]: one value per channel and example, nothing to pool
            z = (x.astype(np.float64) - self.centre) / self.scale
            return z, z * z
        n, c = x.shape[0], x.shape[1]
        shape = (1, c) + (1,) * (x.ndim - 2)
        z = (x.astype(np.float64) - self.centre.reshape(shape)) / self.scale.reshape(shape)
        z = z.reshape(n, c, -1)
        return z.mean(axis=2), (z * z).mean(axis=2)

    def report(self, weight: float) -> GroupReport:
        ref = self.ref
        if weight <= 0.0:
            nan = np.full(ref.channels, np.nan)
            return GroupReport(ref, nan, nan, nan, nan)
        m, s = self.m / weight, self.s / weight  # bias-corrected
        var_z = np.maximum(s - m * m, 0.0)
        shift = np.where(ref.dead, np.nan, np.abs(m))
        ratio = np.where(ref.dead, np.nan, np.log(np.maximum(var_z, VAR_FLOOR)))
        return GroupReport(ref, self.centre + m * self.scale, np.sqrt(var_z) * self.scale,
                           shift, ratio)


class DriftMonitor:
    """EWMAs of what the service serves, per watched channel; thread-safe."""

    def __init__(self, reference: Reference, time_constant: float = 1000.0,
                 block: int = DEFAULT_BLOCK, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if not (math.isfinite(time_constant) and time_constant >= 1.0):
            raise ValueError(f"time_constant must be a number >= 1 (examples), "
                             f"got {time_constant}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.reference = reference
        self.time_constant = float(time_constant)
        self.alpha = 1.0 / self.time_constant
        self.block = block
        self.block_bytes = block_bytes
        self._groups = [_Channels(g) for g in reference.groups]
        self._watch = [(g.tensor, g.channels, g.name) for g in reference.groups]
        # Buffered examples. [N, C] tensors (an MLP's): copied side by side into one float32 row
        # per example, a single numpy call per request that keeps no reference to the runtime's
        # outputs. Larger ones (images): the arrays themselves, concatenated when folded.
        self._flat: bool | None = None  # which of the two, fixed by the first observe
        self._offsets = np.cumsum([0, *(g.channels for g in reference.groups)]).tolist()
        self._rows = np.empty((0, 0), np.float32)  # [block, sum of channels] when flat
        self._buffer: list[Sequence[F32]] = []
        self._buffered = 0  # examples in the buffer
        self._buffered_bytes = 0
        self._weight = 0.0  # the same EWMA of the constant 1: 1 - beta^t, for bias correction
        self._examples = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def observe(self, tensors: Mapping[str, F32]) -> None:
        """Take the values of N served examples: tensor name -> [N, C, ...], every watched one.
        The arrays are kept until folded in (at most ``block`` examples or ``block_bytes``):
        do not change them afterwards."""
        n = -1
        size = 0
        arrays = []
        for name, channels, group in self._watch:  # the request path: catch mistakes, cheaply
            x = tensors.get(name)
            if x is None:
                raise ValueError(f"observe: tensor {name!r} (group {group!r}) is missing")
            shape = x.shape
            if (len(shape) < 2 or shape[1] != channels or (n >= 0 and shape[0] != n)
                    or (self._flat is not None and (len(shape) == 2) != self._flat)):
                raise ValueError(f"observe: tensor {name!r} has shape {list(shape)}, expected "
                                 f"[N, {channels}, ...] with the same N as the others (and "
                                 "the same rank as before)")
            n = shape[0]
            size += x.nbytes
            arrays.append(x)
        self._append(arrays, n, size)

    def observe_watched(self, arrays: Sequence[F32]) -> None:
        """``observe`` for a trusted caller, on the request path: the tensors in the order of
        ``reference.watched``, their shapes already checked (the predictor's warm-up does)."""
        if len(arrays) != len(self._watch):
            raise ValueError(f"observe_watched: {len(arrays)} tensors, expected "
                             f"{len(self._watch)} ({list(self.reference.watched)})")
        n = arrays[0].shape[0]
        with self._lock:
            k = self._buffered
            if self._flat and k + n < self.block:  # the usual request: one copy, no fold
                np.concatenate(arrays, axis=1, out=self._rows[k : k + n])
                self._buffered = k + n
                return
        self._append(arrays, n, arrays[0].nbytes * len(arrays))  # bytes: about, a fold cue

    def _append(self, arrays: Sequence[F32], n: int, size: int) -> None:
        with self._lock:
            if self._flat is None:
                self._flat = all(a.ndim == 2 for a in arrays)
                if self._flat:
                    self._rows = np.empty((self.block, self._offsets[-1]), np.float32)
            if self._flat:
                self._copy(arrays, n)
                return
            self._buffer.append(arrays)
            self._buffered += n
            self._buffered_bytes += size
            if self._buffered >= self.block or self._buffered_bytes >= self.block_bytes:
                self._fold()

    def _copy(self, arrays: Sequence[F32], n: int) -> None:
        """Examples into the rows, side by side, folding whenever the rows are full."""
        start = 0
        while start < n:
            k = self._buffered
            take = min(self.block - k, n - start)
            part = arrays if take == n else [a[start : start + take] for a in arrays]
            np.concatenate(part, axis=1, out=self._rows[k : k + take])  # same_kind: to float32
            self._buffered = k + take
            start += take
            if self._buffered == self.block:
                self._fold()

    def report(self) -> DriftReport:
        """The current estimate and scores (anything buffered is folded in first)."""
        with self._lock:
            self._fold()
            groups = tuple(g.report(self._weight) for g in self._groups)
            return DriftReport(self._examples, self._dropped, self.time_constant, groups)

    @property
    def examples(self) -> int:
        """Examples observed so far (buffered ones included)."""
        with self._lock:
            return self._examples + self._buffered

    def _fold(self) -> None:
        """n recursion steps at once: m <- beta^n m + sum_j alpha beta^(n-1-j) x_j."""
        buffer, buffered = self._buffer, self._buffered
        if buffered == 0:
            return
        stats = []
        finite = np.ones(buffered, dtype=np.bool_)
        at = self._offsets
        for i, g in enumerate(self._groups):
            if self._flat:
                x = self._rows[:buffered, at[i] : at[i + 1]]
            else:
                x = buffer[0][i] if len(buffer) == 1 else np.concatenate([b[i] for b in buffer])
            zm, zq = g.per_example(x)
            finite &= np.isfinite(zq).all(axis=1)  # z^2 finite: z is too
            stats.append((zm, zq))
        buffer.clear()
        self._buffered = self._buffered_bytes = 0
        n = int(finite.sum())
        self._dropped += buffered - n
        if n == 0:
            return
        beta = 1.0 - self.alpha
        w = self.alpha * np.power(beta, np.arange(n - 1, -1, -1, dtype=np.float64))
        decay = beta ** n
        everything = n == buffered
        for g, (zm, zq) in zip(self._groups, stats, strict=True):
            g.m = decay * g.m + w @ (zm if everything else zm[finite])
            g.s = decay * g.s + w @ (zq if everything else zq[finite])
        self._weight = decay * self._weight + float(w.sum())
        self._examples += n
