"""Write a decoder bundle (docs/model-bundle.md): graphs per variant, shared external weights, manifest."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import onnx
from onnx import external_data_helper

from service.runtime.bundle import sha256_file

from .decoder import DecoderSpec, build_decoder, io_description
from .gqa_decoder import build_gqa_decoder, shared_io_description

FORMAT = "incar-bundle"
FORMAT_VERSION = 1
BUILDER_VERSION = "0.1.0"
PREFILL_CHUNK = 64
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096


@dataclass(frozen=True)
class VariantSpec:
    name: str             # "float", "int4", "int8", "float_replace"
    precision: str        # "float" | "int4" | "int8"
    state_update: str     # "append" | "replace"

    @property
    def backends(self) -> list[str]:
        # Replace-mode float graphs are the QNN helper's quantization input; they also run on the CPU.
        return ["cpu"]


# CPU variants are "shared" (the fused GQA graph, gqa_decoder.py) where the architecture allows, else "append".
# For a GGUF source "int4" holds the GGUF's own blocks (gguf_blocks.py), never re-rounded.
DEFAULT_VARIANTS = (VariantSpec("float", "float", "shared"), VariantSpec("int4", "int4", "shared"))
REPLACE_VARIANT = VariantSpec("float_replace", "float", "replace")
KNOWN_VARIANTS = {v.name: v for v in (*DEFAULT_VARIANTS, VariantSpec("int8", "int8", "shared"), REPLACE_VARIANT)}

Progress = Callable[[str], None]


def save_shared(models: list[tuple[Path, onnx.ModelProto]], data_path: Path) -> None:
    """Save several graphs whose large initializers live once in one external-data file.

    Prefill and decode of one variant hold the same weights under the same names; each distinct
    (name, bytes) is written once and both graphs point at it.
    """
    offsets: dict[tuple[str, bytes], tuple[int, int]] = {}
    with open(data_path, "wb") as f:
        for _, model in models:
            for t in model.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < _EXTERNAL_MIN_BYTES:
                    continue
                key = (t.name, hashlib.sha1(t.raw_data).digest())
                if key not in offsets:
                    pos = f.tell()
                    if pos % _ALIGN:
                        f.write(b"\0" * (_ALIGN - pos % _ALIGN))
                        pos = f.tell()
                    f.write(t.raw_data)
                    offsets[key] = (pos, len(t.raw_data))
                offset, length = offsets[key]
                external_data_helper.set_external_data(t, location=data_path.name, offset=offset, length=length)
                t.ClearField("raw_data")
    for path, model in models:
        onnx.save_model(model, str(path))


def gqa_capable(spec: DecoderSpec) -> bool:
    """Whether the fused GQA CPU graph can write this architecture (attention-only, no per-head q/k norm)."""
    return set(spec.layer_kinds) == {"attention"} and not spec.qk_norm


def write_decoder_variants(out: Path, spec: DecoderSpec, weights: dict, variants: list[VariantSpec],
                           prefill_chunk: int, progress: Progress,
                           variant_weights: Callable[[str], dict] | None = None) -> dict[str, dict[str, dict]]:
    """Write decoder_prefill/decode.<variant>.onnx for variants of one precision, whose weights are stored
    once in decoder.<first variant>.data (append and replace graphs name the same weights alike).

    Shared-mode variants write one graph for both components; `variant_weights(precision)` gives their weights.
    Returns {variant: {component: manifest entry}}.
    """
    data_name = f"decoder.{variants[0].name}.data"
    models, entries = [], {}
    for variant in variants:
        entries[variant.name] = {}
        if variant.state_update == "shared":
            if gqa_capable(spec):
                path = out / f"decoder.{variant.name}.onnx"
                progress(f"  writing {path.name} (fused GQA graph, prefill and decode)")
                models.append((path, build_gqa_decoder(spec, variant_weights(variant.precision),
                                                       name=f"decoder_{variant.name}").model()))
                desc = shared_io_description(spec)
                for component in ("decoder_prefill", "decoder_decode"):
                    entries[variant.name][component] = {"file": path.name, "precision": variant.precision,
                                                        "backends": variant.backends, "data_file": data_name, **desc}
                continue
            variant = dataclasses.replace(variant, state_update="append")
        for component, tokens in (("decoder_prefill", prefill_chunk), ("decoder_decode", 1)):
            progress(f"  writing {component} ({variant.name}, {variant.state_update}, T={tokens})")
            model = build_decoder(spec, weights, tokens, variant.state_update,
                                  name=f"{component}_{variant.name}").model()
            if variant.precision in ("int4", "int8"):
                from .cpu_quant import quantize_weights

                progress(f"  quantizing {component} to {variant.precision} (MatMulNBits)")
                model = quantize_weights(model, bits=4 if variant.precision == "int4" else 8)
            path = out / f"{component}.{variant.name}.onnx"
            models.append((path, model))
            desc = io_description(spec, tokens, variant.state_update)
            entries[variant.name][component] = {"file": path.name, "precision": variant.precision,
                                                "backends": variant.backends, "data_file": data_name, **desc}
    save_shared(models, out / data_name)
    return entries


def write_bundle(out: str | Path, *, name: str, spec: DecoderSpec, weights: dict, tokenizer_json: dict,
                 tokenizer_config: dict, source: dict, variants=DEFAULT_VARIANTS, prefill_chunk: int = PREFILL_CHUNK,
                 inputs_hash: str = "", progress: Progress = lambda s: None, transcoded: dict | None = None,
                 source_types: dict | None = None) -> dict:
    """Write a complete decoder bundle into `out` (created or overwritten) and return its manifest.

    `transcoded` (GGUF sources): the weights as the GGUF stores them, for the int4 variant and the embedding table;
    `source_types` counts the GGUF's tensor types for the quantization report.
    """
    from .cpu_quant import nbits_from_float
    from .gguf_blocks import NBitsWeight

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.onnx")) + list(out.glob("*.data")) + list(out.glob("embed_tokens.*")):
        stale.unlink()
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    table = (transcoded or {}).get("embed")
    if isinstance(table, NBitsWeight):
        progress(f"writing tokenizer and embeddings ({spec.vocab_size} x {spec.hidden_size}, "
                 f"{table.source_type} codes)")
        embedding = write_block_embedding(out / "embed_tokens.npz", table)
    else:
        progress(f"writing tokenizer and embeddings ({spec.vocab_size} x {spec.hidden_size}, float16)")
        np.save(out / "embed_tokens.npy", np.asarray(weights["embed"], np.float16))
        embedding = {"file": "embed_tokens.npy", "dtype": "float16", "scale": 1.0}
    cpu_weights: dict[str, dict] = {"float": weights}
    if transcoded is not None:
        cpu_weights["int4"] = transcoded

    def variant_weights(precision: str) -> dict:
        if precision not in cpu_weights:   # no GGUF blocks to copy: re-round the float weights (symmetric blocks)
            bits = 8 if precision == "int8" else 4
            cpu_weights[precision] = requantized(weights, spec, lambda w: nbits_from_float(w, bits=bits))
        return cpu_weights[precision]
    components = {"decoder_prefill": {"tokens": prefill_chunk, "variants": {}},
                  "decoder_decode": {"tokens": 1, "variants": {}}}
    by_precision: dict[str, list[VariantSpec]] = {}
    for variant in variants:
        by_precision.setdefault(variant.precision, []).append(variant)
    for precision, group in by_precision.items():
        progress(f"variants {', '.join(v.name for v in group)} ({precision})")
        for variant_name, comps in write_decoder_variants(out, spec, weights, group, prefill_chunk, progress,
                                                          variant_weights).items():
            for component, entry in comps.items():
                components[component]["variants"][variant_name] = entry
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "architecture": spec.architecture,
        "source": source, "builder_version": BUILDER_VERSION, "inputs_hash": inputs_hash,
        "text": {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
                 "context_length": spec.context_length, "prefill_chunk": prefill_chunk,
                 "num_layers": spec.num_layers, "layer_kinds": spec.layer_kinds,
                 "embedding": embedding},
        "decoder": spec.to_dict(),
        "tokenizer": {"file": "tokenizer.json", **tokenizer_config},
        "components": components,
        "quantization": {},
    }
    shared = [v for v in variants if v.name in components["decoder_decode"]["variants"]
              and components["decoder_decode"]["variants"][v.name]["state_update"] == "shared"
              and v.precision != "float"]
    if shared:
        from .lm_report import quantization_report

        progress("measuring the CPU variants against float on held-out text (teacher-forced)")
        manifest["quantization"] = quantization_report(spec, weights, {v.name: variant_weights(v.precision)
                                                                       for v in shared},
                                                       tokenizer_json, source_types or {})
    progress("hashing files")
    write_manifest(out, manifest)
    progress(f"bundle written to {out}")
    return manifest


def requantized(weights: dict, spec: DecoderSpec, quantize: Callable) -> dict:
    """The float weights with every matrix re-rounded by `quantize` (norms and the embedding table kept)."""
    keys = ("q", "k", "v", "o", "gate", "up", "down")
    out = {**weights, "layers": [{**lw, **{k: quantize(lw[k]) for k in keys}} for lw in weights["layers"]]}
    head = "embed" if spec.tied_head else "lm_head"
    out[head] = quantize(weights[head])
    return out


def write_block_embedding(path: Path, table) -> dict:
    """The embedding table as the GGUF stores it (codes + block scales/offsets): rows gathered exactly."""
    arrays = {"codes": table.codes, "scales": table.scales}
    if table.offsets is not None:
        arrays["offsets"] = table.offsets
    np.savez(path, **arrays)
    return {"file": path.name, "dtype": "blocks", "bits": table.bits, "block_size": table.block_size,
            "source_type": table.source_type, "scale": 1.0}


def write_manifest(bundle_dir: str | Path, manifest: dict) -> None:
    """(Re)hash every file the manifest names and write manifest.json atomically.

    Other builders (vision, QNN) add their variants to `manifest["components"]` and call this.
    """
    bundle_dir = Path(bundle_dir)
    files: dict[str, str] = {}
    for rel in sorted(_referenced_files(manifest)):
        files[rel] = sha256_file(bundle_dir / rel)
    for comp in manifest["components"].values():
        for entry in comp.get("variants", {}).values():
            entry["sha256"] = files[entry["file"]]
    manifest["files"] = files
    tmp = bundle_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, bundle_dir / "manifest.json")


def _referenced_files(manifest: dict) -> set[str]:
    files = {manifest["tokenizer"]["file"], manifest["text"]["embedding"]["file"]}
    for comp in manifest["components"].values():
        for entry in comp.get("variants", {}).values():
            files.add(entry["file"])
            if entry.get("data_file"):
                files.add(entry["data_file"])
            for ctx in (entry.get("context_binaries") or {}).values():
                files.add(ctx)
    return files


def swap_in(staging: Path, out: Path) -> None:
    """Replace the bundle at `out` with the one built at `staging`, whole: a server (re)loading meanwhile sees
    the old bundle or the new one, never half of either."""
    retired = out.with_name(out.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if out.exists():
        os.replace(out, retired)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
