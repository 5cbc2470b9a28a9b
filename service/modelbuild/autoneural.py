"""One AutoNeural VLM bundle: the vision encoder + connector and an LFM2 decoder, with an image placeholder token.

The bundle holds (docs/model-bundle.md):
- `decoder_prefill`/`decoder_decode` variants `float` (append mode, the CPU fast path), `float_replace`
  (replace mode, the quantizer's input) and one QDQ variant per HTP precision (`w8a16`, `w4a16`; replace
  mode, calibrated on prompts that carry real image embeddings, since those rows have other statistics
  than token embeddings);
- `vision` (`vision.build_vision_component`: float + QDQ, context binaries per target);
- the tokenizer with `<image>` (added when the checkpoint lacks it) and a chat template that places
  `image_tokens_per_image` copies of it for each `{"type": "image"}` part of a message.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from collections.abc import Callable

import numpy as np

from . import vision as vision_mod
from .bundle_writer import KNOWN_VARIANTS, swap_in, write_bundle, write_manifest
from .decoder import DecoderSpec, replace_feed, state_entries
from .gguf_llama import LoadedModel

IMAGE_TOKEN = "<image>"
HTP_PRECISIONS = ("w8a16", "w4a16")
# LFM2's ChatML (after the BOS token) whose message content is a string or a list of parts
# ({"type": "text", "text": ...} | {"type": "image"}).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_token * image_tokens_per_image }}\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

Progress = Callable[[str], None]


def chat_template(tokens_per_image: int) -> str:
    """CHAT_TEMPLATE with the placeholder bound (the runtime renders templates with messages only)."""
    return ("{% set image_token = '" + IMAGE_TOKEN + "' %}{% set image_tokens_per_image = "
            + str(int(tokens_per_image)) + " %}" + CHAT_TEMPLATE)


def with_image_token(loaded: LoadedModel) -> tuple[dict, np.ndarray, int]:
    """(tokenizer.json, embedding table, image token id): `<image>` added as a special token when missing.

    An added token gets an embedding row of zeros: the runtime always overwrites it with a vision row, and
    through a tied head its logit is exactly 0 (an untied head gets a zero row too), below the top logit of
    any sane model. The head must cover the whole tokenizer: constrained decoding sizes its masks by it.
    """
    tok = json.loads(json.dumps(loaded.tokenizer_json))
    embed = np.asarray(loaded.weights["embed"], np.float32)
    vocab = tok.get("model", {}).get("vocab", {})
    existing = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    if IMAGE_TOKEN in existing or IMAGE_TOKEN in vocab:
        token_id = int(existing.get(IMAGE_TOKEN, vocab.get(IMAGE_TOKEN)))
        if token_id >= embed.shape[0]:
            raise ValueError(f"tokenizer: {IMAGE_TOKEN} has id {token_id} beyond the {embed.shape[0]} embeddings")
        return tok, embed, token_id
    ids = list(vocab.values()) + list(existing.values())
    token_id = max(max(ids) + 1 if ids else 0, embed.shape[0])
    tok.setdefault("added_tokens", []).append({
        "id": token_id, "content": IMAGE_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True})
    table = np.zeros((token_id + 1, embed.shape[1]), np.float32)
    table[:embed.shape[0]] = embed
    return tok, table, token_id


# ------------------------------------------------------------------------------ replace-mode calibration
def replace_trajectory(spec: DecoderSpec, embed_table: np.ndarray, prompt_embeds: np.ndarray, prefill, decode,
                       chunk: int, decode_steps: int) -> tuple[list[dict], list[dict]]:
    """Feeds of the float replace-mode graphs along a greedy run (prefill chunks, then decode steps)."""
    H, L = spec.hidden_size, spec.context_length
    entries = state_entries(spec, 1, "replace")
    states = {e["input"]: np.zeros(e["shape"], np.float32) for e in entries}
    prefill_feeds, decode_feeds = [], []
    pad = (-len(prompt_embeds)) % chunk
    start, first = 0, True
    logits = None
    while start < len(prompt_embeds):
        p = pad if first else 0
        n = chunk - p
        feed = replace_feed(H, L, chunk, prompt_embeds[start:start + n], start, p, states)
        prefill_feeds.append(feed)
        outs = dict(zip([o.name for o in prefill.get_outputs()], prefill.run(None, feed)))
        states = {e["input"]: outs[e["output"]] for e in entries}
        logits, start, first = outs["logits"][0, -1], start + n, False
    for _ in range(decode_steps):
        if start >= L:
            break
        token = int(np.argmax(logits))
        feed = replace_feed(H, L, 1, embed_table[token][None], start, 0, states)
        decode_feeds.append(feed)
        outs = dict(zip([o.name for o in decode.get_outputs()], decode.run(None, feed)))
        states = {e["input"]: outs[e["output"]] for e in entries}
        logits, start = outs["logits"][0, -1], start + 1
    return prefill_feeds, decode_feeds


def _prompts(tokenizer, template_messages: list[list[dict]]) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in template_messages]


CALIBRATION_QUESTIONS = ("What is in this picture?", "Describe the scene.", "Is anyone in the car?",
                         "What colour is it?", "Where is the dog?", "Count the people.")


# ------------------------------------------------------------------------------------------------ build
def build_autoneural_bundle(out: str | Path, *, vision_cfg: vision_mod.VisionConfig,
                            vision_weights: dict[str, np.ndarray], lfm2_dir_or_loaded: str | Path | LoadedModel,
                            precisions: tuple[str, ...] = HTP_PRECISIONS,
                            vision_precisions: tuple[str, ...] = ("w8a16",), name: str = "autoneural",
                            context_length: int = 4096, prefill_chunk: int = 64, targets: tuple[str, ...] = (),
                            calibration_prompts: int = 4, decode_steps: int = 8, source: dict | None = None,
                            inputs_hash: str = "", progress: Progress = lambda s: None) -> dict:
    """Write one AutoNeural bundle (architecture "autoneural") into `out`; return its manifest.

    `precisions`: the decoder's HTP QDQ precisions; `vision_precisions`: the vision encoder's (W8A16 keeps the
    CNN near float: ~45 dB in the paper). Both also get a float variant.
    `targets`: QNN context-binary targets compiled for the vision QDQ graphs (qnn_compile.TARGETS).
    """
    from service.modelbuild import qdq
    from service.runtime.backends import create_session
    from service.runtime.tokenizer import Tokenizer

    bad = [p for p in (*precisions, *vision_precisions) if p not in qdq.QDQ_PRECISIONS]
    if bad:
        raise ValueError(f"precisions: {bad} are not HTP QDQ precisions ({', '.join(qdq.QDQ_PRECISIONS)})")
    out = Path(out)
    if isinstance(lfm2_dir_or_loaded, LoadedModel):
        loaded = lfm2_dir_or_loaded
    else:
        from .lfm2 import lfm2_inputs_sha256, load_lfm2
        progress(f"loading LFM2 weights from {lfm2_dir_or_loaded}")
        loaded = load_lfm2(lfm2_dir_or_loaded, context_length=context_length)
        source = source or {"file": Path(lfm2_dir_or_loaded).name, "sha256": lfm2_inputs_sha256(lfm2_dir_or_loaded)}
    spec = loaded.spec
    if spec.architecture != "lfm2":
        raise ValueError(f"decoder: AutoNeural pairs the vision encoder with LFM2, got {spec.architecture!r}")
    if vision_cfg.lm_hidden != spec.hidden_size:
        raise ValueError(f"vision_cfg.lm_hidden: {vision_cfg.lm_hidden} != the decoder's hidden size "
                         f"{spec.hidden_size}")
    tokens_per_image = vision_cfg.num_tokens
    if spec.context_length < tokens_per_image + prefill_chunk:
        raise ValueError(f"context_length: {spec.context_length} cannot hold an image ({tokens_per_image} tokens) "
                         f"and a prompt chunk ({prefill_chunk})")
    tok_json, table, image_token_id = with_image_token(loaded)
    tok_cfg = dict(loaded.tokenizer_config)
    # Always our template: a checkpoint's own (LFM2-VL's) places one <image> per image and leaves the
    # expansion to its processor; ours places all of them, as the runtime expects.
    tok_cfg["chat_template"] = chat_template(tokens_per_image)
    tok_cfg.update(image_token=IMAGE_TOKEN, image_token_id=image_token_id, image_tokens_per_image=tokens_per_image)

    weights = dict(loaded.weights, embed=table)
    if "lm_head" in weights:
        head = np.zeros_like(table)
        head[:weights["lm_head"].shape[0]] = weights["lm_head"]
        weights["lm_head"] = head
    spec = dataclasses.replace(spec, vocab_size=table.shape[0])

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "qnn", ignore_errors=True)       # context binaries of an earlier build
    manifest = write_bundle(out, name=name, spec=spec, weights=weights, tokenizer_json=tok_json,
                            tokenizer_config=tok_cfg, source=source or {"file": loaded.name, "sha256": ""},
                            variants=[KNOWN_VARIANTS["float"], KNOWN_VARIANTS["float_replace"]],
                            prefill_chunk=prefill_chunk, inputs_hash=inputs_hash, progress=progress)
    manifest["architecture"] = "autoneural"
    manifest["name"] = name

    progress(f"vision encoder: {vision_cfg.num_tokens} tokens -> hidden {vision_cfg.lm_hidden}, "
             f"precisions float,{','.join(vision_precisions)}")
    vision_component = vision_mod.build_vision_component(vision_cfg, vision_weights, out,
                                                         precisions=("float", *vision_precisions), targets=targets)
    manifest["components"]["vision"] = vision_component
    manifest["quantization"]["vision"] = vision_component.pop("quantization")

    if precisions:
        progress("decoder calibration: greedy runs of the float replace-mode graphs on image+text prompts")
        comps = manifest["components"]
        float_paths = {c: out / comps[c]["variants"]["float_replace"]["file"]
                       for c in ("decoder_prefill", "decoder_decode")}
        sessions = {c: create_session(p, "cpu", model_name=f"{c}.float_replace") for c, p in float_paths.items()}
        vision_float = create_session(out / vision_component["variants"]["float"]["file"], "cpu",
                                      model_name="vision.float")
        tokenizer = Tokenizer(out / "tokenizer.json", tok_cfg)
        images = vision_mod.calibration_images(vision_cfg, calibration_prompts + 1, seed=20_000)
        prompt_table = table.astype(np.float16).astype(np.float32)     # as the runtime embeds prompts
        trajectories = []
        for i, image in enumerate(images):
            question = CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)]
            content = [{"type": "image"}, {"type": "text", "text": question}] if i % 2 == 0 else question
            ids = _prompts(tokenizer, [[{"role": "user", "content": content}]])[0]
            rows = prompt_table[np.asarray(ids)]
            if i % 2 == 0:
                rows[np.asarray(ids) == image_token_id] = vision_float.run(None, {"pixel_values": image})[0][0]
            trajectories.append(replace_trajectory(spec, prompt_table, rows, sessions["decoder_prefill"],
                                                   sessions["decoder_decode"], prefill_chunk, decode_steps))
        calibration, held_out = trajectories[:-1], trajectories[-1]      # the last run is held out
        reports = []
        for precision in precisions:
            for index, component in enumerate(("decoder_prefill", "decoder_decode")):
                calib = [feed for traj in calibration for feed in traj[index]]
                path = out / f"{component}.{precision}.onnx"
                progress(f"  quantizing {component} to {precision} ({len(calib)} calibration feeds)")
                qdq.quantize_qdq(float_paths[component], path, calib, precision)
                quant = create_session(path, "cpu", model_name=f"{component}.{precision}")
                report = qdq.evaluate(sessions[component], quant, held_out[index], component=component,
                                      precision=precision, backend="cpu", output="logits").to_dict()
                report["top1_agreement"] = _top1_agreement(sessions[component], quant, held_out[index])
                report["recipe"] = qdq.recipe_name(precision)      # float LFM2 weights: no GGUF codes to copy
                reports.append(report)
                entry = dict(comps[component]["variants"]["float_replace"])
                entry.pop("data_file", None)
                entry.pop("sha256", None)
                entry.update(file=path.name, precision=precision, backends=["cpu", "qnn-htp", "qnn-emulator"])
                if targets:
                    from .qnn_compile import compile_context
                    entry["context_binaries"] = {}
                    for target in targets:      # fails the build if the HTP rejects a node (no CPU fallback)
                        progress(f"  compiling {path.name} for {target}")
                        compiled = compile_context(path, out / "qnn" / target, target)
                        entry["context_binaries"][target] = str(compiled.path.relative_to(out))
                comps[component]["variants"][precision] = entry
        manifest["quantization"]["decoder"] = reports
    progress("hashing files")
    write_manifest(out, manifest)
    progress(f"AutoNeural bundle written to {out}")
    return manifest


def _top1_agreement(float_session, quant_session, feeds: list[dict]) -> float:
    agree = total = 0
    for feed in feeds:
        ref = float_session.run(["logits"], feed)[0][0]
        got = quant_session.run(["logits"], feed)[0][0]
        live = feed["token_mask"][0] > 0
        agree += int((ref.argmax(-1) == got.argmax(-1))[live].sum())
        total += int(live.sum())
    return round(agree / max(total, 1), 4)


def tiny_autoneural_bundle(out: str | Path, seed: int = 0, *, precisions: tuple[str, ...] = ("w8a16",),
                           context_length: int = 384, prefill_chunk: int = 64, targets: tuple[str, ...] = (),
                           progress: Progress = lambda s: None) -> Path:
    """A seeded tiny AutoNeural bundle (tiny LFM2 + tiny vision, hidden 64) built in seconds; returns its folder.

    The source checkpoint is written beside the bundle (`<out>.ckpt`)."""
    from .lfm2 import load_lfm2, read_safetensors, write_safetensors
    from .tiny import write_tiny_lfm2

    out = Path(out)
    ckpt = write_tiny_lfm2(out.with_name(out.name + ".ckpt"), seed=seed, max_positions=context_length)
    # An untied random head: with a tied one a random tiny model only repeats its input token (the embedding
    # dominates the residual stream), which would make token-equality checks say little.
    tensors = read_safetensors(ckpt / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    rng = np.random.default_rng(seed + 7919)
    tensors["lm_head.weight"] = (rng.standard_normal(embed.shape) * 3 / np.sqrt(embed.shape[1])).astype(np.float32)
    write_safetensors(ckpt / "model.safetensors", tensors)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "tie_embedding": False}))
    loaded = load_lfm2(ckpt, context_length=context_length)
    cfg = vision_mod.tiny_config(lm_hidden=loaded.spec.hidden_size)
    build_autoneural_bundle(out, vision_cfg=cfg, vision_weights=vision_mod.random_weights(cfg, seed=seed),
                            lfm2_dir_or_loaded=loaded, precisions=precisions, name=out.name,
                            context_length=context_length, prefill_chunk=prefill_chunk, targets=targets,
                            source={"file": f"tiny-autoneural seed {seed}", "sha256": ""}, progress=progress)
    return out


def cli_build(args, emit: Progress) -> int:
    """`incar model build --autoneural LFM2_DIR|tiny` (the CLI's arguments; built beside, swapped in whole)."""
    import sys

    precisions = tuple(p.strip() for p in args.htp.split(",") if p.strip())
    out = Path(args.out) / (args.name or ("tiny-autoneural" if args.autoneural == "tiny"
                                          else Path(args.autoneural).name.lower()))
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(staging.with_name(staging.name + ".ckpt"), ignore_errors=True)
    targets = tuple(t for t in (args.targets or "").split(",") if t)
    try:
        if args.autoneural == "tiny":
            tiny_autoneural_bundle(staging, seed=args.seed, precisions=precisions, context_length=args.context or 384,
                                   prefill_chunk=args.chunk or 64, targets=targets, progress=emit)
            shutil.rmtree(staging.with_name(staging.name + ".ckpt"), ignore_errors=True)
        else:
            if not (args.vision_config and args.vision_weights):
                print("error: --autoneural LFM2_DIR needs --vision-config and --vision-weights", file=sys.stderr)
                return 2
            cfg = vision_mod.load_config(args.vision_config)
            build_autoneural_bundle(staging, vision_cfg=cfg,
                                    vision_weights=vision_mod.load_weights(args.vision_weights, cfg),
                                    lfm2_dir_or_loaded=args.autoneural, precisions=precisions, name=out.name,
                                    context_length=args.context or 4096, prefill_chunk=args.chunk or 64,
                                    targets=targets, progress=emit)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.autoneural == "tiny":
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["name"] = out.name
        write_manifest(staging, manifest)
    swap_in(staging, out)
    emit(f"bundle ready at {out}")
    return 0
