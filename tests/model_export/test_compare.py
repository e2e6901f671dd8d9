"""The lecture's claims in numbers: batch statistics at test time depend on the batch."""

from __future__ import annotations

import numpy as np
import pytest

from model_export import compare, data, mlp
from model_export.train import TrainConfig, TrainResult


def test_single_example_statistics_give_every_example_the_same_class(
    default_result: TrainResult,
) -> None:
    pred = compare.batch_stat_predictions(
        default_result.net, default_result.x_val, 1, np.random.default_rng(0)
    )
    assert len(set(pred.tolist())) == 1
    ref = mlp.forward_infer(default_result.net, default_result.x_val).argmax(axis=1)
    assert len(set(ref.tolist())) == 2


def test_compare_table_rows(capsys: pytest.CaptureFixture[str]) -> None:
    rows, n_val = compare.compare(data.load_default(), TrainConfig(), [0], [4, 10_000], cuts=3)
    assert n_val == 113
    by = {(r.label[:3], r.batch): r for r in rows}
    assert set(by) == {
        ("(a)", "any"),
        ("(b)", "any"),
        ("(c)", "113 (all)"),
        ("(c)", "4"),
        ("(d)", "1"),
    }
    assert len(by[("(c)", "4")].accuracies) == 3
    a, d = by[("(a)", "any")].accuracies[0], by[("(d)", "1")].accuracies[0]
    assert a > 0.9
    assert d < a - 0.2
    assert compare.main(["--seeds", "0", "--cuts", "2", "--batch-sizes", "8,all"]) == 0
    assert "| (d) the example's own statistics | 1 |" in capsys.readouterr().out
