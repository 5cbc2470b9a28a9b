"""Vehicle state: the latest snapshot from the vehicle gateway, validated, persisted, and fanned out to listeners."""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import grpc
import structlog

from incar.v1 import common_pb2, vehicle_pb2, vehicle_pb2_grpc
from service.store.db import Database, StoreUnavailableError
from service.store.events import EventLog

log = structlog.get_logger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE vehicle_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        time REAL NOT NULL,
        state BLOB NOT NULL
    );
    """,
]

MOVING_KMH = 3.0   # below this the car counts as standing (safe-exit warnings apply)


def is_moving(state: vehicle_pb2.VehicleState) -> bool:
    return state.gear in (vehicle_pb2.GEAR_DRIVE, vehicle_pb2.GEAR_REVERSE) or state.speed_kmh >= MOVING_KMH


def vehicle_mode(state: vehicle_pb2.VehicleState, sentry_armed: bool = False) -> str:
    """The mode the power budgets are set for: driving, parked_awake, sentry or off."""
    if is_moving(state):
        return "driving"
    if state.ignition in (vehicle_pb2.IGNITION_ON, vehicle_pb2.IGNITION_ACCESSORY):
        return "parked_awake"
    if state.locked and sentry_armed:
        return "sentry"
    return "off"


def validate_state(state: vehicle_pb2.VehicleState) -> None:
    """Raise ValueError naming the field when a snapshot cannot be right."""
    for name, enum in (("gear", vehicle_pb2.Gear), ("ignition", vehicle_pb2.Ignition)):
        if getattr(state, name) not in enum.values():
            raise ValueError(f"{name}: unknown value {getattr(state, name)}")
    if not math.isfinite(state.speed_kmh) or not 0 <= state.speed_kmh <= 400:
        raise ValueError(f"speed_kmh: expected 0..400, got {state.speed_kmh}")
    if not math.isfinite(state.battery_percent) or not 0 <= state.battery_percent <= 100:
        raise ValueError(f"battery_percent: expected 0..100, got {state.battery_percent}")
    if state.gps_valid:
        gps = state.gps
        if not (math.isfinite(gps.latitude_deg) and -90 <= gps.latitude_deg <= 90):
            raise ValueError(f"gps.latitude_deg: expected -90..90, got {gps.latitude_deg}")
        if not (math.isfinite(gps.longitude_deg) and -180 <= gps.longitude_deg <= 180):
            raise ValueError(f"gps.longitude_deg: expected -180..180, got {gps.longitude_deg}")
        if not math.isfinite(gps.altitude_m) or not math.isfinite(gps.accuracy_m) or gps.accuracy_m < 0:
            raise ValueError("gps: altitude_m and accuracy_m must be finite, accuracy_m >= 0")
    seen = set()
    for i, door in enumerate(state.doors):
        if door.door not in vehicle_pb2.DoorId.values() or door.door == vehicle_pb2.DOOR_ID_UNSPECIFIED:
            raise ValueError(f"doors[{i}].door: unknown door {door.door}")
        if door.door in seen:
            raise ValueError(f"doors[{i}].door: {vehicle_pb2.DoorId.Name(door.door)} listed twice")
        seen.add(door.door)
    for i, seat in enumerate(state.seats):
        if seat.seat not in vehicle_pb2.SeatId.values() or seat.seat == vehicle_pb2.SEAT_ID_UNSPECIFIED:
            raise ValueError(f"seats[{i}].seat: unknown seat {seat.seat}")
        if seat.occupancy not in vehicle_pb2.Occupancy.values():
            raise ValueError(f"seats[{i}].occupancy: unknown value {seat.occupancy}")
    if len(state.key_fob_id) > 128:
        raise ValueError("key_fob_id: longer than 128 characters")
    intrusion = state.intrusion
    if not math.isfinite(intrusion.shock_g) or not 0 <= intrusion.shock_g <= 100:
        raise ValueError(f"intrusion.shock_g: expected 0..100, got {intrusion.shock_g}")
    if not math.isfinite(intrusion.tilt_deg) or not 0 <= intrusion.tilt_deg <= 90:
        raise ValueError(f"intrusion.tilt_deg: expected 0..90, got {intrusion.tilt_deg}")
    for i, door in enumerate(intrusion.forced_doors):
        if door not in vehicle_pb2.DoorId.values() or door == vehicle_pb2.DOOR_ID_UNSPECIFIED:
            raise ValueError(f"intrusion.forced_doors[{i}]: unknown door {door}")


Listener = Callable[[vehicle_pb2.VehicleState, vehicle_pb2.VehicleState], None]

_UPSERT = ("INSERT INTO vehicle_state(id, time, state) VALUES(1, ?, ?) "
           "ON CONFLICT(id) DO UPDATE SET time=excluded.time, state=excluded.state")
COMMIT_TAG = "vehicle_state"   # the event log's group-commit tag (crash tests kill right after it commits)


class VehicleStateStore:
    """Holds the latest snapshot; survives restarts; calls listeners with (previous, current).

    With an event log, a snapshot and the transition events it causes (locked, parked, door opened, ...) are
    committed in one transaction: a crash can lose both, never one, so a gateway retrying an unacknowledged
    update still gets its events."""

    def __init__(self, db: Database, clock=time.time, events: EventLog | None = None):
        self.db = db
        self.clock = clock
        self.events = events
        db.register_migrations("vehicle", MIGRATIONS)
        self._lock = threading.Lock()
        self._state: vehicle_pb2.VehicleState | None = None       # committed
        self._submitted: vehicle_pb2.VehicleState | None = None   # newest queued for commit
        self._listeners: list[Listener] = []

    def load(self) -> None:
        row = self.db.connect().execute("SELECT state FROM vehicle_state WHERE id=1").fetchone()
        if row:
            self._state = self._submitted = vehicle_pb2.VehicleState.FromString(row["state"])

    @property
    def current(self) -> vehicle_pb2.VehicleState:
        with self._lock:
            return vehicle_pb2.VehicleState() if self._state is None else vehicle_pb2.VehicleState.FromString(
                self._state.SerializeToString())

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def update(self, state: vehicle_pb2.VehicleState) -> vehicle_pb2.VehicleState:
        """Store a snapshot (blocking until committed); raises ValueError naming a bad field, or StoreError."""
        previous, committed = self._submit(state)
        if committed is not None:
            self._wait(committed.result)
        self._apply(previous, state)
        return state

    async def update_async(self, state: vehicle_pb2.VehicleState) -> vehicle_pb2.VehicleState:
        """As update(), without blocking the event loop on the disk."""
        previous, committed = self._submit(state)
        if committed is not None:
            await self._wait_async(committed)
        self._apply(previous, state)
        return state

    def _submit(self, state: vehicle_pb2.VehicleState) -> tuple[vehicle_pb2.VehicleState, Future | None]:
        validate_state(state)
        if not state.HasField("time"):
            state.time.FromNanoseconds(int(self.clock() * 1e9))
        statement = (_UPSERT, (self.clock(), state.SerializeToString()))
        with self._lock:
            previous = self._submitted or vehicle_pb2.VehicleState()
            if self.events is None:
                with self.db.transaction() as tx:
                    tx.execute(*statement)
                self._submitted = state
                return previous, None
            events = [self.events.new_event(kind, "system", common_pb2.SEVERITY_INFO, message)
                      for kind, message in transitions(previous, state)]
            committed = self.events.commit([statement], events, tag=COMMIT_TAG)
            self._submitted = state
        return previous, committed

    def _wait(self, result) -> None:
        try:
            result()
        except Exception:
            self._forget_queued()
            raise

    async def _wait_async(self, committed: Future) -> None:
        try:
            await asyncio.wrap_future(committed)
        except Exception:
            self._forget_queued()
            raise

    def _forget_queued(self) -> None:
        # Updates queued after the refused one were compared with it; compare what comes next with what is stored.
        with self._lock:
            self._submitted = self._state

    def _apply(self, previous: vehicle_pb2.VehicleState, state: vehicle_pb2.VehicleState) -> None:
        with self._lock:
            self._state = state
        for listener in self._listeners:
            try:
                listener(previous, state)
            except Exception:
                log.exception("vehicle.listener_failed", listener=getattr(listener, "__qualname__", repr(listener)))


class VehicleServicer(vehicle_pb2_grpc.VehicleServicer):
    def __init__(self, store: VehicleStateStore, mode_provider: Callable[[], str]):
        self.store = store
        self.mode_provider = mode_provider   # the vehicle mode as the service composes it (state + Sentinel)

    async def UpdateState(self, request, context):
        try:
            await self.store.update_async(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"vehicle state: {exc}")
        except StoreUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"vehicle state not stored: {exc}")
        return vehicle_pb2.UpdateStateResponse(vehicle_mode=self.mode_provider())

    async def GetState(self, request, context):
        return self.store.current


def transitions(previous: vehicle_pb2.VehicleState, current: vehicle_pb2.VehicleState) -> list[tuple[str, str]]:
    """(kind, message) for the changes an HMI cares about: locks, parking, ignition, doors."""
    out = []
    if current.locked != previous.locked:
        out.append(("vehicle.locked", "Car locked") if current.locked else ("vehicle.unlocked", "Car unlocked"))
    parked = current.gear == vehicle_pb2.GEAR_PARK
    if parked and previous.gear != vehicle_pb2.GEAR_PARK:
        out.append(("vehicle.parked", "Gear in park"))
    if current.ignition != previous.ignition and current.ignition != vehicle_pb2.IGNITION_UNSPECIFIED:
        name = vehicle_pb2.Ignition.Name(current.ignition).removeprefix("IGNITION_").lower()
        out.append((f"vehicle.ignition_{name}", f"Ignition {name}"))
    before = {d.door: d.open for d in previous.doors}
    for door in current.doors:
        if door.open and not before.get(door.door, False):
            name = vehicle_pb2.DoorId.Name(door.door).removeprefix("DOOR_ID_").lower()
            out.append(("vehicle.door_opened", f"Door {name.replace('_', ' ')} opened"))
    return out
