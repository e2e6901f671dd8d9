"""The drift study's tables (benchmarks/drift_study.py's result -> markdown)."""

from __future__ import annotations

from typing import Any


def _delay(v: float | None, d: dict[str, Any]) -> str:
    """A delay quantile; None: more than half (or 10 %) of the streams were never detected."""
    return f"> {d['length'] - d['start']:,}" if v is None else f"{int(v):,}"


def _from(result: dict[str, Any], rule: str) -> int:
    return int(next(f["from_example"] for f in result["false_alarms"] if f["rule"] == rule))


def _t(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def describe(result: dict[str, Any]) -> str:
    d = result["design"]
    return "\n".join([
        f"model {result['model_version']}; groups "
        + ", ".join(f"{g['name']} ({g['channels']} channels)" for g in result["groups"]),
        f"streams: {d['length']:,} examples sampled with replacement from the "
        f"{result['held_out_rows']} held-out rows, drift from example {d['start']:,}; "
        f"{d['streams']} seeded streams per drift, {d['null_streams']} without drift",
        f"monitor: app.drift.DriftMonitor as the service feeds it: one in {d['sample_every']} "
        f"one-example runs watched, time constant {d['time_constant']:,.0f} served = "
        f"{result['watched_time_constant']:,.0f} watched examples; report read every "
        f"{d['check_every']} served examples (delays in served examples, rounded up to a check)",
        f"rule: alarm when any group's worst mean shift > its T_mean or worst |log var ratio| "
        f"> its T_var; thresholds from {d['calibration_streams']} no-drift streams of training "
        f"rows (each from a bootstrap population of {result['calibration_population']} of the "
        f"{result['training_rows']} training rows), false-alarm budget {d['budget']:.0%} of "
        "streams split evenly over the groups and the two scores; checked on as many fresh "
        "streams of the same kind (other seeds); calibrated rules checked from example "
        f"{int(d['time_constant']):,} (one time constant) on",
        "shipped rules: " + "; ".join(
            f"{a['name']}: {'input' if a['inputs'] else 'batch norms'} "
            f"{'mean shift' if a['stat'] == 'mean' else '|log var ratio|'} > {a['threshold']:g}"
            f" for {a['for_'] or '0s'}" for a in result["shipped_alerts"])
        + f"; checked from example {_from(result, 'shipped rules'):,} on (scores exported from "
        f"{d['min_examples']} watched examples); the `for:` duration is not modelled",
        f"class mix: the malignant share is {result['positive_share']:.0%} in the held-out rows",
        "drifts: " + "; ".join(f"{r['scenario']}: {r['what']}" for r in result["detection"]
                               if r["scenario"] != "no drift"),
    ])


def tables(result: dict[str, Any]) -> str:
    d = result["design"]
    rules = [f["rule"] for f in result["false_alarms"]]
    out = [f"| drift (from example {d['start']:,}) | detected | delay median | delay p90 | "
           "fired first |" + "".join(f" {r}: detected, median |" for r in rules[1:]),
           "|---|---|---|---|---|" + "---|" * len(rules[1:])]
    for row in result["detection"]:
        a = row[rules[0]]
        first = ", ".join(f"{g} {n}" for g, n in a["fired_first"].items())
        if row["named_features"]:
            n_input = a["fired_first"].get("input", 0)
            if n_input:
                first += f" (drifted feature {a['input_feature_right']}/{n_input})"
        scenario = row["scenario"] + (" (chance)" if row["scenario"] == "no drift"
                                      else "")
        cells = [scenario, f"{a['detected']}/{a['streams']}",
                 _delay(a["delay_median"], d), _delay(a["delay_p90"], d), first or "-"]
        cells += [f"{row[r]['detected']}/{row[r]['streams']}, {_delay(row[r]['delay_median'], d)}"
                  for r in rules[1:]]
        out.append("| " + " | ".join(cells) + " |")
    own = {g["name"]: g for g in result["groups"]}
    out += ["", "| rule | group | T_mean | T_var | held-out rows' own mean shift, "
            "abs log var ratio |", "|---|---|---|---|---|"]
    out += [f"| {f['rule']} | {name} | {_t(t['t_mean'])} | {_t(t['t_var'])} | "
            f"{own[name]['held_out_mean_shift']:.3f}, "
            f"{own[name]['held_out_abs_log_var_ratio']:.3f} |"
            for f in result["false_alarms"] for name, t in f["thresholds"].items()]
    out += ["", "| rule | calibration streams alarmed | fresh training-row streams alarmed | "
            "held-out no-drift streams alarmed | held-out false alarms per 1,000 examples | "
            "checked from example | held-out: fired first; longest alarm, examples |",
            "|---|---|---|---|---|---|---|"]
    for f in result["false_alarms"]:
        n = d["calibration_streams"]
        out.append(f"| {f['rule']} | {f['calibration_streams_alarmed']}/{n} | "
                   f"{f['fresh_training_streams_alarmed']}/{n} | {f['held_out_streams_alarmed']}/"
                   f"{d['null_streams']} | {1000 * f['alarms'] / f['examples_checked']:.4f} "
                   f"({f['alarms']} in {f['examples_checked']:,}) | {f['from_example']:,} | "
                   + (", ".join(f"{k} {v}" for k, v in f["held_out_fired_first"].items()) or "-")
                   + f"; {f['longest_episode']:,} |")
    return "\n".join(out)
