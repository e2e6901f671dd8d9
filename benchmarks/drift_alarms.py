"""The drift study's bookkeeping: score traces, the alarm rule, thresholds from a false-alarm
budget, detection delays and false-alarm counts. Pure numpy; no model, no monitor.

A trace holds, at each check (after ``examples[k]`` examples), each group's worst standardised mean
shift and worst |log variance ratio| and the channels they come from. The rule, fixed in advance:
alarm at a check when, in any of the rule's groups, the worst mean shift > that group's
``t_mean`` or the worst |log variance ratio| > its ``t_var``. Checks start once the estimate
rests on a time constant of examples (a rule's ``first``: checks before it never fire).

The shipped Prometheus rules (deploy/monitoring/bnserve-drift-rules.yml) are the same kind of
rule with fixed thresholds: ``shipped_rule`` reads them from the rules' PromQL.

Each group has its own pair of thresholds: the input features (raw, often heavy-tailed) and a
layer's channels (sums of many features) do not vary alike, and one threshold for all would be
set by the noisiest group. Every rule gets the same false-alarm budget, split evenly over its
groups and the two statistics, so rules watching fewer groups are not handicapped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
STATS = ("mean", "var")  # what a fired channel fired on: mean shift, or log variance ratio


@dataclass(frozen=True)
class Trace:
    examples: IntArray  # [K] examples observed at each check, increasing
    shift: Array  # [K, G] worst mean shift per group
    shift_at: IntArray  # [K, G] its channel
    ratio: Array  # [K, G] worst |log variance ratio| per group
    ratio_at: IntArray  # [K, G] its channel


@dataclass(frozen=True)
class Rule:
    name: str
    groups: tuple[int, ...]  # group indices the rule looks at
    t_mean: Array  # [G] per group (only the rule's groups are read)
    t_var: Array  # [G]
    first: int = 0  # checks after fewer examples than this never fire


@dataclass(frozen=True)
class Fired:
    group: int
    channel: int
    stat: str  # "mean" or "var"


def alarms(trace: Trace, rule: Rule) -> BoolArray:
    """Per check: does any of the rule's groups score over its threshold?"""
    g = list(rule.groups)
    over_mean = np.any(trace.shift[:, g] > rule.t_mean[g], axis=1)
    over_var = np.any(trace.ratio[:, g] > rule.t_var[g], axis=1)
    fired: BoolArray = np.asarray((over_mean | over_var) & (trace.examples >= rule.first),
                                  dtype=np.bool_)
    return fired


def threshold(stream_maxima: Array, share: float) -> float:
    """The smallest threshold that at most ``floor(share * n)`` of the n streams exceed (an
    alarm needs a score strictly above the threshold)."""
    ranked = np.sort(np.asarray(stream_maxima, dtype=np.float64))[::-1]
    k = math.floor(share * ranked.size)
    if k >= ranked.size:
        raise ValueError(f"a share of {share} allows every one of {ranked.size} streams")
    return float(ranked[k])


def calibrate(name: str, traces: list[Trace], groups: tuple[int, ...], budget: float,
              first: int = 0) -> Rule:
    """Per group of the rule and per statistic, a threshold from in-distribution traces (their
    checks from ``first`` examples on), the false-alarm ``budget`` split evenly over them (so
    that at most ``budget`` of these streams alarm)."""
    share = budget / (2 * len(groups))
    t_mean = np.full(traces[0].shift.shape[1], math.inf)
    t_var = np.full(traces[0].shift.shape[1], math.inf)
    for g in groups:
        t_mean[g] = threshold(np.array([t.shift[t.examples >= first, g].max() for t in traces]),
                              share)
        t_var[g] = threshold(np.array([t.ratio[t.examples >= first, g].max() for t in traces]),
                             share)
    return Rule(name, groups, t_mean, t_var, first)


def first_alarm(trace: Trace, rule: Rule, start: int) -> int | None:
    """The index of the first check after drifted examples arrived (``examples > start``)
    at which the rule fires; None if it never does."""
    hit = np.flatnonzero(alarms(trace, rule) & (trace.examples > start))
    return int(hit[0]) if hit.size else None


def delay(trace: Trace, rule: Rule, start: int) -> int | None:
    """Drifted examples observed when the alarm first fires (None: not detected)."""
    k = first_alarm(trace, rule, start)
    return None if k is None else int(trace.examples[k]) - start


def onsets(alarm: BoolArray) -> int:
    """Alarm episodes: checks where the rule fires and did not at the check before (an alarm
    at the first check counts as one)."""
    a = np.asarray(alarm, dtype=np.bool_)
    return int(a[0]) + int((a[1:] & ~a[:-1]).sum()) if a.size else 0


def episodes(trace: Trace, rule: Rule) -> list[int]:
    """Each alarm episode's length in examples: from its first firing check to the first check
    that does not fire (or to the last check, for one still on at the end)."""
    a = alarms(trace, rule)
    ex = trace.examples
    out = []
    on: int | None = None
    for k in range(a.size):
        if a[k] and on is None:
            on = k
        elif not a[k] and on is not None:
            out.append(int(ex[k] - ex[on]))
            on = None
    if on is not None:
        out.append(int(ex[-1] - ex[on]))
    return out


def fired(trace: Trace, rule: Rule, k: int) -> Fired:
    """What fired at check ``k``: the rule's channel furthest over its threshold."""
    best: tuple[float, Fired] | None = None
    for g in rule.groups:
        for stat, value, at, t in (("mean", trace.shift, trace.shift_at, rule.t_mean[g]),
                                   ("var", trace.ratio, trace.ratio_at, rule.t_var[g])):
            excess = float(value[k, g]) / t if t > 0 else math.inf
            if best is None or excess > best[0]:
                best = (excess, Fired(g, int(at[k, g]), stat))
    assert best is not None, "a rule has at least one group"
    return best[1]


def quantile_delay(delays: list[int | None], q: float) -> float:
    """The q-quantile of the delays, an undetected stream counting as never (inf); always an
    observed delay (between two, the higher: numpy's method "higher")."""
    d = np.array([math.inf if v is None else v for v in delays], dtype=np.float64)
    return float(np.quantile(d, q, method="higher"))


# One shipped alert: `<metric>{group="input"} > x` or `<metric>{group!="input"} > x`.
_EXPR = re.compile(r'^\s*bnserve_drift_(mean_shift|abs_log_var_ratio)\{group(=|!=)"input"\}'
                   r'\s*>\s*([0-9]+(?:\.[0-9]+)?)\s*$')


@dataclass(frozen=True)
class ShippedAlert:
    name: str
    stat: str  # "mean" or "var"
    inputs: bool  # True: group="input"; False: every other group (the batch norms)
    threshold: float
    for_: str  # the rule's `for:` duration, as written ("" when absent)


def parse_alerts(rules: Any) -> list[ShippedAlert]:
    """The drift alerts of a parsed Prometheus rules document (``yaml.safe_load`` of the rules
    file). Only the forms bnserve ships are understood; anything else is a ValueError, so a
    changed rules file cannot be silently misread."""
    out = []
    groups = rules.get("groups") if isinstance(rules, dict) else None
    if not isinstance(groups, list):
        raise ValueError("rules: expected a top-level 'groups' list")
    for group in groups:
        for r in group.get("rules", []) if isinstance(group, dict) else []:
            if not isinstance(r, dict) or "alert" not in r:
                continue
            expr = str(r.get("expr", ""))
            m = _EXPR.match(expr)
            if m is None:
                raise ValueError(f"rules: alert {r['alert']!r}: cannot read the expression "
                                 f"{expr!r} (expected bnserve_drift_<score>{{group=\"input\"}} "
                                 "> number, or group!=)")
            out.append(ShippedAlert(str(r["alert"]), "mean" if m[1] == "mean_shift" else "var",
                                    m[2] == "=", float(m[3]), str(r.get("for", ""))))
    if not out:
        raise ValueError("rules: no alert found")
    return out


def shipped_rule(name: str, alerts: Sequence[ShippedAlert], kinds: Sequence[str], first: int
                 ) -> Rule:
    """The shipped alerts as one rule over all groups (``kinds``: each group's kind, "input" or
    not); a score no alert watches gets threshold inf. The `for:` duration is not modelled."""
    t_mean = np.full(len(kinds), math.inf)
    t_var = np.full(len(kinds), math.inf)
    for a in alerts:
        for g, kind in enumerate(kinds):
            if (kind == "input") == a.inputs:
                t = t_mean if a.stat == "mean" else t_var
                t[g] = min(t[g], a.threshold)
    return Rule(name, tuple(range(len(kinds))), t_mean, t_var, first)
