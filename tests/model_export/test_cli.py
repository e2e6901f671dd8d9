"""bnserve-train and bnserve-export name their output after their input and never replace another
model's file without --force (model_export/outputs.py); retraining or re-exporting the same model
replaces its files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_export import export, outputs, train

FAST = ["--epochs", "1", "--hidden", "4"]


def _csv(path: Path, columns: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = [",".join([*columns, "label"])]
    for i in range(80):
        values = rng.normal(i % 2, 0.5, len(columns))
        lines.append(",".join([*(f"{v:.4f}" for v in values), "yes" if i % 2 else "no"]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the default outputs are relative: models/...
    return tmp_path


def test_own_data_trains_models_named_after_the_file_and_exports_beside_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _csv(workdir / "my.csv")
    assert train.main(["--data", "my.csv", "--target", "label", *FAST]) == 0
    assert "checkpoint written: models/my.ckpt" in capsys.readouterr().out
    assert not (workdir / "models" / "default.ckpt").exists()
    assert export.main(["--checkpoint", "models/my.ckpt"]) == 0
    assert "model written: models/my.onnx" in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / "models").iterdir()) == ["my.ckpt", "my.onnx"]


def test_retraining_and_reexporting_the_same_model_replace_its_files(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _csv(workdir / "my.csv")
    args = ["--data", "my.csv", "--target", "label", *FAST]
    assert train.main(args) == 0
    assert export.main(["--checkpoint", "models/my.ckpt"]) == 0
    first = (workdir / "models" / "my.onnx").read_bytes()
    _csv(workdir / "my.csv", seed=1)  # the file changed: still the same model, retrained
    assert train.main([*args, "--seed", "3"]) == 0
    assert train.main(["--data", "./my.csv", "--target", "label", *FAST]) == 0  # the same file
    assert export.main(["--checkpoint", "models/my.ckpt", "--keep-batchnorm"]) == 0
    assert (workdir / "models" / "my.onnx").read_bytes() != first
    assert "error" not in capsys.readouterr().err


def test_another_models_checkpoint_is_not_replaced_without_force(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _csv(workdir / "my.csv")
    assert train.main(["--data", "my.csv", "--target", "label", *FAST]) == 0
    ckpt = workdir / "models" / "my.ckpt"
    before = ckpt.read_bytes()
    capsys.readouterr()

    (workdir / "other").mkdir()
    _csv(workdir / "other" / "my.csv", ("a", "b", "d"))
    refused = [
        ["--data", "other/my.csv", "--target", "label"],  # another file of the same name
        ["--data", "my.csv", "--target", "label", "--features", "a,b"],  # other features
        ["--out", "models/my.ckpt"],  # the shipped data
    ]
    for args in refused:
        assert train.main([*args, *FAST]) == 2, args
        err = capsys.readouterr().err
        assert "bnserve-train: error: models/my.ckpt already exists and holds another model " \
            "(made from my.csv, 3 features, classes no/yes); the new checkpoint would be made " \
            "from " in err, err
        assert err.rstrip().endswith("Write it elsewhere with --out, or replace models/my.ckpt "
                                     "with --force")
        assert ckpt.read_bytes() == before

    assert train.main(["--out", "models/my.ckpt", "--force", *FAST]) == 0
    assert ckpt.read_bytes() != before


def test_a_file_that_is_not_a_checkpoint_is_not_replaced(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "models").mkdir()
    (workdir / "models" / "default.ckpt").write_text("my notes\n")
    assert train.main(FAST) == 2
    assert "models/default.ckpt already exists and is not a bnserve checkpoint" in \
        capsys.readouterr().err
    assert (workdir / "models" / "default.ckpt").read_text() == "my notes\n"


def test_make_models_calls_work_when_the_checkpoint_exists_but_the_model_does_not(
    workdir: Path,
) -> None:
    """The Makefile trains the shipped data into models/default.ckpt and exports it whenever
    models/default.onnx is missing, with no --force: a checkpoint left from before is the same
    model, so both commands succeed."""
    for _ in range(2):
        assert train.main(["--out", "models/default.ckpt", *FAST]) == 0
        assert export.main(["--checkpoint", "models/default.ckpt",
                            "--out", "models/default.onnx"]) == 0
        (workdir / "models" / "default.onnx").unlink()


def test_export_does_not_replace_another_models_file(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _csv(workdir / "my.csv")
    assert train.main(["--data", "my.csv", "--target", "label", *FAST]) == 0
    assert train.main(FAST) == 0
    assert export.main(["--checkpoint", "models/my.ckpt", "--out", "models/default.onnx"]) == 0
    capsys.readouterr()
    mine = (workdir / "models" / "default.onnx").read_bytes()
    assert export.main([]) == 2  # models/default.ckpt -> models/default.onnx, which holds mine
    err = capsys.readouterr().err
    assert ("bnserve-export: error: models/default.onnx already exists and holds another model "
            "(made from my.csv, 3 features, classes no/yes); the new model would be made from "
            "bnserve:breast_cancer.csv, 30 features, classes benign/malignant") in err
    assert (workdir / "models" / "default.onnx").read_bytes() == mine
    assert export.main(["--force"]) == 0
    assert (workdir / "models" / "default.onnx").read_bytes() != mine


def test_origins_of_imported_models_ignore_the_files_hash() -> None:
    a = outputs.origin_of({"source": "onnx:sensor.onnx sha256 aa", "class_names": '["x", "y"]'})
    b = outputs.origin_of({"source": "onnx:sensor.onnx sha256 bb", "class_names": '["x", "y"]'})
    c = outputs.origin_of({"source": "onnx:other.onnx sha256 aa", "class_names": '["x", "y"]'})
    assert a.same_model(b)
    assert not a.same_model(c)
    assert a.describe() == "made from onnx:sensor.onnx, classes x/y"
    assert outputs.derived(Path("data/v2/my.csv"), ".ckpt") == Path("models/my.ckpt")
