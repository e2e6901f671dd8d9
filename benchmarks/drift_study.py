"""``make drift-study``: does the drift monitor see simulated drifts, and how soon, and how often
does it cry wolf? Prints the README's tables and writes them to reports/drift-study.json.

The real pieces: the model exported by bnserve's export (its ``drift.*`` outputs carry the
batch-norm activations, its ``drift_reference`` metadata what they should look like), run by ONNX
Runtime on each whole stream at once, and ``app.drift.DriftMonitor`` fed what the service feeds
it by default (app/plane.py, app/state.py): every k-th run (BNSERVE_DRIFT_SAMPLE_EVERY) with its
examples, one served example per run here (one-example requests), with the time constant
BNSERVE_DRIFT_TIME_CONSTANT / k watched examples (Settings.drift_watched_time_constant). Its
report is read every ``--check-every`` served examples; delays are in served examples.

Design (benchmarks/drift_streams.py has the drifts, benchmarks/drift_alarms.py the bookkeeping):
  * Streams of 6,000 examples sampled with replacement (seeded) from the checkpoint's held-out
    (validation) rows; drift from example 3,000 on, long after the monitor has settled.
  * Rule: alarm when, in any group (the input, each batch-norm layer), the worst standardised
    mean shift > that group's T_mean or the worst |log variance ratio| > its T_var, checked from
    1,000 examples on (one time constant).
  * The thresholds come from a false-alarm budget (3 % of streams, split evenly over the groups
    and the two statistics) on no-drift streams made from the TRAINING rows, never from the
    held-out ones. Each calibration stream samples a bootstrap population of m training rows,
    1/m = 1/n_val + 1/n_train, so that its statistics differ from the training ones by as much
    as a fresh held-out set's would: a finite population is never exactly the reference, and
    the threshold has to allow for that, not only for the monitor's own noise.
  * The same rule on the input group alone and on the batch-norm layers alone, each calibrated
    to the same budget: what the layers add to watching the inputs.
  * A "no drift" row made like the drift rows: how often each rule "detects" by chance in the
    3,000 examples after the (absent) drift start, the baseline for the detection column.
  * The shipped alert rules (deploy/monitoring/bnserve-drift-rules.yml, thresholds read from
    their PromQL) on the same streams, from the first served example at which the service
    exports scores (BNSERVE_DRIFT_MIN_EXAMPLES watched examples); their `for:` duration is not
    modelled (it adds its time to every delay, and ignores alarms shorter than it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from numpy.typing import NDArray

from app.drift import DriftMonitor, Reference
from app.settings import Settings
from benchmarks import drift_alarms as al
from benchmarks import drift_report
from benchmarks import drift_streams as ds
from model_export import checkpoint, data, export, train

F32 = NDArray[np.float32]
REPORT = Path("reports/drift-study.json")
RULES = Path("deploy/monitoring/bnserve-drift-rules.yml")
_DEFAULTS = Settings.model_fields  # the service's defaults, not copies of them


def _default(name: str) -> Any:
    return _DEFAULTS[name].default


def watched_time_constant(time_constant: float, sample_every: int) -> float:
    """The monitor's time constant in watched examples, as the service computes it."""
    return Settings.model_construct(drift_time_constant=time_constant,
                                    drift_sample_every=sample_every).drift_watched_time_constant


def watched_count(served: int, sample_every: int) -> int:
    """Watched examples among the first ``served`` one-example runs: the service watches runs
    0, k, 2k, ... (app/plane.py: ``next(runs) % k == 0``)."""
    return -(-served // sample_every)


def exporting_from(min_examples: int, sample_every: int) -> int:
    """The first served count at which the service exports scores (watched >= min examples)."""
    return max(1, (max(1, min_examples) - 1) * sample_every + 1)


@dataclass(frozen=True)
class Design:
    length: int = 6000
    start: int = 3000
    time_constant: float = float(_default("drift_time_constant"))  # in served examples
    sample_every: int = int(_default("drift_sample_every"))
    min_examples: int = int(_default("drift_min_examples"))  # watched, for the shipped rules
    check_every: int = 10
    streams: int = 50  # per drift scenario
    null_streams: int = 200  # no-drift held-out streams (false alarms)
    calibration_streams: int = 200
    budget: float = 0.03  # of calibration streams allowed to alarm (split over groups, stats)
    seed: int = 0


@dataclass(frozen=True)
class Model:
    session: ort.InferenceSession
    reference: Reference
    version: str

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.reference.groups)

    def channel(self, group: int, channel: int) -> str:
        g = self.reference.groups[group]
        return g.channel_names[channel] if g.channel_names is not None else f"#{channel}"


def load_model(model_bytes: bytes) -> Model:
    props = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}
    if "drift_reference" not in props:
        raise ValueError("the model carries no drift_reference (exported without drift outputs?)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return Model(sess, Reference.parse(props["drift_reference"]), props.get("model_version", ""))


def tensors(model: Model, x: NDArray[np.float64]) -> dict[str, F32]:
    """Every watched tensor for the examples ``x``: the input and the drift.* outputs."""
    x32 = x.astype(np.float32)
    names = list(model.reference.tensors)
    outs = model.session.run(names, {"features": x32})
    return {"features": x32, **{n: np.asarray(v) for n, v in zip(names, outs, strict=True)}}


def trace(model: Model, x: NDArray[np.float64], d: Design, first: int) -> al.Trace:
    """The stream's scores: ONNX Runtime on the whole stream, then the monitor (below)."""
    return monitor_trace(model.reference, tensors(model, x), d.time_constant, first,
                         d.check_every, d.sample_every)


def monitor_trace(reference: Reference, t: dict[str, F32], time_constant: float, first: int,
                  every: int, sample_every: int = 1) -> al.Trace:
    """Serves the examples one per run, in order: a fresh DriftMonitor watches every
    ``sample_every``-th run with the service's time constant for it, and its report is read
    after ``first`` served examples and every ``every`` served examples after that."""
    n_examples = next(iter(t.values())).shape[0]
    t = {name: v[::sample_every] for name, v in t.items()}  # the watched runs' examples
    monitor = DriftMonitor(reference, watched_time_constant(time_constant, sample_every),
                           block=n_examples)  # fold on report
    checks = np.arange(first, n_examples + 1, every, dtype=np.int64)
    g = len(reference.groups)
    shift, ratio = np.zeros((checks.size, g)), np.zeros((checks.size, g))
    shift_at = np.zeros((checks.size, g), dtype=np.int64)
    ratio_at = np.zeros((checks.size, g), dtype=np.int64)
    seen = 0
    for k, served in enumerate(checks):
        n = watched_count(int(served), sample_every)
        if n > seen:
            monitor.observe({name: v[seen:n] for name, v in t.items()})
        seen = n
        report = monitor.report()
        assert report.examples == n, (report.examples, n)  # nothing dropped, nothing pending
        for j, gr in enumerate(report.groups):
            # fmax: a skipped channel's NaN becomes -1, which never fires
            ms, lv = np.fmax(gr.mean_shift, -1.0), np.fmax(np.abs(gr.log_var_ratio), -1.0)
            shift_at[k, j], ratio_at[k, j] = int(ms.argmax()), int(lv.argmax())
            shift[k, j], ratio[k, j] = ms[shift_at[k, j]], lv[ratio_at[k, j]]
    return al.Trace(checks, shift, shift_at, ratio, ratio_at)


def population_scores(model: Model, x: NDArray[np.float64]) -> list[tuple[float, float]]:
    """Per group, the worst mean shift and |log variance ratio| of the rows ``x`` themselves
    (their exact mean and variance, no averaging over time): where an endless replay of them
    settles, before the monitor's noise."""
    t = tensors(model, x)
    out = []
    for g in model.reference.groups:
        v = t[g.tensor].astype(np.float64)
        live = ~g.dead
        shift = np.abs(v.mean(axis=0) - g.mean)[live] / g.std[live]
        ratio = np.abs(np.log(v.var(axis=0)[live] / g.std[live] ** 2))
        out.append((float(shift.max()), float(ratio.max())))
    return out


def held_out_and_training(ckpt: Path) -> tuple[bytes, ds.Pool, ds.Pool, ds.Context]:
    """The exported model, the held-out rows and the training rows (the checkpoint keeps the
    held-out ones; the training ones are the shipped data's other rows, from the same split)."""
    net, meta, vx, vy = checkpoint.load(ckpt)
    shipped = data.load_default()
    if meta.get("data_sha256") != shipped.sha256:
        raise ValueError(f"{ckpt} was not trained on the shipped data set: the study needs its "
                         "training rows")
    cfg = meta["config"]
    rows, val = data.stratified_split(shipped.y, cfg["val_fraction"],
                                      np.random.default_rng(cfg["seed"]))
    if not np.array_equal(shipped.x[val], vx):
        raise ValueError(f"{ckpt}: its validation rows are not the split its seed gives")
    model = export.export(net, meta, vx, log=lambda _: None).model_bytes
    names = list(meta["class_names"])
    ctx = ds.Context(net.stats["input.mean"], net.stats["input.std"],
                     names.index("malignant") if "malignant" in names else len(names) - 1)
    return model, ds.Pool(vx, vy), ds.Pool(shipped.x[rows], shipped.y[rows]), ctx


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def load_alerts(path: Path = RULES) -> list[al.ShippedAlert]:
    try:
        return al.parse_alerts(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the shipped rules {path}: {e}") from None


def run(model: Model, held_out: ds.Pool, training: ds.Pool, ctx: ds.Context, design: Design,
        log: Any = print, alerts: list[al.ShippedAlert] | None = None) -> dict[str, Any]:
    d, tau = design, int(design.time_constant)
    if not tau <= d.start < d.length:
        raise ValueError("the drift must start after one time constant and before the end")
    alerts = load_alerts() if alerts is None else alerts
    exporting = exporting_from(d.min_examples, d.sample_every)
    # no-drift traces from the first check at which either kind of rule may fire
    first = d.check_every * (min(tau, exporting) // d.check_every) or d.check_every
    m = round(1 / (1 / held_out.x.shape[0] + 1 / training.x.shape[0]))
    t0 = time.perf_counter()

    def training_streams(role: int) -> list[al.Trace]:
        out = []
        for i in range(d.calibration_streams):
            rng = _rng(d.seed, role, i)
            s = ds.no_drift(training.bootstrap(m, rng), ctx, d.length, d.start, rng)
            out.append(trace(model, s.x, d, first))
        return out

    calib = training_streams(0)
    groups = model.reference.groups
    rules = [al.calibrate(name, calib, gs, d.budget, tau) for name, gs in (
        ("all groups", tuple(range(len(groups)))),
        ("input alone", tuple(i for i, g in enumerate(groups) if g.kind == "input")),
        ("batch-norm layers alone", tuple(i for i, g in enumerate(groups) if g.kind != "input")),
    ) if gs]
    rules.append(al.shipped_rule("shipped rules", alerts, [g.kind for g in groups], exporting))
    log(f"calibrated on {d.calibration_streams} training-row streams "
        f"({time.perf_counter() - t0:.1f} s)")
    fresh = training_streams(3)  # the same kind of streams, not used for calibration
    null = [trace(model, ds.no_drift(held_out, ctx, d.length, d.start, _rng(d.seed, 1, i)).x,
                  d, first) for i in range(d.null_streams)]
    false_alarms = [{
        "rule": r.name, "from_example": r.first,
        "thresholds": {groups[g].name: {"t_mean": _finite(float(r.t_mean[g])),
                                        "t_var": _finite(float(r.t_var[g]))}
                       for g in r.groups},
        "calibration_streams_alarmed": sum(bool(al.alarms(t, r).any()) for t in calib),
        "fresh_training_streams_alarmed": sum(bool(al.alarms(t, r).any()) for t in fresh),
        "held_out_streams_alarmed": sum(bool(al.alarms(t, r).any()) for t in null),
        "alarms": sum(al.onsets(al.alarms(t, r)) for t in null),
        "longest_episode": max((e for t in null for e in al.episodes(t, r)), default=0),
        "held_out_fired_first": _fired_first(model, null, r, 0),
        "examples_checked": len(null) * (d.length - r.first),
    } for r in rules]
    detections = []
    for s_i, sc in enumerate(ds.SCENARIOS):  # "no drift" first: alarms there are by chance
        streams = [sc.make(held_out, ctx, d.length, d.start, _rng(d.seed, 2, s_i, i))
                   for i in range(d.streams)]
        traces = [trace(model, s.x, d, d.start + d.check_every) for s in streams]
        detections.append(_detection(model, sc, streams, traces, rules, d))
    log(f"{len(detections) * d.streams + d.null_streams + 2 * d.calibration_streams} streams in "
        f"{time.perf_counter() - t0:.1f} s")
    own = population_scores(model, held_out.x)
    return {"design": asdict(d), "model_version": model.version,
            "held_out_rows": int(held_out.x.shape[0]), "training_rows": int(training.x.shape[0]),
            "calibration_population": m,
            "watched_time_constant": watched_time_constant(d.time_constant, d.sample_every),
            "shipped_alerts": [asdict(a) for a in alerts],
            "positive_share": float((held_out.y == ctx.positive).mean()),
            "groups": [{"name": g.name, "kind": g.kind, "channels": g.channels,
                        "held_out_mean_shift": own[i][0], "held_out_abs_log_var_ratio": own[i][1]}
                       for i, g in enumerate(groups)],
            "false_alarms": false_alarms, "detection": detections}


def _fired_first(model: Model, traces: list[al.Trace], rule: al.Rule, start: int
                 ) -> dict[str, int]:
    """What fired first in each trace that alarms after ``start``: "group statistic" -> count."""
    first = Counter[str]()
    for t in traces:
        k = al.first_alarm(t, rule, start)
        if k is not None:
            f = al.fired(t, rule, k)
            first[f"{model.group_names[f.group]} {f.stat}"] += 1
    return dict(first.most_common())


def _finite(v: float) -> float | None:
    return None if v == float("inf") else v


def _detection(model: Model, sc: ds.Scenario, streams: list[ds.Stream], traces: list[al.Trace],
               rules: list[al.Rule], d: Design) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": sc.name, "what": sc.what,
                           "named_features": any(s.features for s in streams)}
    for r in rules:
        delays = [al.delay(t, r, d.start) for t in traces]
        first = Counter[str]()
        right = 0
        for s, t in zip(streams, traces, strict=True):
            k = al.first_alarm(t, r, d.start)
            if k is None:
                continue
            f = al.fired(t, r, k)
            first[model.group_names[f.group]] += 1
            is_input = model.reference.groups[f.group].kind == "input"
            right += int(is_input and f.channel in s.features)
        row[r.name] = {
            "detected": sum(v is not None for v in delays), "streams": len(delays),
            "delay_median": _finite(al.quantile_delay(delays, 0.5)),
            "delay_p90": _finite(al.quantile_delay(delays, 0.9)),
            "fired_first": dict(first.most_common()), "input_feature_right": right,
            "delays": delays,
        }
    return row


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _at_least_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drift_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a bnserve-train checkpoint of the shipped data (default: train the "
                   "default model afresh, in a temporary directory)")
    dd = Design()
    p.add_argument("--streams", type=_positive, default=dd.streams, help="per drift scenario")
    p.add_argument("--null-streams", type=_positive, default=dd.null_streams)
    p.add_argument("--calibration-streams", type=_positive, default=dd.calibration_streams)
    p.add_argument("--check-every", type=_positive, default=dd.check_every,
                   help="served examples between two readings of the monitor's report")
    p.add_argument("--sample-every", type=_positive, default=dd.sample_every,
                   help="watch every k-th run, as BNSERVE_DRIFT_SAMPLE_EVERY (default: the "
                   "service's, %(default)s)")
    p.add_argument("--time-constant", type=_at_least_one, default=dd.time_constant,
                   help="in served examples, as BNSERVE_DRIFT_TIME_CONSTANT (default: the "
                   "service's, %(default)s)")
    p.add_argument("--min-examples", type=int, default=dd.min_examples,
                   help="watched examples before the service exports scores, as "
                   "BNSERVE_DRIFT_MIN_EXAMPLES (shipped rules only; default %(default)s)")
    p.add_argument("--rules", type=Path, default=RULES, help="the shipped alert rules")
    p.add_argument("--seed", type=int, default=dd.seed)
    p.add_argument("--json", type=Path, default=REPORT)
    args = p.parse_args(argv)
    design = Design(streams=args.streams, null_streams=args.null_streams,
                    calibration_streams=args.calibration_streams, check_every=args.check_every,
                    sample_every=args.sample_every, time_constant=args.time_constant,
                    min_examples=max(0, args.min_examples), seed=args.seed)
    try:
        alerts = load_alerts(args.rules)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = args.checkpoint
            if ckpt is None:
                ckpt = Path(tmp) / "default.ckpt"
                res = train.train(data.load_default(), train.TrainConfig(), log=lambda _: None)
                checkpoint.save(ckpt, res.net, res.meta, res.x_val, res.y_val)
            model_bytes, held_out, training, ctx = held_out_and_training(ckpt)
        model = load_model(model_bytes)
        result = run(model, held_out, training, ctx, design, alerts=alerts)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"drift_study: error: {e}", file=sys.stderr)
        return 2
    print(drift_report.describe(result), "", drift_report.tables(result), sep="\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
