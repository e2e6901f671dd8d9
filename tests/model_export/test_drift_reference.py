"""Every exported model carries its own drift reference (metadata ``drift_reference``) and exposes
each batch norm's output as a ``drift.*`` graph output: bnserve's own network (folded and
keep-batchnorm) and imported ONNX models; ``--no-drift-outputs`` writes the bare interface.

References are independent of the code under test: the training set's own statistics (with the
population estimator a batch norm's output has exactly mean beta and std |gamma| sqrt(var /
(var + eps)) on the data its statistics came from), ONNX's BatchNormalization run by
onnx.reference, and numpy computed straight from an ONNX file's initializers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from model_export import checkpoint, export, graph, onnx_verify
from model_export.mlp import Estimator
from model_export.train import TrainResult

TORCH = Path(__file__).parents[1] / "fixtures" / "torch"
TOL = 1e-5  # float32 graph vs float64 numpy, relative to max(1, max |value|) (export's own)
STAT_TOL = 1e-4  # a statistic of float32 activations vs the same statistic in float64


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _reference(model: onnx.ModelProto) -> dict[str, Any]:
    ref: dict[str, Any] = json.loads(_props(model)["drift_reference"])
    return ref


def _ort(model: onnx.ModelProto | bytes, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"features": x}), strict=True))


def _export(result: TrainResult, folded: bool = True, drift: bool = True,
            estimator: Estimator | None = None) -> onnx.ModelProto:
    net = result.net if estimator is None else dataclasses.replace(result.net,
                                                                  estimator=estimator)
    meta = {**result.meta, "hidden": [32, 16]}
    out = export.export(net, meta, result.x_val, folded=folded, log=lambda _: None, drift=drift)
    return onnx.load_from_string(out.model_bytes)


def _close(got: Any, expected: Any, tol: float) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=0,
                               atol=tol * max(1.0, float(np.abs(expected).max())))


# ---------------------------------------------------------------- bnserve's own network


@pytest.mark.parametrize("folded", [True, False])
def test_reference_holds_input_standardisation_and_each_layers_statistics(
    default_result: TrainResult, folded: bool
) -> None:
    model = _export(default_result, folded=folded)
    net = default_result.net
    ref = _reference(model)
    assert ref["format"] == "bnserve-drift/1"
    assert [g["name"] for g in ref["groups"]] == ["input", "bn0", "bn1"]
    inp = ref["groups"][0]
    assert (inp["kind"], inp["tensor"]) == ("input", "features")
    assert inp["channel_names"] == default_result.meta["feature_names"]
    assert inp["mean"] == net.stats["input.mean"].tolist()  # float64 through JSON, exactly
    assert inp["std"] == net.stats["input.std"].tolist()
    for l, (mu, var) in enumerate(net.layer_stats()):
        g = ref["groups"][1 + l]
        assert (g["kind"], g["tensor"], g["channel_names"]) == ("batchnorm", f"drift.bn{l}",
                                                                None)
        gamma, beta = net.params[f"hidden.{l}.gamma"], net.params[f"hidden.{l}.beta"]
        assert g["bn"] == {"mu": mu.tolist(), "var": var.tolist(), "gamma": gamma.tolist(),
                           "beta": beta.tolist(), "eps": net.eps}
        assert g["mean"] == beta.tolist()
        np.testing.assert_allclose(g["std"], np.abs(gamma) / np.sqrt(1 + net.eps / var),
                                   rtol=1e-15)
    outputs = {o.name: o for o in model.graph.output}
    assert list(outputs) == ["probabilities", "label", "drift.bn0", "drift.bn1"]
    for l in range(2):
        dims = outputs[f"drift.bn{l}"].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["N", len(net.layer_stats()[l][0])]


def test_drift_outputs_show_the_expected_mean_and_std_on_the_training_data(
    default_result: TrainResult,
) -> None:
    """With the population estimator, mu and var are the exact statistics of each layer on the
    training inputs, so there the batch-norm output has exactly the reference's mean and std."""
    model = _export(default_result, estimator="population")
    outs = _ort(model, default_result.x_train.astype(np.float32))
    groups = _reference(model)["groups"]
    for g in groups[1:]:
        z = outs[g["tensor"]].astype(np.float64)
        _close(z.mean(axis=0), g["mean"], STAT_TOL)
        _close(z.std(axis=0), g["std"], STAT_TOL)
    x = default_result.x_train
    _close(x.mean(axis=0), groups[0]["mean"], 1e-12)  # the training standardisation
    _close(x.std(axis=0), groups[0]["std"], 1e-12)


def test_folded_drift_outputs_equal_onnx_batchnormalization_before_relu(
    default_result: TrainResult,
) -> None:
    """The folded Gemm's output (ONNX Runtime) against the keep-batchnorm graph's
    BatchNormalization output run by onnx.reference, and against what the Relu makes of it."""
    x = default_result.x_val.astype(np.float32)
    folded = _ort(_export(default_result, folded=True), x)
    kept = _export(default_result, folded=False)
    names = ["drift.bn0", "drift.bn1", "relu0.out", "relu1.out"]
    ref = dict(zip(names, ReferenceEvaluator(kept).run(names, {"features": x}), strict=True))
    for l in range(2):
        z = ref[f"drift.bn{l}"]
        assert (z < 0).any()  # before the ReLU: negative values are still there
        _close(folded[f"drift.bn{l}"], z, TOL)
        np.testing.assert_array_equal(np.maximum(z, 0), ref[f"relu{l}.out"])


def test_no_drift_outputs_gives_the_bare_interface_with_the_same_answers(
    default_result: TrainResult,
) -> None:
    x = default_result.x_val.astype(np.float32)
    for folded in (True, False):
        bare = _export(default_result, folded=folded, drift=False)
        full = _export(default_result, folded=folded)
        assert [o.name for o in bare.graph.output] == ["probabilities", "label"]
        assert "drift_reference" not in _props(bare)
        assert [n.op_type for n in bare.graph.node] == [n.op_type for n in full.graph.node]
        b, f = _ort(bare, x), _ort(full, x)
        np.testing.assert_array_equal(b["probabilities"], f["probabilities"])
        np.testing.assert_array_equal(b["label"], f["label"])


def test_same_network_same_bytes(default_result: TrainResult) -> None:
    for folded in (True, False):
        first = _export(default_result, folded=folded).SerializeToString()
        assert _export(default_result, folded=folded).SerializeToString() == first
        assert _export(default_result, folded=folded, drift=False).SerializeToString() != first


def test_export_refuses_a_drift_output_that_is_not_the_batch_norm_output(
    default_result: TrainResult, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A plausible bug: drift.bn0 wired after the ReLU. Probabilities are unchanged; only the
    drift check can see it."""
    real = graph.build

    def after_relu(*args: Any, **kwargs: Any) -> onnx.ModelProto:
        model = real(*args, **kwargs)
        for node in model.graph.node:
            if node.name == "gemm0":
                node.output[0] = "gemm0.out"
            elif node.name == "relu0":
                node.input[0], node.output[0] = "gemm0.out", "drift.bn0"
            elif node.name == "gemm1":
                node.input[0] = "drift.bn0"
        return model

    monkeypatch.setattr(graph, "build", after_relu)
    ckpt, out = tmp_path / "m.ckpt", tmp_path / "m.onnx"
    checkpoint.save(ckpt, default_result.net, default_result.meta, default_result.x_val,
                    default_result.y_val)
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "onnxruntime vs numpy inference forward" in captured.out  # passed: only drift fails
    assert "batch-norm outputs z~ vs numpy inference forward" in captured.err
    assert "FAILED" in captured.err
    assert not out.exists()


def test_help_mentions_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        export.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-drift-outputs" in text
    assert "drift_reference" in text


# ---------------------------------------------------------------- imported ONNX models


def _import(tmp_path: Path, model: onnx.ModelProto | Path, *args: str) -> tuple[int, Path]:
    src = model if isinstance(model, Path) else tmp_path / "model.onnx"
    if not isinstance(model, Path):
        onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    return export.main(["--from-onnx", str(src), "--out", str(out), *args]), out


def _t(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _bn(prefix: str, x: str, y: str, c: int, rng: np.random.Generator,
        **attrs: Any) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A BatchNormalization node and its initializers (gamma of both signs)."""
    inits = [_t(f"{prefix}.scale", rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c)),
             _t(f"{prefix}.bias", rng.normal(size=c)), _t(f"{prefix}.mean", rng.normal(size=c)),
             _t(f"{prefix}.var", rng.uniform(0.1, 3, c))]
    names = [t.name for t in inits]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs), inits


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], n_in: int,
           out: str, n_out: int) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", n_out])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def imported_mlp() -> onnx.ModelProto:
    """x -> bn0 -> Gemm -> bn1 -> Relu -> MatMul -> logits [N, 3]."""
    rng = np.random.default_rng(3)
    bn0, i0 = _bn("bn0", "x", "h0", 6, rng)
    bn1, i1 = _bn("bn1", "h1", "h2", 8, rng)
    inits = [*i0, *i1, _t("W0", rng.normal(size=(8, 6))), _t("b0", rng.normal(size=8)),
             _t("W1", rng.normal(size=(8, 3)))]
    nodes = [bn0, helper.make_node("Gemm", ["h0", "W0", "b0"], ["h1"], name="fc0", transB=1),
             bn1, helper.make_node("Relu", ["h2"], ["h3"]),
             helper.make_node("MatMul", ["h3", "W1"], ["logits"])]
    return _model(nodes, inits, 6, "logits", 3)


def _bn_numpy(z: Any, stats: dict[str, Any], eps: float) -> Any:
    return (stats["scale"] * (z - stats["mean"]) / np.sqrt(stats["var"] + eps)
            + stats["bias"])


def test_imported_mlp_exposes_the_batch_norm_whose_output_survives_folding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """input -> bn0 -> Gemm -> bn1 -> Relu -> MatMul: bn1 folds into the Gemm before it (which
    now writes its output), bn0 into the Gemm after it (no output left: not monitored)."""
    model = imported_mlp()
    status, out = _import(tmp_path, model)
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "not monitored: BatchNormalization 'bn0': folded into the Gemm" in printed
    assert "verify: 1 drift output vs the original's batch-norm outputs on 8 samples" in printed
    folded = onnx.load(str(out))
    assert [o.name for o in folded.graph.output] == ["probabilities", "label", "drift.bn1"]
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Relu", "MatMul", "Softmax",
                                                      "ArgMax"]  # no node added for it
    props = _props(folded)
    report = json.loads(props["fold_report"])["drift"]
    assert report["monitored"] == {"drift.bn1": "BatchNormalization 'bn1'"}
    assert len(report["not_monitored"]) == 1
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bn0, bn1 = ({k: init[f"{p}.{k}"] for k in ("scale", "bias", "mean", "var")}
                for p in ("bn0", "bn1"))
    (group,) = json.loads(props["drift_reference"])["groups"]  # no input group: unknown
    assert (group["name"], group["kind"], group["tensor"]) == ("bn1", "batchnorm", "drift.bn1")
    assert group["bn"] == {"mu": bn1["mean"].tolist(), "var": bn1["var"].tolist(),
                           "gamma": bn1["scale"].tolist(), "beta": bn1["bias"].tolist(),
                           "eps": 1e-5}
    assert group["mean"] == bn1["bias"].tolist()
    np.testing.assert_allclose(group["std"], np.abs(bn1["scale"]) / np.sqrt(1 + 1e-5 / bn1["var"]),
                               rtol=1e-15)

    x = np.random.default_rng(11).normal(size=(16, 6))
    h1 = _bn_numpy(x, bn0, 1e-5) @ init["W0"].T + init["b0"]
    expected = _bn_numpy(h1, bn1, 1e-5)  # the original's bn1 output, straight from its numbers
    got = _ort(out.read_bytes(), x.astype(np.float32))["drift.bn1"]
    _close(got, expected, onnx_verify.RTOL)


def _left_and_output_bn() -> onnx.ModelProto:
    """x -> Relu -> bnA -> Relu -> Gemm -> bnB = the output. bnA has no linear neighbour (left
    as Mul+Add); bnB folds into the Gemm and its output is the served output itself."""
    rng = np.random.default_rng(4)
    bn_a, ia = _bn("bnA", "r0", "a", 5, rng)
    bn_b, ib = _bn("bnB", "g", "y", 3, rng, epsilon=1e-3)
    nodes = [helper.make_node("Relu", ["x"], ["r0"]), bn_a, helper.make_node("Relu", ["a"], ["r1"]),
             helper.make_node("Gemm", ["r1", "W", "b"], ["g"]), bn_b]
    inits = [*ia, *ib, _t("W", rng.normal(size=(5, 3))), _t("b", rng.normal(size=3))]
    return _model(nodes, inits, 5, "y", 3)


def test_left_batch_norm_and_one_that_is_the_served_output_are_both_exposed(
    tmp_path: Path,
) -> None:
    model = _left_and_output_bn()
    status, out = _import(tmp_path, model, "--output-kind", "values")
    assert status == 0
    folded = onnx.load(str(out))
    assert [o.name for o in folded.graph.output] == ["values", "drift.bn0", "drift.bn1"]
    groups = json.loads(_props(folded)["drift_reference"])["groups"]
    assert [(g["name"], g["bn"]["eps"]) for g in groups] == [("bn0", 1e-5),
                                                             ("bn1", pytest.approx(1e-3))]
    x = np.random.default_rng(2).normal(size=(10, 5)).astype(np.float32)
    a, y = ReferenceEvaluator(model).run(["a", "y"], {"x": x})
    got = _ort(out.read_bytes(), x)
    _close(got["drift.bn0"], a, onnx_verify.RTOL)
    _close(got["drift.bn1"], y, onnx_verify.RTOL)
    np.testing.assert_array_equal(got["drift.bn1"], got["values"])  # the same tensor


def test_conv_batch_norms_are_exposed_channel_first_and_bn_before_a_conv_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = _import(tmp_path, TORCH / "conv2d.onnx", "--output-kind", "values",
                          "--samples", str(TORCH / "conv2d.inputs.npy"))
    assert status == 0
    x = np.load(TORCH / "conv2d.inputs.npy")
    model = onnx.load(str(out))
    got = _ort(model, x)
    groups = json.loads(_props(model)["drift_reference"])["groups"]
    assert [g["tensor"] for g in groups] == ["drift.bn0", "drift.bn1", "drift.bn2"]
    assert [got[g["tensor"]].ndim for g in groups] == [4, 4, 2]  # two Conv BNs, then a Gemm's
    for g in groups:
        assert got[g["tensor"]].shape[:2] == (len(x), len(g["mean"]))

    capsys.readouterr()
    (tmp_path / "b").mkdir()
    status, out = _import(tmp_path / "b", TORCH / "bn_before_conv.onnx", "--output-kind",
                          "values")
    assert status == 0
    assert capsys.readouterr().out.count("not monitored: ") == 1
    report = json.loads(_props(onnx.load(str(out)))["fold_report"])
    assert len(report["drift"]["monitored"]) == 1  # the one left as Mul+Add still has an output


def test_import_refuses_a_drift_output_that_differs_from_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = onnx_verify.run_original_tensors

    def shifted(model: Any, iface: Any, x: Any, names: list[str]) -> dict[str, Any]:
        """The served output (asked for first) as it is; the batch norms' shifted by 1 %."""
        got = real(model, iface, x, names)
        return {k: v if k == names[0] else v + 0.01 * max(1.0, float(np.abs(v).max()))
                for k, v in got.items()}

    monkeypatch.setattr(onnx_verify, "run_original_tensors", shifted)
    status, out = _import(tmp_path, imported_mlp())
    assert status == 2
    err = capsys.readouterr().err
    assert "drift output vs the original's batch-norm outputs" in err
    assert "FAILED" in err
    assert not out.exists()


def test_import_without_drift_outputs(tmp_path: Path) -> None:
    model = _left_and_output_bn()
    status, out = _import(tmp_path, model, "--output-kind", "values", "--no-drift-outputs")
    assert status == 0
    folded = onnx.load(str(out))
    assert [o.name for o in folded.graph.output] == ["values"]
    props = _props(folded)
    assert "drift_reference" not in props
    assert "drift" not in json.loads(props["fold_report"])


def test_imported_same_file_same_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _import(tmp_path / "a", _left_and_output_bn(), "--output-kind", "values")
    second = _import(tmp_path / "b", _left_and_output_bn(), "--output-kind", "values")
    assert first[0] == second[0] == 0
    assert first[1].read_bytes() == second[1].read_bytes()
