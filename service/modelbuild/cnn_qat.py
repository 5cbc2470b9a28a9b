"""Quantization-aware fine-tuning (QAT) of a float CNN's conv weights for the int8 per-channel grid: the step of
the CNN recipe (`cnn_ptq.CnnRecipe(qat=QatRecipe())`) that takes EfficientNet-Lite0 past what post-training
rounding reaches (docs/quantization.md).

Why: post-training, the int8 error of a float-trained MobileNet-family net is spread over ~50 layers of
40-48 dB each; rounding each layer well (GPTQ, bias correction) still leaves their sum. Training the whole
network through its quantizer lets later layers absorb earlier layers' errors.

How (Esser et al. 2020, LSQ; distillation without labels):
- each conv weight is a latent value v in units of its channel's int8 step s0 (so one learning rate fits
  channels whose ranges differ by 100x after batch-norm folding), initialised at the PTQ recipe's integers;
  the forward pass uses s * clip(round(v s0 / s), -127, 127) with a straight-through gradient for round, and
  s = s0 * exp(t) with a learned per-channel t (LSQ's learned step, in log space);
- biases are trained too (the HTP keeps them in int32, i.e. ~float);
- layers the recipe splits into two int8 convs (~15-bit weights) are trained in float;
- loss: each output's squared error relative to its energy, against the ORIGINAL float network run on the same
  (flipped / cropped) calibration inputs, plus optional intermediate tensors; no labels;
- activations stay float: at 16 bits they cost ~60 dB, far below the weights' error.
The jax interpreter of the graph is `onnx_jax.py`; without jax the recipe keeps its post-training result.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import structlog
from onnx import numpy_helper

from .qdq import sqnr_db

log = structlog.get_logger(__name__)
QMAX = 127


@dataclass
class QatRecipe:
    steps: int = 300
    batch: int = 8
    # learning rates measured on EfficientNet-Lite0 (docs/quantization.md): 2.5x larger rates on the biases and
    # 5x on the steps, or 2.5x on the weights, first lose 2-3 dB against the post-training start
    lr: float = 2e-3                  # Adam, in int8 steps of each channel
    bias_lr: float = 2e-3             # in units of a channel's step times sqrt(fan-in)
    scale_lr: float = 2e-4            # in log-scale of the per-channel steps
    # "ptq": latent weights start at the post-training integers (bin centres) and bias-corrected biases;
    # "float": at the float weights (round to nearest at step 0). Measured on EfficientNet-Lite0
    # (docs/quantization.md): from "float", 300 steps do not get back to where the post-training recipe starts
    init: str = "ptq"
    learn_scales: bool = True
    train_size: int | None = None     # random square crops of this size (fully convolutional graphs only)
    intermediate: Sequence[str] = ()  # tensors whose error is also in the loss (e.g. block outputs)
    intermediate_weight: float = 0.1
    eval_every: int = 0               # held-out SQNR every this many steps (0: only at the start and the end)
    monitor: Sequence[Mapping] = ()   # held-out feeds for that SQNR: evaluated, never trained on
    seed: int = 0


@dataclass
class QatReport:
    steps: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)     # {"step", "loss", ("heldout_weight_sqnr_db")}

    def to_dict(self) -> dict:
        return {"qat_steps": self.steps, "qat_seconds": round(self.seconds, 1), "qat_history": self.history}


def available() -> bool:
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def _adam(jnp, grads, state, step, lrs, b1=0.9, b2=0.999, eps=1e-8):
    import jax
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state[0], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state[1], grads)
    corr = jnp.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    upd = jax.tree_util.tree_map(lambda m, v, lr: -lr * corr * m / (jnp.sqrt(v) + eps), m, v, lrs)
    return upd, (m, v)


class _Net:
    """The graph's convs as fake-quantized (or float) layers over latent parameters, and its jax function."""

    def __init__(self, model: onnx.ModelProto, integers: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 keep_float: set[str], start: Mapping[str, np.ndarray]):
        from .onnx_jax import graph_function
        inits = {t.name for t in model.graph.initializer}
        self.convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]
        self.biases = {n.input[1]: n.input[2] for n in self.convs if len(n.input) > 2 and n.input[2]}
        names = [n.input[1] for n in self.convs] + list(self.biases.values())
        self.fn, floats = graph_function(model, names)
        self.floats = floats                       # the graph's own values (the float teacher's weights)
        self.keep_float = keep_float
        self.s0, self.q0, self.bunit = {}, {}, {}
        for n in self.convs:
            w = floats[n.input[1]]
            if n.input[1] in keep_float:       # start where the post-training step left it (e.g. cnn_sequential's
                w = start.get(n.input[1], w)   # input-error correction), not at the teacher's weights
            q, s = integers.get(n.input[1], (None, None))
            if s is None:                          # float-trained layers: unit = their int8 step all the same
                s = np.where(np.abs(w).reshape(len(w), -1).max(1) > 0,
                             np.abs(w).reshape(len(w), -1).max(1) / QMAX, 1.0).astype(np.float32)
            self.s0[n.input[1]] = s.astype(np.float32)
            self.q0[n.input[1]] = (w / s[:, None, None, None] if q is None or n.input[1] in keep_float
                                   else q).astype(np.float32)
            self.bunit[n.input[1]] = (s * np.sqrt(w[0].size)).astype(np.float32)
        self.u0 = {k: ((start[b] - floats[b]) / self.bunit[k]).astype(np.float32) if b in start
                   else np.zeros_like(self.s0[k]) for k, b in self.biases.items()}

    def init_params(self) -> dict:
        return {"v": dict(self.q0), "t": {k: np.zeros_like(s) for k, s in self.s0.items()}, "u": dict(self.u0)}

    def weights(self, params, quantized: bool = True):
        """Graph initializer name -> the value the student uses (fake-quantized where it is int8)."""
        import jax
        import jax.numpy as jnp
        out = {}
        for name, s0 in self.s0.items():
            v = params["v"][name]
            if name in self.keep_float or not quantized:
                out[name] = v * s0[:, None, None, None]
                continue
            ratio = jnp.exp(-params["t"][name])[:, None, None, None]
            x = v * ratio
            x = x + jax.lax.stop_gradient(jnp.round(x) - x)            # straight-through round
            q = jnp.clip(x, -QMAX, QMAX)
            out[name] = q * (s0 * jnp.exp(params["t"][name]))[:, None, None, None]
        for wname, bname in self.biases.items():
            out[bname] = self.floats[bname] + params["u"][wname] * self.bunit[wname]
        return out

    def export(self, params) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
        """(integers of the int8 layers: name -> (q, scale), every trained initializer's float value)."""
        values = {k: np.asarray(v, np.float32) for k, v in self.weights(params).items()}
        integers = {}
        for name, s0 in self.s0.items():
            if name in self.keep_float:
                continue
            t = np.asarray(params["t"][name], np.float32)
            scale = (s0 * np.exp(t)).astype(np.float32)
            q = np.clip(np.rint(np.asarray(params["v"][name]) * np.exp(-t)[:, None, None, None]), -QMAX, QMAX)
            integers[name] = (q.astype(np.int32), scale)
            values[name] = (q * scale[:, None, None, None]).astype(np.float32)
        return integers, values


def residual_sums(model: onnx.ModelProto) -> list[str]:
    """The outputs of the graph's Add nodes (a MobileNet's block outputs): intermediate targets for the loss,
    which give the first blocks a gradient of their own (EfficientNet-Lite0: 31.0 vs 30.9 dB at 120 steps)."""
    return [n.output[0] for n in model.graph.node if n.op_type == "Add"]


def _batches(data: np.ndarray, recipe: QatRecipe, rng):
    """Random calibration inputs, each flipped at random and (train_size) cropped at a random place."""
    while True:
        x = data[rng.integers(0, len(data), recipe.batch)]
        flip = rng.random(len(x)) < 0.5
        x = np.where(flip[:, None, None, None], x[..., ::-1], x)
        if recipe.train_size:
            size = recipe.train_size
            y0, x0 = rng.integers(0, x.shape[2] - size + 1), rng.integers(0, x.shape[3] - size + 1)
            x = x[:, :, y0:y0 + size, x0:x0 + size]
        yield np.ascontiguousarray(x, np.float32)


def finetune(model: onnx.ModelProto, calibration: Sequence[Mapping], outputs: Sequence[str],
             integers: Mapping[str, tuple[np.ndarray, np.ndarray]], keep_float: set[str] = frozenset(),
             recipe: QatRecipe = QatRecipe(), monitor: Sequence[Mapping] = (),
             start: Mapping[str, np.ndarray] | None = None
             ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray], QatReport]:
    """Train the conv weights of the float `model` (the teacher; the student starts at `integers`, weight name ->
    (q, scale), and at `start`'s values: biases, e.g. bias-corrected, and the float starts of the layers in
    `keep_float`, which train in float; the teacher's own weights otherwise). Returns the
    int8 layers' integers, every trained initializer's float value (weights on their grid, biases, float
    layers) and the report. `monitor`: held-out feeds, only evaluated (weights-only SQNR), never trained on."""
    import jax
    import jax.numpy as jnp

    started = time.monotonic()
    if recipe.init == "float":
        integers, start = {k: (None, s) for k, (_, s) in integers.items()}, {}
    net = _Net(model, integers, set(keep_float), start or {})
    input_name = model.graph.input[0].name
    names = list(outputs) + list(recipe.intermediate)
    weights_of = {n: 1.0 for n in outputs} | {n: recipe.intermediate_weight for n in recipe.intermediate}
    teacher_w = {k: jnp.asarray(v) for k, v in net.floats.items()}

    def loss_fn(params, x):
        ref = net.fn(teacher_w, {input_name: x}, names)
        got = net.fn(net.weights(params), {input_name: x}, names)
        return sum(weights_of[k] * jnp.mean((got[k] - jax.lax.stop_gradient(ref[k])) ** 2)
                   / (jnp.mean(jax.lax.stop_gradient(ref[k]) ** 2) + 1e-12) for k in names) / len(outputs)

    params = jax.tree_util.tree_map(jnp.asarray, net.init_params())
    lrs = {"v": {k: recipe.lr for k in params["v"]},
           "t": {k: recipe.scale_lr if recipe.learn_scales else 0.0 for k in params["t"]},
           "u": {k: recipe.bias_lr for k in params["u"]}}
    state = jax.tree_util.tree_map(jnp.zeros_like, (params, params))

    @jax.jit
    def step(params, state, x, i, decay):
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        lr = jax.tree_util.tree_map(lambda r: r * decay, lrs)
        upd, state = _adam(jnp, grads, state, i, lr)
        return jax.tree_util.tree_map(jnp.add, params, upd), state, loss

    held = [np.asarray(f[input_name], np.float32) for f in monitor]
    held_ref = [{k: np.asarray(v) for k, v in net.fn(teacher_w, {input_name: x}, outputs).items()} for x in held]
    student = jax.jit(lambda p, x: net.fn(net.weights(p), {input_name: x}, list(outputs)))

    def held_sqnr(params) -> float:
        """Over all held-out inputs together (as qdq.compare), averaged over the outputs in dB."""
        got = [student(params, x) for x in held]
        return round(float(np.mean([sqnr_db(np.concatenate([r[k].ravel() for r in held_ref]),
                                            np.concatenate([np.asarray(g[k]).ravel() for g in got]))
                                    for k in outputs])), 2)

    report = QatReport(steps=recipe.steps)
    if held:
        report.history.append({"step": 0, "heldout_weight_sqnr_db": held_sqnr(params)})
    data = np.concatenate([np.asarray(f[input_name], np.float32) for f in calibration])
    batches = _batches(data, recipe, np.random.default_rng(recipe.seed))
    losses = []
    for i in range(1, recipe.steps + 1):
        # linear warm-up over the first tenth (Adam's first steps move every weight by ~lr at once), then cosine
        decay = min(1.0, i / max(1, recipe.steps // 10)) * 0.5 * (1 + np.cos(np.pi * (i - 1) / recipe.steps))
        params, state, loss = step(params, state, next(batches), float(i), float(decay))
        losses.append(float(loss))
        if (recipe.eval_every and i % recipe.eval_every == 0) or i == recipe.steps:
            row = {"step": i, "loss": round(float(np.mean(losses[-max(1, recipe.eval_every or 10):])), 6)}
            if held:
                row["heldout_weight_sqnr_db"] = held_sqnr(params)
            report.history.append(row)
            log.info("cnn_qat.progress", **row, seconds=round(time.monotonic() - started, 1))
    integers_out, values = net.export(params)
    report.seconds = time.monotonic() - started
    return integers_out, values, report


def apply(model: onnx.ModelProto, teacher: onnx.ModelProto, calibration: Sequence[Mapping], outputs: Sequence[str],
          integers: dict, keep_float: set[str], recipe: QatRecipe) -> QatReport | None:
    """The recipe step, in place: fine-tune `model` (the float graph with the post-training biases) against
    `teacher` (the same graph before bias correction), write the trained values into `model`'s initializers
    and the int8 layers' integers into `integers`. Without jax, or on a graph the interpreter cannot run,
    nothing changes and None is returned: the post-training result stands."""
    from .onnx_jax import UnsupportedGraph
    if not available():
        log.warning("cnn_qat.unavailable", reason="jax is not installed (the bench extra installs it)")
        return None
    try:
        start = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}   # post-training values
        trained, values, report = finetune(teacher, calibration, outputs, integers, keep_float, recipe,
                                           recipe.monitor, start)
    except UnsupportedGraph as e:
        log.warning("cnn_qat.unsupported", reason=str(e))
        return None
    integers.update(trained)
    for t in model.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name], np.float32), t.name))
    return report
