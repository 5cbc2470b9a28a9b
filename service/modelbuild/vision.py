"""AutoNeural vision path written directly from weights: MobileNet-style CNN encoder, Multi-Scale Fusion
Adapter (MSFA) and a 2-layer MLP connector (no normalisation, so every op stays integer-friendly on the HTP).

`pixel_values` [1, 3, S, S] -> stem conv -> stages of inverted-residual blocks (1x1 expand, depthwise kxk,
1x1 project; batch norm already folded into the convs) -> the outputs of the stages named in
`fusion_stages` are average-pooled to the token grid (16x16 for 768 input), concatenated, mixed by a
pointwise expand/project pair (the MSFA) -> tokens [1, 256, C] -> Linear, GELU, Linear -> `image_embeds`
[1, 256, hidden].

Weights are a flat dict name -> float32 array (names below); `random_weights` makes a seeded set for tests,
`load_weights` reads a safetensors file in the same layout and checks every shape.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.modelbuild.graph import GraphBuilder

ACTIVATIONS = ("hardswish", "relu6", "relu")


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual stage: `repeats` blocks, the first with `stride`."""
    expand: int          # expansion ratio of the 1x1 expand conv (1 = no expand conv)
    channels: int        # output channels
    stride: int
    kernel: int = 3
    repeats: int = 1


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 768
    stem_channels: int = 32
    stages: tuple[BlockSpec, ...] = (
        BlockSpec(1, 16, 1), BlockSpec(4, 24, 2, repeats=2), BlockSpec(4, 40, 2, kernel=5, repeats=2),
        BlockSpec(4, 80, 2, repeats=3), BlockSpec(6, 112, 1, kernel=5, repeats=3),
        BlockSpec(6, 192, 3, kernel=5, repeats=4),
    )
    fusion_stages: tuple[int, ...] = (4, 5)     # stage indices whose outputs the MSFA fuses
    fusion_channels: int = 256
    fusion_expand: int = 2
    token_grid: int = 16                        # 16x16 = 256 visual tokens
    connector_hidden: int = 1024
    lm_hidden: int = 1024                       # the language model's hidden size
    activation: str = "hardswish"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def num_tokens(self) -> int:
        return self.token_grid * self.token_grid

    def stage_resolutions(self) -> list[int]:
        """Spatial size after each stage (symmetric padding k//2)."""
        size = _conv_out(self.image_size, 3, 2)
        sizes = []
        for spec in self.stages:
            size = _conv_out(size, spec.kernel, spec.stride)
            sizes.append(size)
        return sizes

    def validate(self) -> VisionConfig:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: {self.activation!r} is not one of {ACTIVATIONS}")
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        if len(self.fusion_stages) < 2:
            raise ValueError("fusion_stages: the MSFA fuses two or more stages")
        if any(not 0 <= i < len(self.stages) for i in self.fusion_stages):
            raise ValueError(f"fusion_stages: {self.fusion_stages} out of range for {len(self.stages)} stages")
        sizes = self.stage_resolutions()
        for i in self.fusion_stages:
            if sizes[i] % self.token_grid:
                raise ValueError(f"fusion_stages: stage {i} is {sizes[i]}x{sizes[i]}, "
                                 f"not a multiple of the {self.token_grid}x{self.token_grid} token grid")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VisionConfig:
        data = dict(data)
        data["stages"] = tuple(BlockSpec(**s) for s in data.get("stages", ()))
        for key in ("fusion_stages", "mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data).validate()


def tiny_config(lm_hidden: int = 64) -> VisionConfig:
    """Seconds to build and a few ms to run on CPU; ~1.5 s per run on the QNN emulator."""
    return VisionConfig(
        stem_channels=8,
        stages=(BlockSpec(1, 8, 2), BlockSpec(2, 16, 2), BlockSpec(2, 16, 1, kernel=5),
                BlockSpec(2, 24, 2), BlockSpec(2, 32, 3)),
        fusion_stages=(3, 4), fusion_channels=32, fusion_expand=2, token_grid=16,
        connector_hidden=64, lm_hidden=lm_hidden,
    ).validate()


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class _Block:
    prefix: str
    cin: int
    cout: int
    hidden: int
    kernel: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.cin == self.cout

    @property
    def has_expand(self) -> bool:
        return self.hidden != self.cin


def blocks(cfg: VisionConfig) -> list[list[_Block]]:
    """The blocks of every stage, with their weight-name prefixes."""
    out, cin = [], cfg.stem_channels
    for s, spec in enumerate(cfg.stages):
        stage = []
        for r in range(spec.repeats):
            stage.append(_Block(f"stages.{s}.{r}", cin, spec.channels, cin * spec.expand, spec.kernel,
                                spec.stride if r == 0 else 1))
            cin = spec.channels
        out.append(stage)
    return out


def weight_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the graph needs, name -> shape (conv weights OIHW, linear weights [in, out])."""
    shapes: dict[str, tuple[int, ...]] = {
        "stem.weight": (cfg.stem_channels, 3, 3, 3), "stem.bias": (cfg.stem_channels,)}
    for stage in blocks(cfg):
        for b in stage:
            if b.has_expand:
                shapes[f"{b.prefix}.expand.weight"] = (b.hidden, b.cin, 1, 1)
                shapes[f"{b.prefix}.expand.bias"] = (b.hidden,)
            shapes[f"{b.prefix}.dw.weight"] = (b.hidden, 1, b.kernel, b.kernel)
            shapes[f"{b.prefix}.dw.bias"] = (b.hidden,)
            shapes[f"{b.prefix}.project.weight"] = (b.cout, b.hidden, 1, 1)
            shapes[f"{b.prefix}.project.bias"] = (b.cout,)
    fused_in = sum(cfg.stages[i].channels for i in cfg.fusion_stages)
    fused_hidden = cfg.fusion_channels * cfg.fusion_expand
    shapes.update({
        "msfa.expand.weight": (fused_hidden, fused_in, 1, 1), "msfa.expand.bias": (fused_hidden,),
        "msfa.project.weight": (cfg.fusion_channels, fused_hidden, 1, 1), "msfa.project.bias": (cfg.fusion_channels,),
        "connector.fc1.weight": (cfg.fusion_channels, cfg.connector_hidden),
        "connector.fc1.bias": (cfg.connector_hidden,),
        "connector.fc2.weight": (cfg.connector_hidden, cfg.lm_hidden), "connector.fc2.bias": (cfg.lm_hidden,),
    })
    return shapes


def random_weights(cfg: VisionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """He-scaled seeded weights, so activations stay O(1) through the depth (a fair quantization test)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith(".bias"):
            weights[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        gain = 1.0 if ".project." in name or name.endswith("fc2.weight") else 2.0
        weights[name] = (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)
    return weights


def check_weights(cfg: VisionConfig, weights: dict[str, np.ndarray]) -> None:
    expected = weight_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"vision weights: missing {len(missing)} tensors, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"vision weights: {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def load_weights(path: str | Path, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """Read real weights from safetensors (names as in `weight_shapes`, batch norm folded)."""
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision weights: {path} does not exist")
    weights = {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    check_weights(cfg, weights)
    return weights


def load_config(path: str | Path) -> VisionConfig:
    return VisionConfig.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------- graph
def _activation(g: GraphBuilder, x: str, kind: str) -> str:
    if kind == "hardswish":
        return g.op("HardSwish", [x])
    if kind == "relu6":
        return g.op("Clip", [x, g.const(0.0), g.const(6.0)])
    return g.op("Relu", [x])


def _conv(g: GraphBuilder, x: str, weights: dict, prefix: str, *, stride: int = 1, group: int = 1) -> str:
    w = weights[f"{prefix}.weight"]
    k = w.shape[-1]
    pad = k // 2
    return g.op("Conv", [x, g.init(f"{prefix}.weight", w), g.init(f"{prefix}.bias", weights[f"{prefix}.bias"])],
                name=prefix.replace(".", "_"), kernel_shape=[k, k], strides=[stride, stride],
                pads=[pad, pad, pad, pad], group=group)


def add_vision(g: GraphBuilder, pixel_values: str, cfg: VisionConfig, weights: dict[str, np.ndarray]) -> str:
    """Append encoder + MSFA + connector to `g`; returns the [1, tokens, lm_hidden] value name."""
    act = cfg.activation
    x = _activation(g, _conv(g, pixel_values, weights, "stem", stride=2), act)
    stage_outputs = []
    for stage in blocks(cfg):
        for b in stage:
            h = x
            if b.has_expand:
                h = _activation(g, _conv(g, h, weights, f"{b.prefix}.expand"), act)
            h = _activation(g, _conv(g, h, weights, f"{b.prefix}.dw", stride=b.stride, group=b.hidden), act)
            h = _conv(g, h, weights, f"{b.prefix}.project")
            x = g.op("Add", [x, h]) if b.residual else h
        stage_outputs.append(x)

    sizes = cfg.stage_resolutions()
    fused = []
    for i in cfg.fusion_stages:
        factor = sizes[i] // cfg.token_grid
        y = stage_outputs[i]
        if factor > 1:  # average pooling to the token grid: a plain HTP op, no resize kernels
            y = g.op("AveragePool", [y], kernel_shape=[factor, factor], strides=[factor, factor])
        fused.append(y)
    x = g.op("Concat", fused, axis=1)
    x = _activation(g, _conv(g, x, weights, "msfa.expand"), act)
    x = _conv(g, x, weights, "msfa.project")
    x = g.op("Reshape", [x, g.const([1, cfg.fusion_channels, cfg.num_tokens], "int64")])
    x = g.op("Transpose", [x], perm=[0, 2, 1])                     # [1, tokens, C]
    x = g.op("MatMul", [x, g.init("connector.fc1.weight", weights["connector.fc1.weight"])], name="connector_fc1")
    x = g.op("Add", [x, g.init("connector.fc1.bias", weights["connector.fc1.bias"])])
    x = g.op("Gelu", [x])
    x = g.op("MatMul", [x, g.init("connector.fc2.weight", weights["connector.fc2.weight"])], name="connector_fc2")
    return g.op("Add", [x, g.init("connector.fc2.bias", weights["connector.fc2.bias"])])


def build_vision(cfg: VisionConfig, weights: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write the float vision graph (`pixel_values` -> `image_embeds`) to `path`."""
    cfg.validate()
    check_weights(cfg, weights)
    g = GraphBuilder("autoneural_vision")
    pixels = g.input("pixel_values", "float32", [1, 3, cfg.image_size, cfg.image_size])
    out = add_vision(g, pixels, cfg, weights)
    g.output(out, "image_embeds", "float32", [1, cfg.num_tokens, cfg.lm_hidden])
    return g.save(path)


def preprocess_spec(cfg: VisionConfig) -> dict:
    """The manifest's `components.vision.preprocess` entry."""
    return {"size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std), "color": "RGB", "layout": "NCHW"}


def calibration_images(cfg: VisionConfig, count: int, seed: int) -> list[np.ndarray]:
    """Normalised [1,3,S,S] inputs with image-like statistics (smooth gradients, blobs, edges), for
    calibration and held-out evaluation when no photo set is given."""
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    out = []
    for _ in range(count):
        img = np.empty((3, s, s), np.float32)
        for c in range(3):
            a, b, p = rng.uniform(-1, 1, 3)
            img[c] = 0.5 + 0.3 * np.sin(6.28 * (a * xx + b * yy) * rng.uniform(0.5, 4) + p)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.03, 0.2)]
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            img[:, mask] = rng.uniform(0, 1, (3, 1))
        img += rng.normal(0, 0.02, img.shape).astype(np.float32)
        img = np.clip(img, 0, 1)
        mean = np.asarray(cfg.mean, np.float32)[:, None, None]
        std = np.asarray(cfg.std, np.float32)[:, None, None]
        out.append(((img - mean) / std)[None].astype(np.float32))
    return out


def build_vision_component(cfg: VisionConfig, weights: dict[str, np.ndarray], bundle_dir: str | Path, *,
                           precisions: tuple[str, ...] = ("float", "w8a16"), targets: tuple[str, ...] = (),
                           calibration: list[np.ndarray] | None = None, held_out: list[np.ndarray] | None = None,
                           calibration_samples: int = 8, held_out_samples: int = 2) -> dict:
    """Write `vision.<precision>.onnx` for each precision (and context binaries per target for the QDQ ones)
    into `bundle_dir`; returns the manifest's `components.vision` entry, with the accuracy report under
    `quantization` (SQNR/RMS on held-out inputs, never the calibration ones)."""
    import hashlib

    from service.modelbuild import qdq
    from service.runtime.backends import create_session

    bundle_dir = Path(bundle_dir)
    float_path = build_vision(cfg, weights, bundle_dir / "vision.float.onnx")
    calibration = calibration or calibration_images(cfg, calibration_samples, seed=1)
    held_out = held_out or calibration_images(cfg, held_out_samples, seed=10_000)
    io = {"inputs": [{"name": "pixel_values", "shape": [1, 3, cfg.image_size, cfg.image_size], "dtype": "float32"}],
          "outputs": [{"name": "image_embeds", "shape": [1, cfg.num_tokens, cfg.lm_hidden], "dtype": "float32"}]}
    variants: dict[str, dict] = {}
    reports = []
    float_session = create_session(float_path, "cpu", model_name="vision.float")
    for precision in precisions:
        if precision == "float":
            path = float_path
        else:
            path = bundle_dir / f"vision.{precision}.onnx"
            feeds = [{"pixel_values": x} for x in calibration]
            if precision in ("w8a16", "w8pc-a16"):      # the CNN recipe: docs/quantization.md
                from service.modelbuild.cnn_ptq import quantize_cnn
                quantize_cnn(float_path, path, feeds)
            else:
                qdq.quantize_variant(float_path, path, precision, feeds)
        entry = {"file": path.name, "precision": precision,
                 "backends": ["cpu", "qnn-htp", "qnn-emulator"] if precision in qdq.QDQ_PRECISIONS else ["cpu"],
                 **io, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        if precision != "float":
            report = qdq.evaluate(float_session, create_session(path, "cpu", model_name=f"vision.{precision}"),
                                  [{"pixel_values": x} for x in held_out], component="vision",
                                  precision=precision, backend="cpu")
            reports.append(report.to_dict())
        if precision in qdq.QDQ_PRECISIONS and targets:
            from service.modelbuild.qnn_compile import compile_context
            entry["context_binaries"] = {}
            for target in targets:
                compiled = compile_context(path, bundle_dir / "qnn" / target, target)
                entry["context_binaries"][target] = str(compiled.path.relative_to(bundle_dir))
        variants[precision] = entry
    return {"variants": variants, "preprocess": preprocess_spec(cfg), "config": cfg.to_dict(),
            "tokens": cfg.num_tokens, "quantization": reports}
