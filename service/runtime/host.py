"""The model host: loads the bundle on the configured backend (falling back where configuration allows),
owns the one NPU scheduler and the generation engine, and exposes the power governor's HTP knob.

Loading runs in a thread so the server answers health (NOT_SERVING, "loading ...") meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from service.runtime import qnn_context
from service.runtime.backends import QNN_BACKENDS, BackendError, set_performance_mode
from service.runtime.bundle import BundleError, load_bundle
from service.runtime.engine import DescribeImages, GenerationEngine
from service.runtime.generator import LanguageModel
from service.runtime.scheduler import NpuScheduler

log = structlog.get_logger(__name__)

StatusCallback = Callable[[bool, str], Awaitable[None]]


@dataclass
class LoadResult:
    engine: GenerationEngine | None
    backend: str
    reason: str          # "" when serving on the configured backend


class ModelHost:
    def __init__(self, runtime_config, *, describe_images: DescribeImages | None = None):
        self.config = runtime_config
        self.scheduler = NpuScheduler(runtime_config.scheduler)
        self.describe_images = describe_images
        self.engine: GenerationEngine | None = None
        self.model: LanguageModel | None = None
        self.backend = ""
        self.performance_mode = ""

    def _open(self, backend: str) -> GenerationEngine:
        bundle = load_bundle(Path(self.config.bundle))
        target = qnn_context.current().target   # the context binaries this machine's SoC runs
        model = LanguageModel(bundle, backend=backend, variant=self.config.variant or None,
                              threads=self.config.threads or None, target=target)
        vision = None
        if "vision" in bundle.manifest.get("components", {}):
            from service.runtime.vision import VisionEncoder
            vision = VisionEncoder(bundle, backend=backend, threads=self.config.threads or None, target=target)
        self.model = model
        return GenerationEngine(model, vision, self.scheduler, config=self.config.engine,
                                describe_images=self.describe_images)

    async def load(self, on_status: StatusCallback) -> LoadResult:
        """Open the configured backend; on failure, the fallback backend; report each step through `on_status`."""
        backend = self.config.backend
        await on_status(False, f"loading model {Path(self.config.bundle).name} on {backend}")
        started = time.monotonic()
        try:
            self.engine = await asyncio.to_thread(self._open, backend)
            reason = ""
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
                self.engine = await asyncio.to_thread(self._open, fallback)
            except (BackendError, BundleError, OSError) as exc2:
                reason = f"model not loaded: {backend}: {exc}; {fallback}: {exc2}"
                await on_status(False, reason)
                return LoadResult(None, fallback, reason)
            backend, reason = fallback, f"degraded: {self.config.backend} failed ({exc}); serving on {fallback}"
        self.backend = backend
        log.info("model.ready", backend=backend, seconds=round(time.monotonic() - started, 2),
                 model=self.engine.name)
        # Degraded but serving: health says SERVING, the System service carries the reason.
        await on_status(True, reason)
        return LoadResult(self.engine, backend, reason)

    def set_htp_performance_mode(self, mode: str) -> None:
        """The power governor's knob; a no-op off the NPU (the energy model still records the mode)."""
        self.performance_mode = mode
        if self.model is None or self.backend not in QNN_BACKENDS:
            return
        for session in self.model.sessions():
            set_performance_mode(session, mode)

    def close(self) -> None:
        self.scheduler.close()
