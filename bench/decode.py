"""Decode speed of the generation engine against two baselines measured in the same run:

(a) a bare `session.run` loop over the same bundle graphs (numpy feeds, argmax; no scheduler, no asyncio,
    no detokenization): the engine's overhead, target <= 5 %;
(b) llama.cpp (llama-cpp-python built from source) on the GGUF the bundle was built from, same thread
    count, same prompt text, same number of generated tokens (EOS banned everywhere): target >= 1.0x.

Greedy decoding throughout. Each contender runs one warm-up and then `--repeats` timed runs; the median
is reported. The last line is JSON.

    .venv/bin/python bench/decode.py [--bundle build/models/smollm2-135m-instruct] [--threads 2] [--tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.runtime.backends import create_session  # noqa: E402
from service.runtime.bundle import load_bundle  # noqa: E402
from service.runtime.engine import Done, GenerationEngine, GenerationRequest  # noqa: E402
from service.runtime.generator import LanguageModel  # noqa: E402
from service.runtime.scheduler import NpuScheduler  # noqa: E402

MASK = np.float32(-1.0e4)
PROMPT = "Describe, in a few sentences, what a careful driver checks before opening the car door on a busy street."


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def llama_cmake_args() -> str:
    """The CMAKE_ARGS to build llama-cpp-python for this CPU (AMX excluded: it traps here, see bench-notes)."""
    flags = cpu_flags()
    pairs = [("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
             ("avx512f", "GGML_AVX512"), ("avx512_vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"),
             ("avx_vnni", "GGML_AVX_VNNI")]
    return " ".join(["-DGGML_NATIVE=OFF"] + [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in pairs])


# ---- (a) bare session.run loop -----------------------------------------------------------------------
class BareLoop:
    """The decoder graphs driven directly per docs/model-bundle.md (append mode), nothing else."""

    def __init__(self, bundle, variant: str, threads: int):
        self.L = int(bundle.manifest["text"]["context_length"])
        emb = bundle.manifest["text"]["embedding"]
        self.embed = np.load(bundle.file(emb["file"]))
        self.scale = np.float32(emb.get("scale", 1.0))
        self.graphs = {}
        for component in ("decoder_prefill", "decoder_decode"):
            entry = bundle.variant(component, variant)
            if entry.get("state_update", "append") != "append":
                raise SystemExit(f"bare loop supports append-mode variants only; {variant} is not")
            self.graphs[component] = (create_session(bundle.file(entry["file"]), "cpu", threads=threads), entry,
                                      int(bundle.manifest["components"][component]["tokens"]))

    def _emb(self, ids) -> np.ndarray:
        return self.embed[np.asarray(ids)].astype(np.float32) * self.scale

    def run(self, prompt_ids: list[int], tokens: int, eos: list[int]) -> tuple[float, float, list[int]]:
        """(ttft_s, decode tokens/s, generated ids)."""
        t0 = time.perf_counter()
        session, entry, T = self.graphs["decoder_prefill"]
        n = len(prompt_ids)
        # The past axis is symbolic: one cache sized for the whole run, in the generator's 256-slot buckets.
        L = min(self.L, -(-(n + tokens + 1) // 256) * 256)
        state = {}
        for s in entry["state"]:
            shape = list(s["shape"])
            shape[s.get("axis", 2)] = L
            state[s["input"]] = np.zeros(shape, np.float32)
        outs = ["logits"] + [s["output"] for s in entry["state"]]
        pad = (-n) % T
        ids = [0] * pad + prompt_ids
        done = 0
        for c in range(0, len(ids), T):
            chunk = ids[c:c + T]
            real = np.arange(T) >= (pad if c == 0 else 0)
            start = done
            count = int(real.sum())
            emb = self._emb(chunk)
            emb[~real] = 0
            pos = np.zeros((1, T), np.int64)
            pos[0, real] = np.arange(start, start + count)
            mask = np.full((1, 1, T, L + T), MASK, np.float32)
            mask[0, 0, :, :start] = 0
            first = T - count
            mask[0, 0, first:, L + first:][np.tril(np.ones((count, count), bool))] = 0
            mask[0, 0, np.arange(first), L + np.arange(first)] = 0
            feeds = {"inputs_embeds": emb[None], "position_ids": pos, "token_mask": real[None].astype(np.float32),
                     "attention_mask": mask, **state}
            result = session.run(outs, feeds)
            for s, out in zip(entry["state"], result[1:]):
                state[s["input"]][:, :, start:start + count] = out[:, :, first:]
            done += count
            logits = result[0][0, -1]
        ban = np.asarray(eos)
        logits = logits.copy()
        logits[ban] = -np.inf
        token = int(np.argmax(logits))
        ttft = time.perf_counter() - t0
        generated = [token]
        session, entry, _ = self.graphs["decoder_decode"]
        outs = ["logits"] + [s["output"] for s in entry["state"]]
        mask = np.full((1, 1, 1, L + 1), MASK, np.float32)
        mask[0, 0, 0, :done] = 0
        mask[0, 0, 0, L] = 0
        one = np.ones((1, 1), np.float32)
        t1 = time.perf_counter()
        for _ in range(tokens - 1):
            pos = done
            feeds = {"inputs_embeds": self._emb([token])[None], "position_ids": np.array([[pos]], np.int64),
                     "token_mask": one, "attention_mask": mask, **state}
            result = session.run(outs, feeds)
            for s, out in zip(entry["state"], result[1:]):
                state[s["input"]][:, :, pos:pos + 1] = out
            mask[0, 0, 0, pos] = 0
            done += 1
            logits = result[0][0, -1].copy()
            logits[ban] = -np.inf
            token = int(np.argmax(logits))
            generated.append(token)
        rate = (tokens - 1) / (time.perf_counter() - t1)
        return ttft, rate, generated


def generator_loop(model, prompt_ids: list[int], tokens: int, eos: list[int]) -> tuple[float, float, list[int]]:
    """The generator's own path (IO binding, bucketed caches) with nothing of the engine around it."""
    t0 = time.perf_counter()
    seq = model.new_sequence(prompt_ids)
    while not seq.prefill_step():
        pass
    ban = np.asarray(eos)

    def pick() -> int:
        logits = seq.logits.copy()
        logits[ban] = -np.inf
        return int(np.argmax(logits))
    token = pick()
    ttft = time.perf_counter() - t0
    generated = [token]
    t1 = time.perf_counter()
    for _ in range(tokens - 1):
        seq.append(token)
        token = pick()
        generated.append(token)
    return ttft, (tokens - 1) / (time.perf_counter() - t1), generated


# ---- the engine --------------------------------------------------------------------------------------
async def engine_run(engine: GenerationEngine, tokens: int) -> tuple[float, float, int, str]:
    request = GenerationRequest(prompt=PROMPT, system="", max_tokens=tokens, ignore_eos=True)
    async for item in engine.stream(request):
        if isinstance(item, Done):
            t = item.timings
            return t.time_to_first_token_s, t.tokens_per_second, t.generated_tokens, item.text
    raise RuntimeError("no Done")


# ---- (b) llama.cpp -----------------------------------------------------------------------------------
def llama_run(llm, prompt_text: str, tokens: int, eos: list[int]) -> tuple[float, float, int]:
    prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
    llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt, as the engine does
    t0 = time.perf_counter()
    llm.eval(prompt)
    logits = np.array(llm.scores[llm.n_tokens - 1], np.float32)
    logits[eos] = -np.inf
    token = int(np.argmax(logits))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(tokens - 1):
        llm.eval([token])
        logits = np.array(llm.scores[llm.n_tokens - 1], np.float32)
        logits[eos] = -np.inf
        token = int(np.argmax(logits))
    return ttft, (tokens - 1) / (time.perf_counter() - t1), len(prompt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="build/models/smollm2-135m-instruct")
    ap.add_argument("--variant", default=None, help="decoder variant (default: the engine's CPU choice)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("INCAR_THREADS", "0")) or 2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    bundle = load_bundle(args.bundle)
    model = LanguageModel(bundle, "cpu", variant=args.variant, threads=args.threads)
    eos = sorted(model.eos_token_ids)
    prompt_text = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    prompt_ids = model.tokenizer.encode(prompt_text)
    print(f"bundle {bundle.manifest['name']} variant {model.variant}, {args.threads} threads, prompt {len(prompt_ids)} tokens, "
          f"{args.tokens} generated (greedy, EOS banned), median of {args.repeats}")

    bare = BareLoop(bundle, model.variant, args.threads)
    bare_runs = [bare.run(prompt_ids, args.tokens, eos) for _ in range(args.repeats + 1)][1:]
    bare_ttft = statistics.median(r[0] for r in bare_runs)
    bare_tps = statistics.median(r[1] for r in bare_runs)

    gen_runs = [generator_loop(model, prompt_ids, args.tokens, eos) for _ in range(args.repeats + 1)][1:]
    gen_ttft = statistics.median(r[0] for r in gen_runs)
    gen_tps = statistics.median(r[1] for r in gen_runs)

    scheduler = NpuScheduler()
    engine = GenerationEngine(model, None, scheduler)

    async def engine_all():
        return [await engine_run(engine, args.tokens) for _ in range(args.repeats + 1)][1:]
    engine_runs = asyncio.run(engine_all())
    scheduler.close()
    eng_ttft = statistics.median(r[0] for r in engine_runs)
    eng_tps = statistics.median(r[1] for r in engine_runs)
    same_tokens = model.tokenizer.decode(bare_runs[0][2]) == engine_runs[0][3]
    overhead = 1 - eng_tps / bare_tps
    own_overhead = 1 - eng_tps / gen_tps
    print(f"engine      : TTFT {eng_ttft * 1e3:7.1f} ms  decode {eng_tps:7.1f} tok/s")
    print(f"bare loop   : TTFT {bare_ttft * 1e3:7.1f} ms  decode {bare_tps:7.1f} tok/s  -> engine overhead "
          f"{overhead * 100:+.1f} % (target <= 5 %); same text: {same_tokens}")
    print(f"generator   : TTFT {gen_ttft * 1e3:7.1f} ms  decode {gen_tps:7.1f} tok/s  -> the engine's own overhead "
          f"(scheduler, asyncio, sampling, detokenization) {own_overhead * 100:+.1f} %")

    result = {"bench": "decode", "bundle": bundle.manifest["name"], "variant": model.variant, "threads": args.threads,
              "prompt_tokens": len(prompt_ids), "generated_tokens": args.tokens,
              "engine_ttft_s": round(eng_ttft, 5), "engine_tokens_per_s": round(eng_tps, 2),
              "bare_ttft_s": round(bare_ttft, 5), "bare_tokens_per_s": round(bare_tps, 2),
              "engine_overhead_pct": round(overhead * 100, 2),
              "generator_tokens_per_s": round(gen_tps, 2), "generator_ttft_s": round(gen_ttft, 5),
              "engine_overhead_vs_generator_pct": round(own_overhead * 100, 2), "engine_matches_bare_text": same_tokens}
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        print(f"llama.cpp   : skipped: llama_cpp is not importable ({exc}). Build it from source with\n"
              f"  CMAKE_ARGS=\"{llama_cmake_args()}\" .venv/bin/pip install --no-binary llama-cpp-python "
              f"--no-cache-dir llama-cpp-python==0.3.36")
        result["llama_cpp"] = "skipped: not importable"
    else:
        gguf = bundle.manifest.get("source", {}).get("file", "")
        from service.modelbuild.gguf_llama import default_gguf
        gguf_path = default_gguf() if Path(gguf).name == default_gguf().name else Path(gguf)
        llm = Llama(model_path=str(gguf_path), n_threads=args.threads, n_threads_batch=args.threads,
                    n_ctx=int(bundle.manifest["text"]["context_length"]), n_batch=512, verbose=False)
        llama_runs = [llama_run(llm, prompt_text, args.tokens, eos) for _ in range(args.repeats + 1)][1:]
        ll_ttft = statistics.median(r[0] for r in llama_runs)
        ll_tps = statistics.median(r[1] for r in llama_runs)
        ratio = eng_tps / ll_tps
        print(f"llama.cpp   : TTFT {ll_ttft * 1e3:7.1f} ms  decode {ll_tps:7.1f} tok/s  ({gguf_path.name}, "
              f"prompt {llama_runs[0][2]} tokens) -> engine/llama.cpp decode {ratio:.2f}x (target >= 1.0x), "
              f"TTFT ratio llama.cpp/engine {ll_ttft / eng_ttft:.2f}x")
        result.update({"llama_cpp_ttft_s": round(ll_ttft, 5), "llama_cpp_tokens_per_s": round(ll_tps, 2),
                       "engine_vs_llama_cpp_decode": round(ratio, 3),
                       "llama_cpp_gguf": gguf_path.name, "llama_cpp_cmake_args": llama_cmake_args()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
