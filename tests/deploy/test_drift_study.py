"""The drift study (benchmarks/drift_study.py): its bookkeeping on streams whose answer is known
by construction, its streams, and a small real run (exported model, ONNX Runtime, DriftMonitor)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from app.drift import Reference
from app.settings import Settings
from benchmarks import drift_alarms as al
from benchmarks import drift_report
from benchmarks import drift_streams as ds
from benchmarks import drift_study as study
from model_export import checkpoint, data, train

TAU = 1000.0


def _one_channel() -> Reference:
    return Reference.parse(json.dumps({"format": "bnserve-drift/1", "groups": [
        {"name": "input", "kind": "input", "tensor": "features", "channel_names": ["a"],
         "mean": [0.0], "std": [1.0]}]}))


def _ewma_delay(level: float, start: int, t_mean: float, k: int) -> tuple[int, int]:
    """(watched drifted examples, served drifted examples) until the bias-corrected EWMA is over
    ``t_mean`` when served examples 0, k, 2k, ... are watched with time constant TAU / k: w0 =
    ceil(start / k) watched zeros, then ``level`` x w, so m_w = level (1 - b^w) / (1 - b^(w0 +
    w)), b = 1 - k / TAU; the w-th drifted watched example is served example k (w0 + w - 1)."""
    b = 1.0 - k / TAU
    w0 = math.ceil(start / k)
    w = 1
    while level * (1 - b**w) / (1 - b ** (w0 + w)) <= t_mean:
        w += 1
    return w, k * (w0 + w - 1) + 1 - start


@pytest.mark.parametrize("start", [3000, 3003])
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize(("level", "t_mean"), [(1.0, 0.3), (10.0, 1.0), (-2.0, 1.0)])
def test_delay_is_the_closed_form_one_on_a_step(level: float, t_mean: float, k: int,
                                                start: int) -> None:
    """A channel sitting at its mean, then stepping to ``level`` stds, one in k served examples
    watched: checked after every served example, the delay is the served example at which the
    sampled EWMA's closed form first exceeds the threshold."""
    length = 6000
    x = np.zeros((length, 1), dtype=np.float32)
    x[start:] = level
    if k > 1:  # examples the service does not watch: they must not count at all
        unwatched = np.arange(length) % k != 0
        x[unwatched & (np.arange(length) < start)] = 50.0
    trace = study.monitor_trace(_one_channel(), {"features": x}, TAU, int(TAU), 1, k)
    rule = al.Rule("mean only", (0,), np.array([t_mean]), np.array([math.inf]))
    watched, expected = _ewma_delay(abs(level), start, t_mean, k)
    assert watched > 1  # not trivially at the first watched example
    assert al.delay(trace, rule, start) == expected
    # read every 10 served examples instead: the same delay rounded up to the next check
    coarse = study.monitor_trace(_one_channel(), {"features": x}, TAU, int(TAU), 10, k)
    assert al.delay(coarse, rule, start) == 10 * math.ceil((start + expected) / 10) - start
    # never over the threshold before the step: no alarm on the undrifted part
    assert not al.alarms(trace, rule)[trace.examples <= start].any()


def test_the_service_defaults_are_the_studys() -> None:
    """The study reads the service's settings: k from BNSERVE_DRIFT_SAMPLE_EVERY's default, and
    the monitor's time constant is the one the service computes for k."""
    s = Settings()
    d = study.Design()
    assert (d.sample_every, d.time_constant, d.min_examples) == (
        s.drift_sample_every, s.drift_time_constant, s.drift_min_examples)
    assert study.watched_time_constant(d.time_constant, d.sample_every) == \
        s.drift_watched_time_constant
    # 1 + (m - 1) k served one-example runs hold m watched ones, one fewer do not
    for k, m in ((8, 100), (1, 100), (3, 1)):
        first = study.exporting_from(m, k)
        assert study.watched_count(first, k) == m
        assert study.watched_count(first - 1, k) == m - 1


def test_checks_before_a_rules_first_example_never_fire() -> None:
    ex = np.arange(780, 840, 10, dtype=np.int64)
    shift = np.full((ex.size, 1), 2.0)
    zeros = np.zeros_like(shift)
    at = np.zeros(shift.shape, np.int64)
    trace = al.Trace(ex, shift, at, zeros, at)
    rule = al.Rule("r", (0,), np.array([1.0]), np.array([1.0]), first=793)
    np.testing.assert_array_equal(al.alarms(trace, rule), ex >= 800)
    cal = al.calibrate("c", [al.Trace(ex, shift * (ex[:, None] < 800) + 0.5, at, zeros, at)],
                       (0,), 0.0, first=800)
    assert cal.t_mean[0] == 0.5  # the 2.5 before 800 is ignored
    assert cal.first == 800


def test_an_alarm_before_the_drift_is_not_a_detection() -> None:
    ex = np.arange(1000, 1100, 10, dtype=np.int64)
    shift = np.array([[0.0], [0.9], [0.0], [0.0], [0.0], [0.0], [0.9], [0.9], [0.0], [0.9]])
    zeros = np.zeros_like(shift)
    trace = al.Trace(ex, shift, np.zeros(shift.shape, np.int64), zeros,
                     np.zeros(shift.shape, np.int64))
    rule = al.Rule("r", (0,), np.array([0.5]), np.array([1.0]))
    assert al.delay(trace, rule, 1030) == 1060 - 1030  # not the alarm at 1010
    assert al.delay(trace, rule, 1090) is None  # nothing after the last check
    assert al.onsets(al.alarms(trace, rule)) == 3  # 1010, 1060-1070, 1090


def test_fired_names_the_channel_furthest_over_its_threshold() -> None:
    ex = np.array([1000], dtype=np.int64)
    trace = al.Trace(ex, np.array([[0.6, 0.9]]), np.array([[4, 7]]), np.array([[0.1, 2.5]]),
                     np.array([[1, 3]]))
    rule = al.Rule("r", (0, 1), np.array([0.5, 1.0]), np.array([1.0, 2.0]))
    # ratios to thresholds: g0 mean 1.2, g0 var 0.1, g1 mean 0.9, g1 var 1.25
    assert al.fired(trace, rule, 0) == al.Fired(1, 3, "var")
    assert al.fired(trace, al.Rule("g0", (0,), rule.t_mean, rule.t_var), 0) == al.Fired(
        0, 4, "mean")


def test_threshold_is_the_smallest_the_budget_allows() -> None:
    rng = np.random.default_rng(1)
    for n, share in ((200, 0.005), (200, 0.02), (37, 0.1), (10, 0.0)):
        maxima = rng.exponential(size=n)
        t = al.threshold(maxima, share)
        allowed = math.floor(share * n)
        assert (maxima > t).sum() <= allowed
        lower = maxima[maxima < t]
        if lower.size:  # any lower threshold lets one stream too many through
            assert (maxima > lower.max()).sum() > allowed
    with pytest.raises(ValueError, match="allows every one"):
        al.threshold(np.ones(4), 1.0)


def test_calibration_keeps_every_rule_within_its_budget() -> None:
    """Per group and statistic at most floor(budget / (2 groups) * n) calibration streams over
    the threshold; groups outside the rule never fire."""
    rng = np.random.default_rng(2)
    ex = np.arange(1000, 1500, 10, dtype=np.int64)
    traces = []
    for _ in range(300):
        shift, ratio = rng.exponential(size=(ex.size, 3)), rng.exponential(size=(ex.size, 3))
        at = np.zeros((ex.size, 3), dtype=np.int64)
        traces.append(al.Trace(ex, shift * [1, 2, 3], at, ratio, at))
    for groups in ((0, 1, 2), (0,), (1, 2)):
        rule = al.calibrate("r", traces, groups, 0.06)
        allowed = math.floor(0.06 / (2 * len(groups)) * 300)
        for g in range(3):
            over_mean = sum(bool((t.shift[:, g] > rule.t_mean[g]).any()) for t in traces)
            over_var = sum(bool((t.ratio[:, g] > rule.t_var[g]).any()) for t in traces)
            if g in groups:
                assert 0 < over_mean <= allowed
                assert 0 < over_var <= allowed
            else:
                assert rule.t_mean[g] == rule.t_var[g] == math.inf
        alarmed = sum(bool(al.alarms(t, rule).any()) for t in traces)
        assert alarmed <= math.floor(0.06 * 300)


def test_quantile_delay_counts_undetected_streams_as_never() -> None:
    assert al.quantile_delay([30, None, 10, 20, 40], 0.5) == 30
    assert al.quantile_delay([10, 20, 30, None], 0.5) == 30  # an observed delay, the higher one
    assert al.quantile_delay([10, None, None], 0.5) == math.inf


_RULES = """
groups:
  - name: g
    rules:
      - record: not_an_alert
        expr: sum(x)
      - alert: In
        expr: bnserve_drift_mean_shift{group="input"} > 0.75
        for: 5m
      - alert: InVar
        expr: bnserve_drift_abs_log_var_ratio{group="input"} >  2
      - alert: Layers
        expr: bnserve_drift_mean_shift{group!="input"} > 1.25
        for: 10m
"""


def test_the_shipped_rules_thresholds_are_read_from_their_promql() -> None:
    alerts = al.parse_alerts(yaml.safe_load(_RULES))
    assert alerts == [al.ShippedAlert("In", "mean", True, 0.75, "5m"),
                      al.ShippedAlert("InVar", "var", True, 2.0, ""),
                      al.ShippedAlert("Layers", "mean", False, 1.25, "10m")]
    rule = al.shipped_rule("s", alerts, ["input", "batchnorm", "batchnorm"], 793)
    np.testing.assert_array_equal(rule.t_mean, [0.75, 1.25, 1.25])
    np.testing.assert_array_equal(rule.t_var, [2.0, math.inf, math.inf])
    assert rule.groups == (0, 1, 2)
    assert rule.first == 793
    for bad in ("bnserve_drift_mean_shift > 1", 'bnserve_drift_mean_shift{group="input"} < 1',
                'avg(bnserve_drift_mean_shift{group="input"}) > 1'):
        doc = {"groups": [{"rules": [{"alert": "A", "expr": bad}]}]}
        with pytest.raises(ValueError, match="cannot read the expression"):
            al.parse_alerts(doc)
    with pytest.raises(ValueError, match="no alert"):
        al.parse_alerts({"groups": [{"rules": [{"record": "r", "expr": "x"}]}]})


def test_the_shipped_rules_file_parses_to_every_alert_it_has() -> None:
    """The real file: every alert read, each threshold the number in its own expression."""
    doc = yaml.safe_load(study.RULES.read_text())
    alerts = al.parse_alerts(doc)
    exprs = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert [a.name for a in alerts] == list(exprs)
    for a in alerts:
        assert exprs[a.name]["expr"].rstrip().endswith(f"> {a.threshold:g}")
        assert a.for_ == exprs[a.name].get("for", "")
    assert {(a.inputs, a.stat) for a in alerts} >= {(True, "mean"), (False, "mean")}


def _pool() -> ds.Pool:
    rng = np.random.default_rng(0)
    return ds.Pool(rng.normal(5.0, 2.0, size=(50, 6)), (np.arange(50) % 3 == 0).astype(np.int64))


@pytest.mark.parametrize("scenario", ds.SCENARIOS, ids=lambda s: s.name)
def test_each_scenario_leaves_the_rows_before_the_drift_alone(scenario: ds.Scenario) -> None:
    pool = _pool()
    ctx = ds.Context(pool.x.mean(axis=0), pool.x.std(axis=0), 1)
    plain = ds.no_drift(pool, ctx, 400, 200, np.random.default_rng(7))
    s = scenario.make(pool, ctx, 400, 200, np.random.default_rng(7))
    np.testing.assert_array_equal(s.x[:200], plain.x[:200])
    if scenario.name != "no drift":
        assert s.start == 200
        assert not np.array_equal(s.x[200:], plain.x[200:])


def test_the_drifts_do_what_they_say() -> None:
    pool = _pool()
    ctx = ds.Context(pool.x.mean(axis=0), pool.x.std(axis=0), 1)

    def rng() -> np.random.Generator:
        return np.random.default_rng(3)

    plain = ds.no_drift(pool, ctx, 400, 100, rng()).x
    x10 = ds.scaled(10.0)(pool, ctx, 400, 100, rng())
    (f,) = x10.features
    np.testing.assert_array_equal(x10.x[100:, f], 10 * plain[100:, f])
    np.testing.assert_array_equal(np.delete(x10.x, f, axis=1), np.delete(plain, f, axis=1))
    off = ds.offset(3, 1.0)(pool, ctx, 400, 100, rng())
    np.testing.assert_allclose(off.x[100:] - plain[100:],
                               np.broadcast_to(np.isin(np.arange(6), off.features) * ctx.std,
                                               (300, 6)), atol=1e-12)
    sw = ds.swapped(pool, ctx, 400, 100, rng())
    a, b = sw.features
    np.testing.assert_array_equal(sw.x[100:, [a, b]], plain[100:, [b, a]])
    slow = ds.linear(1.0)(pool, ctx, 400, 100, rng())
    np.testing.assert_allclose((slow.x[-1] - plain[-1]) / ctx.std, 1.0)  # +1 std at the end
    np.testing.assert_allclose((slow.x[100] - plain[100]) / ctx.std, 1 / 300)
    mix = ds.class_mix(0.9)(pool, ctx, 20_000, 100, rng())
    rows = {tuple(r): y for r, y in zip(pool.x.tolist(), pool.y.tolist(), strict=True)}
    share = np.mean([rows[tuple(r)] == 1 for r in mix.x[100:].tolist()])
    assert abs(share - 0.9) < 0.01  # binomial sd 0.002; the pool's own share is 0.34


@pytest.mark.slow
def test_a_small_real_study_detects_x10_and_keeps_its_budget(tmp_path: Path) -> None:
    """Real pieces end to end on fewer streams, sampled as the service does: the x10 feature is
    detected in every stream, first by the input group naming the drifted feature, and the
    held-out no-drift streams alarm about as often as the calibrated budget allows."""
    res = train.train(data.load_default(), train.TrainConfig(), log=lambda _: None)
    path = tmp_path / "m.ckpt"
    checkpoint.save(path, res.net, res.meta, res.x_val, res.y_val)
    model_bytes, held_out, training, ctx = study.held_out_and_training(path)
    assert held_out.x.shape[0] + training.x.shape[0] == data.load_default().x.shape[0]
    np.testing.assert_array_equal(training.x, res.x_train)
    design = study.Design(streams=4, null_streams=10, calibration_streams=40, check_every=50)
    result = study.run(study.load_model(model_bytes), held_out, training, ctx, design,
                       log=lambda _: None)
    x10 = next(r for r in result["detection"] if r["scenario"] == "x10 units")
    assert result["detection"][0]["scenario"] == "no drift"  # the chance baseline row
    assert x10["all groups"]["detected"] == 4
    assert x10["input alone"]["detected"] == 4
    assert x10["input alone"]["input_feature_right"] == 4
    assert x10["all groups"]["delay_p90"] is not None
    assert x10["all groups"]["delay_p90"] <= 200  # a 10x feature moves the EWMA in tens
    for fa in result["false_alarms"]:  # a 3 % budget: 3+ of 10 would be a 1-in-300 event
        assert fa["rule"] == "shipped rules" or fa["held_out_streams_alarmed"] <= 2, fa
    assert len(result["groups"]) == 3  # input, bn0, bn1
    assert x10["shipped rules"]["detected"] == 4  # a 10x feature is far over 1 std too
    assert "| x10 units | 4/4 |" in drift_report.tables(result)
    shipped = next(f for f in result["false_alarms"] if f["rule"] == "shipped rules")
    assert shipped["from_example"] == study.exporting_from(design.min_examples,
                                                           design.sample_every)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert study.main(["--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "drift_study: error: checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--check-every", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--sample-every", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--time-constant", "0.5"])
    assert "expected a number >= 1" in capsys.readouterr().err
    assert study.main(["--rules", str(tmp_path / "none.yml")]) == 2
    assert "cannot read the shipped rules" in capsys.readouterr().err


def test_episodes_measure_each_alarm_in_examples() -> None:
    ex = np.arange(1000, 1100, 10, dtype=np.int64)
    shift = np.array([[0.9], [0.9], [0.0], [0.0], [0.9], [0.0], [0.0], [0.0], [0.9], [0.9]])
    at = np.zeros(shift.shape, np.int64)
    trace = al.Trace(ex, shift, at, np.zeros_like(shift), at)
    rule = al.Rule("r", (0,), np.array([0.5]), np.array([1.0]))
    # on 1000-1010 (off at 1020), on 1040 (off at 1050), on from 1080 to the end at 1090
    assert al.episodes(trace, rule) == [20, 10, 10]
    assert len(al.episodes(trace, rule)) == al.onsets(al.alarms(trace, rule))
