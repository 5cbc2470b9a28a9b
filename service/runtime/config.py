"""The `runtime` section: which bundle, on which backend, and the engine, scheduler and Assistant settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from service.runtime.assistant import AssistantConfig
from service.runtime.backends import BACKENDS
from service.runtime.conversations import ConversationConfig
from service.runtime.engine import EngineConfig
from service.runtime.qnn_context import check_target
from service.runtime.scheduler import SchedulerConfig


@dataclass
class RuntimeConfig:
    bundle: str = "build/models/smollm2-135m-instruct"
    backend: str = "cpu"                # cpu | qnn-htp | qnn-emulator
    fallback_backend: str = "cpu"       # "" disables falling back when the backend fails to load
    variant: str = ""                   # "" picks the best variant the backend can run
    threads: int = 0                    # 0: all cores
    # QNN context-binary target (service.runtime.qnn_context.TARGETS); "" = the SoC's own (SA8295P ->
    # sa8295p-v68; `emulator` on an x86 host). The bundle's context binaries for it load without a compile.
    qnn_target: str = ""
    qnn_cache_dir: str = ""             # compiled contexts; "" = <server.data_dir>/qnn-cache
    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    conversations: ConversationConfig = field(default_factory=ConversationConfig)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.fallback_backend not in BACKENDS + ("",):
            raise ValueError(f"fallback_backend: expected one of {', '.join(BACKENDS)} or '', "
                             f"got {self.fallback_backend!r}")
        if self.threads < 0:
            raise ValueError("threads: must be >= 0")
        if self.qnn_target:
            try:
                check_target(self.qnn_target)
            except ValueError as exc:
                raise ValueError(f"qnn_target: {exc}") from None
        for name in ("engine", "scheduler", "assistant", "conversations"):
            try:
                getattr(self, name).validate()
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None
