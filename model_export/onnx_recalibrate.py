"""New batch-norm statistics for an unfolded ONNX graph, from inputs of a new population.

The lecture's population estimator, on a graph: take the BatchNormalization nodes in graph
order (ONNX stores nodes topologically sorted), and for each one run the graph on the new inputs
with that node's input X [N, C, *spatial] exposed as an extra output, the batch norms before it
already holding their new statistics; set its mean to the per-channel mean of X over the examples
and every spatial position, and its var to the biased variance over the same values (what batch
norm normalises with in training). Later layers therefore see exactly what inference will feed
them, as ``model_export.mlp.population_stats`` does for bnserve's own network.

Runs use ONNX Runtime with graph optimisations off (so nothing is fused into what is measured),
in chunks of ``CHUNK`` examples whose statistics are pooled exactly (Chan et al.'s pairwise
update of count, mean and sum of squared deviations).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from model_export import batchnorm, onnx_import, onnx_verify
from model_export.batchnorm import Array
from model_export.onnx_fold import TRAINING_FIX, RefusedError, label
from model_export.onnx_graph import Graph, attr

CHUNK = 256  # examples per ONNX Runtime call: bounds memory for image-sized activations


@dataclass(frozen=True)
class LayerStats:
    node: str  # label of the BatchNormalization node
    mean: Array  # per channel, float64 before the cast to the model's dtype
    var: Array
    old_mean: Array
    old_var: Array
    values_per_channel: int  # N x spatial size

    def summary(self) -> str:
        shift = np.abs(self.mean - self.old_mean) / np.sqrt(self.old_var + 1e-12)
        ratio = self.var / np.maximum(self.old_var, 1e-12)
        return (f"{self.node}: {len(self.mean)} channels, {self.values_per_channel} values each; "
                f"max |mu_new - mu_old| / sigma_old {shift.max():.3g}, "
                f"sigma^2_new / sigma^2_old in [{ratio.min():.3g}, {ratio.max():.3g}]")


def pooled_stats(chunks: Iterable[NDArray[np.floating]]) -> tuple[Array, Array, int]:
    """Per-channel mean and biased variance over axis 0 and every axis after 1, of all the
    chunks [n, C, *spatial] together; and the number of values per channel."""
    count, mean, m2 = 0, np.zeros(0), np.zeros(0)
    for chunk in chunks:
        z = np.moveaxis(np.asarray(chunk, dtype=np.float64), 1, -1)
        z = z.reshape(-1, z.shape[-1])  # rows: every (example, position); columns: channels
        mu, var = batchnorm.batch_stats(z)
        n = z.shape[0]
        if count == 0:
            count, mean, m2 = n, mu, var * n
            continue
        delta = mu - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var * n + delta**2 * (count * n / total)
        count = total
    if count == 0:
        raise ValueError("no values to take statistics of")
    return mean, m2 / count, count


def batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _check_inference_mode(node: onnx.NodeProto) -> None:
    if attr(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise RefusedError(f"{label(node)} is in training mode: it normalises with each batch's "
                           f"own statistics, so it has none to recalibrate. {TRAINING_FIX}")


def _activations(
    model: onnx.ModelProto, iface: onnx_import.Interface, name: str, x: NDArray[np.float32]
) -> Iterable[NDArray[np.float32]] | None:
    """``name`` computed by ``model`` on ``x``, chunk by chunk (lazily: one chunk in memory at a
    time); None if the served output does not depend on it."""
    if name == iface.input_name:
        return (x[i : i + CHUNK] for i in range(0, len(x), CHUNK))
    runnable, _ = onnx_import.prepare(model, iface)  # one output, dynamic batch, input `features`
    if Graph(runnable).producer(name) is None:
        return None
    runnable.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = onnx_verify.session(runnable, optimize=False)
    feed = runnable.graph.input[0].name
    return (np.asarray(sess.run([name], {feed: x[i : i + CHUNK]})[0])
            for i in range(0, len(x), CHUNK))


def _set_constant(model: onnx.ModelProto, node: onnx.NodeProto, k: int, value: Array) -> Array:
    """Give input ``k`` of ``node`` the value ``value`` (in the old value's dtype); returns the
    old value. An initializer only this node reads is overwritten under its own name; anything
    else (shared, a Constant node, an Identity of a weight) gets a fresh initializer."""
    graph = Graph(model)
    name = node.input[k]
    old = graph.constant(name)
    if old is None:
        raise RefusedError(f"{label(node)}: its {('mean', 'var')[k - 3]} {name!r} is not a "
                           "constant, so there is no statistic to replace")
    new = value.astype(old.dtype).reshape(old.shape)
    if name in graph.initializers and graph.consumers(name) == [node] and not any(
        v.name == name for v in model.graph.input
    ):
        graph.initializers[name].CopyFrom(numpy_helper.from_array(new, name))
    else:
        node.input[k] = graph.set_constant(name, new)
    return np.asarray(old, dtype=np.float64).reshape(-1)


def recalibrate(
    model: onnx.ModelProto, iface: onnx_import.Interface, x: NDArray[np.float32],
    log: Callable[[str], None] = print,
) -> tuple[onnx.ModelProto, list[LayerStats]]:
    """A copy of ``model`` whose batch norms hold the statistics of ``x`` [N, *input shape],
    taken layer by layer; and what changed, per batch norm."""
    out = copy.deepcopy(model)
    nodes = batchnorms(out)
    if not nodes:
        raise RefusedError("the model has no BatchNormalization node: nothing to recalibrate")
    found: list[LayerStats] = []
    for node in nodes:
        _check_inference_mode(node)
        chunks = _activations(out, iface, node.input[0], x)
        if chunks is None:
            log(f"{label(node)}: skipped, the served output does not depend on it")
            continue
        mean, var, count = pooled_stats(chunks)
        old_mean = _set_constant(out, node, 3, mean)
        old_var = _set_constant(out, node, 4, var)
        stats = LayerStats(label(node), mean, var, old_mean, old_var, count)
        log(stats.summary())
        found.append(stats)
    Graph(out).prune()  # initializers replaced by fresh ones are read by nothing now
    return out, found
