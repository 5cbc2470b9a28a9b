"""The model host: loads the bundle on the configured backend (falling back where configuration allows),
owns the one NPU scheduler and the generation engine, exposes the power governor's HTP knob, and swaps in a new
bundle while the old one keeps answering.

Loading runs in a thread so the server answers health (NOT_SERVING, "loading ...") meanwhile. Every bundle's
manifest is checked against its signature before it is parsed (service/security/signing.py); a refused bundle
is never loaded, and no other backend is tried for it (the bundle is the problem, not the backend).

A swap opens the new bundle beside the running one (same scheduler, so both share the one NPU queue), asks it a
short question, then switches in one assignment on the event loop. Requests already streaming hold their engine
and finish on the old one; it is freed when the last of them lets go. Health never leaves SERVING.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from service.runtime.backends import QNN_BACKENDS, BackendError, set_performance_mode
from service.runtime.bundle import BundleError, load_bundle
from service.runtime.engine import DescribeImages, GenerationEngine
from service.runtime.generator import LanguageModel
from service.runtime.scheduler import NpuScheduler
from service.security.signing import BundleVerifier, SignatureError, Verdict

log = structlog.get_logger(__name__)

StatusCallback = Callable[[bool, str], Awaitable[None]]
SwitchListener = Callable[[GenerationEngine], None]
SMOKE_PROMPT = "Reply with one word: ready?"


@dataclass
class LoadResult:
    engine: GenerationEngine | None
    backend: str
    reason: str          # "" when serving on the configured backend


@dataclass
class SwapResult:
    engine: GenerationEngine
    previous: str
    verdict: Verdict
    load_seconds: float
    check_answer: str


class SwapError(RuntimeError):
    """The new bundle was not switched in; the old one still serves. `kind`: "invalid", "refused", "busy",
    "not_ready" (the service maps them to gRPC codes)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ModelHost:
    def __init__(self, runtime_config, *, describe_images: DescribeImages | None = None,
                 verifier: BundleVerifier | None = None, on_busy: Callable[[str, float], None] | None = None):
        self.config = runtime_config
        # Every scheduler step's seconds go to `on_busy(component, seconds)` (the energy model): "npu" on a QNN
        # backend, "cpu" where the CPU EP does the work (the backend actually loaded, fallback included).
        self.scheduler = NpuScheduler(runtime_config.scheduler, on_busy=None if on_busy is None else (
            lambda seconds: on_busy("npu" if (self.backend or self.config.backend) in QNN_BACKENDS else "cpu",
                                    seconds)))
        self.describe_images = describe_images
        # Without a verifier (tools, tests that build a host directly) unsigned bundles load, as the defaults say.
        self.verifier = verifier or BundleVerifier(allow_unsigned=True)
        self.engine: GenerationEngine | None = None
        self.model: LanguageModel | None = None
        self.backend = ""
        self.bundle_path = Path(runtime_config.bundle)
        self.verdict: Verdict | None = None
        self.performance_mode = ""
        self._listeners: list[SwitchListener] = []
        self._on_status: StatusCallback | None = None
        self._swap_lock = asyncio.Lock()

    def on_switch(self, listener: SwitchListener) -> None:
        """Called with the new engine after a swap (the Assistant and the narrator switch with it)."""
        self._listeners.append(listener)

    def _open(self, backend: str, path: Path | None = None) -> tuple[GenerationEngine, LanguageModel, Verdict]:
        path = Path(path or self.config.bundle)
        verdicts: list[Verdict] = []
        bundle = load_bundle(path, check_manifest=lambda p, raw: verdicts.append(self.verifier.verify(p, raw)))
        model = LanguageModel(bundle, backend=backend, variant=self.config.variant or None,
                              threads=self.config.threads or None)
        vision = None
        if "vision" in bundle.manifest.get("components", {}):
            from service.runtime.vision import VisionEncoder
            vision = VisionEncoder(bundle, backend=backend, threads=self.config.threads or None)
        engine = GenerationEngine(model, vision, self.scheduler, config=self.config.engine,
                                  describe_images=self.describe_images)
        return engine, model, verdicts[0]

    def _adopt(self, opened: tuple[GenerationEngine, LanguageModel, Verdict], backend: str, path: Path) -> None:
        self.engine, self.model, self.verdict = opened
        self.backend, self.bundle_path = backend, path
        if self.performance_mode:
            self.set_htp_performance_mode(self.performance_mode)

    async def load(self, on_status: StatusCallback) -> LoadResult:
        """Open the configured backend; on failure, the fallback backend; report each step through `on_status`."""
        self._on_status = on_status
        backend = self.config.backend
        path = Path(self.config.bundle)
        await on_status(False, f"loading model {path.name} on {backend}")
        started = time.monotonic()
        try:
            opened = await asyncio.to_thread(self._open, backend)
            reason = ""
        except SignatureError as exc:
            reason = f"model not loaded: bundle refused: {exc}"
            log.error("model.bundle_refused", bundle=str(path), error=str(exc))
            await on_status(False, reason)
            return LoadResult(None, backend, reason)
        except (BackendError, BundleError, OSError) as exc:
            fallback = self.config.fallback_backend
            if not fallback or fallback == backend:
                reason = f"model not loaded: {exc}"
                log.error("model.load_failed", backend=backend, error=str(exc))
                await on_status(False, reason)
                return LoadResult(None, backend, reason)
            log.warning("model.backend_failed", backend=backend, fallback=fallback, error=str(exc))
            await on_status(False, f"{backend} failed ({exc}); loading on {fallback}")
            try:
                opened = await asyncio.to_thread(self._open, fallback)
            except (BackendError, BundleError, OSError, SignatureError) as exc2:
                reason = f"model not loaded: {backend}: {exc}; {fallback}: {exc2}"
                await on_status(False, reason)
                return LoadResult(None, fallback, reason)
            backend, reason = fallback, f"degraded: {self.config.backend} failed ({exc}); serving on {fallback}"
        self._adopt(opened, backend, path)
        log.info("model.ready", backend=backend, seconds=round(time.monotonic() - started, 2),
                 model=self.engine.name, signature=self.verdict.note)
        # Degraded but serving: health says SERVING, the System service carries the reason.
        await on_status(True, reason)
        return LoadResult(self.engine, backend, reason)

    async def swap(self, bundle: str | Path, *, backend: str = "") -> SwapResult:
        """Load `bundle` beside the running one, check it, switch. Raises SwapError; the old one then serves on."""
        path = Path(bundle)
        try:
            is_bundle = (path / "manifest.json").is_file()
        except (OSError, ValueError):    # a NUL byte, a name too long for the file system
            is_bundle = False
        if not is_bundle:
            raise SwapError("invalid", f"bundle_path: {path} is not a bundle (no manifest.json)")
        if self.engine is None:
            raise SwapError("not_ready", "no model is serving yet; a swap replaces a running one")
        if self._swap_lock.locked():
            raise SwapError("busy", "another swap is in progress")
        async with self._swap_lock:
            backend = backend or self.backend
            started = time.monotonic()
            try:
                opened = await asyncio.to_thread(self._open, backend, path)
            except SignatureError as exc:
                await self._report(f"swap to {path.name} refused: {exc}")
                raise SwapError("refused", f"bundle refused: {exc}") from None
            except (BackendError, BundleError, OSError) as exc:
                await self._report(f"swap to {path.name} failed: {exc}")
                raise SwapError("refused", f"bundle did not load on {backend}: {exc}") from None
            load_seconds = time.monotonic() - started
            engine = opened[0]
            try:
                answer = await engine.complete(SMOKE_PROMPT, priority="interactive", max_tokens=4)
            except Exception as exc:    # whatever the new model does wrong, the old one keeps serving
                await self._report(f"swap to {path.name} failed its check: {exc}")
                raise SwapError("refused", f"the new bundle failed its check question: {exc}") from None
            previous = self.engine.name
            self._adopt(opened, backend, path)     # one assignment on the loop: requests after this get it
            for listener in self._listeners:
                listener(engine)
            await self._report("")
            log.info("model.swapped", previous=previous, model=engine.name, bundle=str(path), backend=backend,
                     load_s=round(load_seconds, 2), signature=self.verdict.note)
            return SwapResult(engine, previous, self.verdict, load_seconds, answer)

    async def _report(self, note: str) -> None:
        if self._on_status is not None and self.engine is not None:
            await self._on_status(True, note)      # still SERVING: the reason says what happened

    def set_htp_performance_mode(self, mode: str) -> None:
        """The power governor's knob; a no-op off the NPU (the energy model still records the mode)."""
        self.performance_mode = mode
        if self.model is None or self.backend not in QNN_BACKENDS:
            return
        for session in self.model.sessions():
            set_performance_mode(session, mode)

    def close(self) -> None:
        self.scheduler.close()
