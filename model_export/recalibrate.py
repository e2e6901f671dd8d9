"""``bnserve-recalibrate``: the lecture's population statistics, taken on a new population.

Batch norm's mu and sigma^2 describe the inputs the network was trained on. When the inputs
move (a sensor is recalibrated, a unit changes), unlabeled rows of the new population are
enough to re-estimate them: each layer's mu and (biased) sigma^2 over all the new rows, layer by
layer, with the layers before already using their new statistics (``mlp.population_stats``,
the estimator training offers as ``--estimator population``). The weights are not touched.

Two sources:

- a bnserve checkpoint (``--checkpoint``): optionally the input standardisation is re-estimated
  too (``--standardisation``); exported through ``export.export`` (every check it makes), the
  recalibrated checkpoint optionally written with ``--out-checkpoint``;
- an unfolded ONNX graph with BatchNormalization nodes (``--onnx``): the statistics are
  re-estimated in the graph (``model_export/onnx_recalibrate.py``), then folded and verified by
  ``bnserve-export --from-onnx``'s import path, taking the same options.

The model gets a new version, and the metadata key ``recalibrated_from`` (JSON) says what from:
the old model, the new data's sha256, source and number of rows, and what was re-estimated.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_export import (
    checkpoint,
    data,
    export,
    mlp,
    new_inputs,
    onnx_import,
    onnx_recalibrate,
    onnx_verify,
    outputs,
)
from model_export.batchnorm import Array
from model_export.mlp import Network
from model_export.train import DEFAULT_CHECKPOINT, accuracy

KEY = "recalibrated_from"
N_VERIFY_NEW = 64  # new rows added to the rows export verifies on (and the import's samples)


def recalibrate_network(net: Network, x: Array, standardisation: bool = False) -> Network:
    """A copy of ``net`` whose population statistics are those of ``x`` (raw inputs [N, F]) and
    which infers with them; with ``standardisation``, the input mean and std first."""
    new = replace(net, params=dict(net.params), stats=dict(net.stats), estimator="population")
    if standardisation:
        new.stats["input.mean"], new.stats["input.std"] = data.standardisation(x)
    mlp.set_population_stats(new, mlp.population_stats(new, x))
    return new


def provenance(inputs: new_inputs.NewInputs, **what: Any) -> dict[str, Any]:
    return {**what, "data_sha256": inputs.sha256, "data_source": inputs.source,
            "rows": inputs.rows}


def _write(out: Path, model_bytes: bytes, force: bool) -> None:
    props = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}
    refused = outputs.refusal(out, outputs.origin_of(props), "model", force)
    if refused:
        raise checkpoint.CheckpointError(refused)
    export.write_atomic(out, model_bytes)
    print(f"model written: {out}  ({len(model_bytes)} bytes, "
          f"sha256 {hashlib.sha256(model_bytes).hexdigest()})")


def from_checkpoint(args: argparse.Namespace) -> None:
    net, meta, verify_x, verify_y = checkpoint.load(args.checkpoint)
    inputs = new_inputs.read(args.data, meta["feature_names"], (net.n_features,), args.min_rows)
    if inputs.ignored:
        print(f"ignored columns (not features of the model): {', '.join(inputs.ignored)}")
    new = recalibrate_network(net, inputs.x, args.standardisation)
    before, after = accuracy(net, verify_x, verify_y), accuracy(new, verify_x, verify_y)
    print(f"recalibrated {net.n_hidden} batch-norm layer(s)"
          f"{' and the input standardisation' if args.standardisation else ''} on "
          f"{inputs.rows} rows of {inputs.source}")
    print(f"accuracy on the checkpoint's own validation rows (the OLD population): "
          f"{before:.4f} before, {after:.4f} after")
    source = provenance(
        inputs, model_version=export.default_version(net), checkpoint=str(args.checkpoint),
        estimator=net.estimator,
        reestimated=["batchnorm", *(["standardisation"] if args.standardisation else [])],
        old_population_val_accuracy={"before": before, "after": after})
    # Training figures describe the old statistics: they do not carry over.
    new_meta = {**meta, "figures": {}, KEY: source}
    verify_rows = np.concatenate([verify_x, inputs.x[:N_VERIFY_NEW]])
    result = export.export(new, new_meta, verify_rows, model_version=args.model_version,
                           extra_metadata={KEY: source})
    _write(args.out or outputs.derived(args.checkpoint, "-recalibrated.onnx"),
           result.model_bytes, args.force)
    if args.out_checkpoint is not None:
        checkpoint.save(args.out_checkpoint, new, new_meta, verify_x, verify_y)
        print(f"checkpoint written: {args.out_checkpoint}")


def _names(text: str | None, file: Path | None) -> list[str] | None:
    if file is not None:
        return [line.strip() for line in file.read_text().splitlines() if line.strip()]
    return None if text is None else [n.strip() for n in text.split(",")]


def from_onnx(args: argparse.Namespace) -> None:
    original = onnx_import.load(args.onnx)
    iface = onnx_import.interface(original, args.output)
    features = _names(args.features, None)
    inputs = new_inputs.read(args.data, features, iface.input_shape, args.min_rows)
    if inputs.ignored:
        print(f"ignored columns (not features of the model): {', '.join(inputs.ignored)}")
    x = inputs.x.astype(np.float32)
    updated, layers = onnx_recalibrate.recalibrate(original, iface, x)
    given = None if args.samples is None else np.load(args.samples, allow_pickle=False)
    samples = onnx_verify.samples(given if given is not None else x[:N_VERIFY_NEW],
                                  iface.input_shape)
    opts = onnx_import.Options(
        output_kind=args.output_kind, class_names=_names(args.classes, args.classes_file),
        feature_names=features, output=args.output, samples=samples,
        model_version=args.model_version,
        extra_metadata={KEY: provenance(
            inputs, model=f"onnx:{args.onnx.name} sha256 "
            f"{hashlib.sha256(args.onnx.read_bytes()).hexdigest()}",
            reestimated=[s.node for s in layers])})
    print("folding and verifying the recalibrated graph (\"the original\" below: the graph "
          "with the new statistics)")
    with tempfile.TemporaryDirectory() as tmp:
        # Same file name: the model's source reads onnx:<name> sha256 <the recalibrated graph>.
        path = Path(tmp) / args.onnx.name
        onnx.save(updated, str(path))
        result = onnx_import.import_model(path, opts)
    _write(args.out or outputs.derived(args.onnx, "-recalibrated.onnx"),
           result.model_bytes, args.force)
    if args.out_unfolded is not None:
        export.write_atomic(args.out_unfolded, updated.SerializeToString())
        print(f"unfolded recalibrated graph written: {args.out_unfolded}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bnserve-recalibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="a bnserve-train checkpoint (default: %(default)s)")
    source.add_argument("--onnx", type=Path, metavar="MODEL.onnx",
                        help="an unfolded ONNX model with BatchNormalization nodes")
    p.add_argument("--data", type=Path, required=True,
                   help="unlabeled inputs of the new population: CSV with the model's feature "
                   "names in the header (other columns ignored), or .npy [N, *input shape]")
    p.add_argument("--out", type=Path, default=None,
                   help="default: models/<checkpoint or model name>-recalibrated.onnx")
    p.add_argument("--out-checkpoint", type=Path, default=None,
                   help="also write the recalibrated checkpoint (--checkpoint only)")
    p.add_argument("--out-unfolded", type=Path, default=None,
                   help="also write the recalibrated graph before folding (--onnx only)")
    p.add_argument("--standardisation", action="store_true",
                   help="re-estimate the input mean and std too (--checkpoint only)")
    p.add_argument("--model-version", default=None, help="default: a hash of the new model")
    p.add_argument("--min-rows", type=int, default=new_inputs.MIN_ROWS,
                   help="refuse fewer new rows than this (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds another model")
    imp = p.add_argument_group("--onnx options (as bnserve-export --from-onnx)")
    imp.add_argument("--output-kind", choices=onnx_import.OUTPUT_KINDS, default="logits")
    imp.add_argument("--classes", help="class names, comma-separated")
    imp.add_argument("--classes-file", type=Path, help="class names, one per line")
    imp.add_argument("--features", help="feature names of a 1-D input, comma-separated (also "
                     "how --data's CSV columns are found)")
    imp.add_argument("--output", help="the graph output to serve, if the model has several")
    imp.add_argument("--samples", type=Path, metavar="FILE.npy",
                     help="inputs to verify on (default: the first new rows)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.min_rows < 2:
        p.error("--min-rows must be at least 2: one row has no variance")
    if args.onnx is not None and (args.standardisation or args.out_checkpoint):
        p.error("--standardisation and --out-checkpoint need --checkpoint (an imported model "
                "keeps no input statistics)")
    if args.onnx is None and args.out_unfolded is not None:
        p.error("--out-unfolded needs --onnx")
    try:
        if args.onnx is not None:
            from_onnx(args)
        else:
            from_checkpoint(args)
    except (checkpoint.CheckpointError, new_inputs.InputError, onnx_import.RefusedError,
            export.VerificationError, onnx_verify.VerificationError,
            onnx.checker.ValidationError, OSError, ValueError) as e:
        print(f"bnserve-recalibrate: error: {e}", file=sys.stderr)
        print("bnserve-recalibrate: nothing written", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
