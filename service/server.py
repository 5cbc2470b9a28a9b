"""The incar gRPC server (grpc.aio): health per service, reflection, interceptors, graceful shutdown.

`Application` wires the parts in the one direction data flows: cameras and vehicle state in, perception and
the model, skills, events out. `incar serve` runs it until SIGTERM/SIGINT, then drains streams and stops.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from incar.v1 import assistant_pb2_grpc, common_pb2, events_pb2, system_pb2, system_pb2_grpc, vehicle_pb2
from service import __version__
from service.actions.escalator import Escalator
from service.actions.queue import ActionQueue
from service.actions.servicer import add_to_server as add_actions_service
from service.cameras.hub import CameraHub
from service.cameras.servicer import add_to_server as add_cameras_service
from service.config import Config, ConfigError, add_config_arguments, config_from_args
from service.perception.cascade import Cascade
from service.liveview import LiveView
from service.liveview import add_to_server as add_liveview_service
from service.mqtt.link import MqttLink
from service.pipeline import AnalysisPipeline
from service.power.manager import PowerManager
from service.power.sources import record_busy
from service.runtime import qnn_context
from service.caller_role import role_resolver
from service.runtime.assistant import AssistantService
from service.runtime.conversations import ConversationStore
from service.runtime.host import ModelHost
from service.runtime.models_service import add_to_server as add_models_service
from service.security.signing import verifier_from
from service.security import integration as security
from skills.base import SkillContext, SwitchableNarrator
from skills.services import SkillHost, skills_data_dir
from skills.greeter import cascade_liveness
from skills.hmi_screen import ScreenReader
from skills.stages import CameraStages
from skills.tools import SkillTools
from service.events_service import EventsServicer
from service.store.db import Database
from service.store.events import EventLog
from service.telemetry.interceptors import TelemetryInterceptor
from service.transport import server_options as transport_options
from service.telemetry.logging import configure_logging
from service.telemetry.metrics import BUILD_INFO, SERVICE_UP, start_metrics_server
from service.vehicle import VehicleServicer, VehicleStateStore, vehicle_mode

log = structlog.get_logger(__name__)

SYSTEM = "incar.v1.System"
ASSISTANT = "incar.v1.Assistant"
NOMINAL_ANALYSIS_FPS = 10.0   # per camera, before the governor scales it down (safe-exit needs ~10 fps)


class HealthBoard:
    """gRPC health per service plus the reason behind each status (served by incar.v1.System)."""

    def __init__(self):
        self.servicer = health.aio.HealthServicer()
        self.status: dict[str, tuple[bool, str]] = {}

    async def set(self, service: str, serving: bool, reason: str = "") -> None:
        previous = self.status.get(service)
        self.status[service] = (serving, reason)
        await self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING if serving
                                else health_pb2.HealthCheckResponse.NOT_SERVING)
        SERVICE_UP.labels(service or "overall").set(1 if serving else 0)
        if previous != (serving, reason):
            log.info("health", service=service or "overall", serving=serving, reason=reason or None)

    async def refresh_overall(self) -> None:
        named = {k: v for k, v in self.status.items() if k}
        down = [f"{k}: {v[1]}" for k, v in named.items() if not v[0]]
        await self.set("", not down, "; ".join(down))

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


class SystemServicer(system_pb2_grpc.SystemServicer):
    def __init__(self, app: Application):
        self.app = app

    async def GetStatus(self, request, context):
        return system_pb2.SystemStatus(
            components=[system_pb2.ComponentStatus(name=name, serving=s, reason=r)
                        for name, (s, r) in sorted(self.app.health.status.items()) if name],
            version=__version__, model=self.app.model_name, backend=self.app.backend_name,
            vehicle_mode=self.app.vehicle_mode())


class Application:
    def __init__(self, config: Config):
        self.config = config
        self.health = HealthBoard()
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self.metrics_port: int = 0
        self.model_name = ""
        self.backend_name = ""
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()

        data_dir = Path(config.server.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        # The machine's QNN context-binary target and compile cache, before any session opens.
        qnn_context.configure(config.runtime.qnn_target, config.runtime.qnn_cache_dir or data_dir / "qnn-cache")
        self.db = Database(data_dir / "incar.db")
        self.events = EventLog(self.db)
        self.vehicle = VehicleStateStore(self.db, events=self.events)   # state + its events: one commit
        self.actions = ActionQueue(self.db, config.actions)
        self.escalator = Escalator(self.actions, self.events)
        self.cameras = CameraHub(config.cameras)
        self.cameras.on_camera_state(self._camera_events)
        # frames -> perception -> skills; the model words what skills decide and answers the HMI
        self.cascade = Cascade(config.perception)
        self.pipeline = AnalysisPipeline(self.cameras, self.cascade)
        self.liveview = LiveView(self.cameras, config.cameras.watchdog_timeout_seconds)
        self.models = ModelHost(config.runtime, describe_images=self.pipeline.describe_images,
                                verifier=verifier_from(security.security_of(config)), on_busy=record_busy)
        self.cascade.use_scheduler(self.models.scheduler)   # one NPU: detectors and the model share it
        self.models.on_switch(self._engine_swapped)
        self.power = PowerManager(config.power, config.runtime.backend, mode_provider=self.vehicle_mode,
                                  set_analysis_rate=self.cameras.set_analysis_rate,
                                  set_cascade_depth=self.cascade.set_camera_depth,
                                  set_htp_performance_mode=self.models.set_htp_performance_mode)
        self.narrator = SwitchableNarrator()
        self.skills = SkillHost(
            SkillContext(db=self.db, events=self.events, narrator=self.narrator, frames=self.cameras,
                         data_dir=skills_data_dir(config.skills, config.server.data_dir),
                         latency_observer=self.power.observe_latency,
                         latency_budget=self.power.budgets.latency_budget, actions=self.actions),
            config.skills, face_embedder=self.pipeline.embed_faces, read_signs=self.pipeline.read_signs)
        # Skills' extra stages (Greeter: faces on the side cameras on approach; Sentinel: pose while armed).
        stages = CameraStages(self.cascade)
        # The safety lane: frames Safety needs now are analysed first, without the slow stages no skill asked for.
        self.pipeline.route(
            lane_of=lambda f: "safety" if self.skills.safety.needs_camera(f.role, f.position) else "general",
            requested_stages=stages.requested)
        self.skills.greeter.connect_perception(
            liveness=cascade_liveness(config.perception.models_dir or None, config.perception.backend),
            face_stages=stages.switch("greeter", ("faces", "identity")))
        self.skills.sentinel.connect_perception(pose_stages=stages.switch("sentinel", ("pose",)))
        self.assistant = AssistantService(None, frames_for=self._frames_for, config=config.runtime.assistant,
                                          tools=SkillTools(self.skills), role_of=role_resolver(config),
                                          answer_screen=ScreenReader(self.pipeline.read_signs),
                                          conversations=ConversationStore(config.runtime.conversations))
        self.mqtt = MqttLink(config.mqtt, self.db, self.events, self.actions, data_dir=data_dir,
                             tokens=security.security_of(config).load_tokens(), state=self._mqtt_state,
                             set_sentinel_armed=self._set_sentinel_armed)

    def _mqtt_state(self) -> dict:
        sentinel = self.skills.sentinel
        return {"vehicle_mode": self.vehicle_mode(), "locked": self.vehicle.current.locked,
                "sentinel_armed": sentinel.armed, "sentinel_reason": sentinel.reason}

    async def _set_sentinel_armed(self, armed: bool) -> dict:
        async with self.skills._order:     # the order lock the Sentinel gRPC service takes too
            status = self.skills.sentinel.arm() if armed else self.skills.sentinel.disarm()
        return {"armed": status.armed, "reason": status.reason}

    def vehicle_mode(self) -> str:
        """The mode the power budgets follow: the vehicle's state and whether Sentinel is armed. Composed here,
        where both are known, and injected into the power manager and the vehicle service: neither knows skills."""
        return vehicle_mode(self.vehicle.current, sentry_armed=self.skills.sentinel.armed)

    def _frames_for(self, camera_ids):
        frames = []
        for camera_id in camera_ids:
            if camera_id not in self.cameras.camera_ids():
                raise KeyError(camera_id)
            frame = self.cameras.latest(camera_id)
            if frame is None:
                raise LookupError(f"camera {camera_id!r} has no frame yet")
            age = time.time() - frame.capture_time
            if age > self.config.cameras.watchdog_timeout_seconds:    # never shown as the current view
                raise LookupError(f"camera {camera_id!r} is down: its latest frame is {age:.0f} s old (watchdog "
                                  f"{self.config.cameras.watchdog_timeout_seconds:g} s)")
            frames.append(frame.original)
        return frames

    def _camera_events(self, camera_id: str, up: bool, reason: str) -> None:
        if up and camera_id not in self.power.governor.cameras:
            status = self.cameras.camera_status(camera_id)
            # Exterior cameras watch for Sentinel and safe-exit; the cabin camera for Safety (child presence).
            purposes = (("sentinel", "safety") if status.role == common_pb2.CAMERA_ROLE_EXTERIOR
                        else ("safety", "child_presence"))
            self.power.governor.add_camera(camera_id, nominal_fps=NOMINAL_ANALYSIS_FPS, purposes=purposes)
        if up:
            self.events.append("camera.up", "system", common_pb2.SEVERITY_INFO, f"Camera {camera_id} is up",
                               camera_id=camera_id)
        else:
            self.events.append("camera.down", "system", common_pb2.SEVERITY_WARNING,
                               f"Camera {camera_id} is down: {reason}", camera_id=camera_id)

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # Telemetry first, so refused calls (UNAUTHENTICATED, PERMISSION_DENIED) are counted and logged too.
        return [TelemetryInterceptor(), *security.interceptors(self.config)]

    async def start(self) -> int:
        cfg = self.config.server
        security.check(self.config)
        self.db.migrate()
        self.mqtt.prepare()
        self.vehicle.load()
        await self.skills.start(self.vehicle.current)
        self.vehicle.add_listener(self.skills.vehicle_listener)
        self.server = grpc.aio.server(
            interceptors=self._interceptors(),
            options=[("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_receive_message_bytes),
                     ("grpc.so_reuseport", 0), *transport_options(self.config.transport)])
        services = self._register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable_server_reflection(services + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = security.add_port(self.config, self.server)
        if not self.port:
            raise RuntimeError(f"server.listen: cannot bind {cfg.listen}")
        for name in services:
            await self.health.set(name, False, "starting")
        await self.server.start()
        await self.cameras.start()
        self.metrics_port = start_metrics_server(cfg.metrics_listen)
        await self._became_ready()
        self._tasks += [asyncio.create_task(self.skills.consume(self.liveview.tap(self.pipeline.analyses())),
                                            name="analysis"),
                        asyncio.create_task(self.power.run(), name="power"),
                        asyncio.create_task(self.escalator.run(), name="actions-escalator"),
                        *self.mqtt.tasks(),
                        asyncio.create_task(self._load_model(), name="model-load")]
        log.info("serving", listen=cfg.listen, port=self.port, metrics_port=self.metrics_port, version=__version__)
        return self.port

    def _register(self, server: grpc.aio.Server) -> list[str]:
        from incar.v1 import events_pb2_grpc, vehicle_pb2_grpc
        events_pb2_grpc.add_EventsServicer_to_server(EventsServicer(self.events), server)
        vehicle_pb2_grpc.add_VehicleServicer_to_server(VehicleServicer(self.vehicle, self.vehicle_mode), server)
        system_pb2_grpc.add_SystemServicer_to_server(SystemServicer(self), server)
        return [events_pb2.DESCRIPTOR.services_by_name["Events"].full_name,
                vehicle_pb2.DESCRIPTOR.services_by_name["Vehicle"].full_name,
                SYSTEM,
                add_cameras_service(self.cameras, server),
                add_liveview_service(self.liveview, server),
                add_assistant_service(self.assistant, server),
                add_models_service(self.models, server),
                add_actions_service(self.actions, server),
                *self.skills.register(server)]

    async def _became_ready(self) -> None:
        for name in list(self.health.status):
            if name and name != ASSISTANT:
                await self.health.set(name, True)
        await self.health.refresh_overall()

    async def _load_model(self) -> None:
        async def on_status(serving: bool, reason: str) -> None:
            await self.health.set(ASSISTANT, serving, reason)
            await self.health.refresh_overall()
            if not serving:
                self.assistant.set_engine(None, reason or "the language model is loading")

        result = await self.models.load(on_status)
        self.backend_name = result.backend
        if result.engine is not None:
            self.model_name = result.engine.name
            self.assistant.set_engine(result.engine)
            self.narrator.use(result.engine)
            BUILD_INFO.labels(__version__, self.model_name, self.backend_name).set(1)

    def _engine_swapped(self, engine) -> None:
        self.model_name, self.backend_name = engine.name, engine.backend
        self.assistant.set_engine(engine)
        self.narrator.use(engine)
        BUILD_INFO.labels(__version__, self.model_name, self.backend_name).set(1)

    async def ready(self) -> None:
        """Wait until model loading has finished (serving, degraded, or failed with a reason)."""
        for task in self._tasks:
            if task.get_name() == "model-load":
                await asyncio.shield(task)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health says NOT_SERVING, new RPCs are refused, streams get `grace` seconds to finish."""
        grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        log.info("shutting_down", grace_s=grace)
        await self.health.shutdown()
        await self.mqtt.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace)
        await self.skills.stop()
        await self.cameras.stop()
        self.models.close()
        self.mqtt.stop_broker()
        self.db.close()
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()


async def _serve(config: Config) -> int:
    app = Application(config)
    try:
        await app.start()
    except ConfigError as exc:
        print(f"incar: configuration error: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    return 0


def add_assistant_service(servicer: AssistantService, server: grpc.aio.Server) -> str:
    assistant_pb2_grpc.add_AssistantServicer_to_server(servicer, server)
    return ASSISTANT


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar serve", description="Run the incar gRPC service")
    add_config_arguments(parser)
    parser.add_argument("--listen", help="host:port for gRPC (same as --set server.listen=...)")
    parser.add_argument("--data-dir", help="data directory (same as --set server.data_dir=...)")
    args = parser.parse_args(argv)
    if args.listen:
        args.set.append(f"server.listen={args.listen}")
    if args.data_dir:
        args.set.append(f"server.data_dir={args.data_dir}")
    config = config_from_args(args)
    configure_logging(config.server.log_level, config.server.log_format)
    return asyncio.run(_serve(config))


main = serve_main
