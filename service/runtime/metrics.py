"""Runtime metrics (vLLM-style names, `incar_` prefix, base units), on prometheus_client's default registry.

Latencies are histograms labelled by scheduler priority, so a dashboard can hold the safety path to
its budget apart from chat traffic.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Token-level latencies are short on the CPU path (ms) and long on the HTP emulator (s): wide buckets.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "incar_time_to_first_token_seconds", "Time from request admission to the first generated token",
    ["priority"], buckets=REQUEST_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "incar_inter_token_latency_seconds", "Time between consecutive generated tokens",
    ["priority"], buckets=TOKEN_BUCKETS)
VISION_ENCODE = Histogram(
    "incar_vision_encode_seconds", "Vision encoder run time per image (VLM bundles)",
    buckets=REQUEST_BUCKETS)
PREPROCESS = Histogram(
    "incar_preprocess_seconds", "Request preprocessing: image decode/resize, description, chat template, tokenization",
    ["priority"], buckets=REQUEST_BUCKETS)
QUEUE_TIME = Histogram(
    "incar_queue_time_seconds", "Time a request waited between admission and its first NPU step",
    ["priority"], buckets=REQUEST_BUCKETS)
REQUEST_DURATION = Histogram(
    "incar_request_duration_seconds", "End-to-end generation request time",
    ["priority"], buckets=REQUEST_BUCKETS)
PROMPT_TOKENS = Counter("incar_prompt_tokens_total", "Prompt tokens prefilled", ["priority"])
GENERATION_TOKENS = Counter("incar_generation_tokens_total", "Tokens generated", ["priority"])
REQUESTS = Counter(
    "incar_requests_total", "Generation requests by outcome",
    ["priority", "outcome"])  # outcome: stop | length | cancelled | deadline | rejected | error
REQUESTS_RUNNING = Gauge("incar_requests_running", "Requests holding a running slot on the NPU", ["priority"])
REQUESTS_WAITING = Gauge("incar_requests_waiting", "Requests admitted and waiting for their first NPU step",
                         ["priority"])
NPU_STEPS = Counter("incar_npu_steps_total",
                    "Steps (prefill chunks, decode steps, encoder runs) run on the NPU executor",
                    ["priority", "kind"])
NPU_BUSY = Counter("incar_npu_busy_seconds_total", "Time the NPU executor spent running steps", ["priority"])
PROMPT_CACHE = Counter("incar_prompt_cache_lookups_total",
                       "System-prompt decoder states looked up per request (hit: restored, miss: prefilled)",
                       ["result"])
PROMPT_CACHE_BYTES = Gauge("incar_prompt_cache_bytes", "Memory held by cached system-prompt decoder states")
CONVERSATIONS = Gauge("incar_conversations", "Assistant conversations open")
CONVERSATION_STATE_BYTES = Gauge("incar_conversation_state_bytes", "Memory held by conversations' decoder states")
CONVERSATION_REPREFILLS = Counter(
    "incar_conversation_reprefills_total",
    "Turns whose history was prefilled again, by why (evicted: its state was dropped for memory; "
    "truncated: old turns dropped to fit the context; unsupported: the bundle cannot restore state)", ["reason"])
