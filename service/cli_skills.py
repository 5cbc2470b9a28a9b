"""Task commands, one per skill, over the skills' gRPC services:

    incar greeter enrol --name Ana --image face.jpg --consent | list | forget PROFILE_ID
    incar carfinder where | history | record [ID] | snapshot [ID] --out FILE
    incar sentinel arm | disarm | status | clips | clip CLIP_ID --out DIR
    incar safety status | ack CURSOR

Each prints a readable line per item, or with `--json` one JSON object (stdout holds nothing else), and exits
non-zero with the server's status code and message when the call is refused.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.json_format import MessageToDict

from incar.v1 import common_pb2, skills_pb2, skills_pb2_grpc
from service.clients import add_connection_args, connection_or_exit, open_channel, run_call

Action = Callable[[grpc.aio.Channel, argparse.Namespace], Awaitable[object]]


def _as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True)


def _image(path: str) -> common_pb2.Image:
    data = Path(path).read_bytes()
    encoding = common_pb2.IMAGE_ENCODING_PNG if data[:4] == b"\x89PNG" else common_pb2.IMAGE_ENCODING_JPEG
    return common_pb2.Image(encoding=encoding, data=data)


# ---------------------------------------------------------------------------------------------------- Greeter
async def _greeter_enrol(channel, args):
    if not (args.image or args.camera):
        raise SystemExit("incar greeter enrol: give --image FILE or --camera ID (where the face is)")
    request = skills_pb2.EnrollRequest(name=args.name, consent=args.consent, key_fob_id=args.fob,
                                       preferences_json=args.preferences)
    if args.image:
        request.image.CopyFrom(_image(args.image))
    else:
        request.camera_id = args.camera
    return await skills_pb2_grpc.GreeterStub(channel).Enroll(request)


async def _greeter_list(channel, args):
    return await skills_pb2_grpc.GreeterStub(channel).ListProfiles(skills_pb2.ListProfilesRequest())


async def _greeter_forget(channel, args):
    await skills_pb2_grpc.GreeterStub(channel).DeleteProfile(skills_pb2.DeleteProfileRequest(profile_id=args.id))
    return {"forgotten": args.id}


# ------------------------------------------------------------------------------------------------- Car Finder
async def _carfinder_where(channel, args):
    return await skills_pb2_grpc.CarFinderStub(channel).WhereIsMyCar(skills_pb2.WhereIsMyCarRequest())


async def _carfinder_history(channel, args):
    return await skills_pb2_grpc.CarFinderStub(channel).ListParkingHistory(
        skills_pb2.ListParkingHistoryRequest(limit=args.limit))


async def _carfinder_record(channel, args):
    return await skills_pb2_grpc.CarFinderStub(channel).GetParkingRecord(
        skills_pb2.GetParkingRecordRequest(record_id=args.id))


async def _carfinder_snapshot(channel, args):
    """Download a parking record's snapshot (the latest record's without an id) to --out."""
    data = bytearray()
    async for chunk in skills_pb2_grpc.CarFinderStub(channel).GetParkingSnapshot(
            skills_pb2.GetParkingSnapshotRequest(record_id=args.id)):
        data += chunk.data
    out = Path(args.out or f"parking-{args.id or 'latest'}.jpg")
    out.write_bytes(bytes(data))
    return {"record_id": args.id or "latest", "file": str(out), "bytes": len(data)}


# --------------------------------------------------------------------------------------------------- Sentinel
async def _sentinel_arm(channel, args):
    return await skills_pb2_grpc.SentinelStub(channel).Arm(skills_pb2.ArmRequest())


async def _sentinel_disarm(channel, args):
    return await skills_pb2_grpc.SentinelStub(channel).Disarm(skills_pb2.DisarmRequest())


async def _sentinel_status(channel, args):
    return await skills_pb2_grpc.SentinelStub(channel).GetStatus(skills_pb2.SentinelStatusRequest())


async def _sentinel_clips(channel, args):
    return await skills_pb2_grpc.SentinelStub(channel).ListClips(skills_pb2.ListClipsRequest(limit=args.limit))


async def _sentinel_clip(channel, args):
    """Download a clip: its files are written under --out (a JPEG sequence keeps its frame names)."""
    out = Path(args.out) / args.id
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, int] = {}
    handles: dict[str, object] = {}
    try:
        async for chunk in skills_pb2_grpc.SentinelStub(channel).GetClip(skills_pb2.GetClipRequest(clip_id=args.id)):
            name = Path(chunk.name or "clip.bin").name        # never a path from the server
            if name not in handles:
                handles[name] = (out / name).open("wb")
            handles[name].write(chunk.data)
            files[name] = files.get(name, 0) + len(chunk.data)
    finally:
        for handle in handles.values():
            handle.close()
    return {"clip_id": args.id, "folder": str(out), "files": len(files), "bytes": sum(files.values())}


# ----------------------------------------------------------------------------------------------------- Safety
async def _safety_status(channel, args):
    return await skills_pb2_grpc.SafetyStub(channel).GetStatus(skills_pb2.SafetyStatusRequest())


async def _safety_ack(channel, args):
    await skills_pb2_grpc.SafetyStub(channel).Acknowledge(skills_pb2.AcknowledgeRequest(event_cursor=args.cursor))
    return {"acknowledged": args.cursor}


def _parser(skill: str) -> tuple[argparse.ArgumentParser, dict[str, Action]]:
    parser = argparse.ArgumentParser(prog=f"incar {skill}", description=f"{skill} tasks over gRPC")
    add_connection_args(parser)
    parser.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    parser.add_argument("--timeout", type=float, default=30.0)
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    actions: dict[str, Action] = {}

    def task(name: str, action: Action, help_text: str) -> argparse.ArgumentParser:
        actions[name] = action
        return sub.add_parser(name, help=help_text)

    if skill == "greeter":
        enrol = task("enrol", _greeter_enrol, "enrol a driver's face (with consent)")
        enrol.add_argument("--name", required=True)
        enrol.add_argument("--image", default="", help="a photo of the face (JPEG/PNG)")
        enrol.add_argument("--camera", default="", help="or: use this camera's latest frame")
        enrol.add_argument("--fob", default="", help="the driver's key fob id")
        enrol.add_argument("--preferences", default="", help="seat/mirror/climate presets as JSON")
        enrol.add_argument("--consent", action="store_true", help="the driver agreed to store a face template")
        task("list", _greeter_list, "list enrolled drivers")
        task("forget", _greeter_forget, "delete a driver and every trace of their face").add_argument("id")
    elif skill == "carfinder":
        task("where", _carfinder_where, "where is the car parked")
        task("history", _carfinder_history, "recent parking records").add_argument("--limit", type=int, default=10)
        task("record", _carfinder_record, "a parking record with its sign trail").add_argument(
            "id", nargs="?", default="", help="record id (default: the latest)")
        snapshot = task("snapshot", _carfinder_snapshot, "download a parking record's snapshot (JPEG)")
        snapshot.add_argument("id", nargs="?", default="", help="record id (default: the latest)")
        snapshot.add_argument("--out", default="", help="file to write (default: parking-<id>.jpg here)")
    elif skill == "sentinel":
        task("arm", _sentinel_arm, "arm Sentinel")
        task("disarm", _sentinel_disarm, "disarm Sentinel")
        task("status", _sentinel_status, "Sentinel's state")
        task("clips", _sentinel_clips, "recorded clips").add_argument("--limit", type=int, default=20)
        clip = task("clip", _sentinel_clip, "download a clip")
        clip.add_argument("id")
        clip.add_argument("--out", default=".", help="folder to write it under (default: here)")
    elif skill == "safety":
        task("status", _safety_status, "active safety alerts")
        task("ack", _safety_ack, "acknowledge an alert").add_argument("cursor", type=int)
    return parser, actions


def _print(reply, as_json: bool) -> None:
    data = reply if isinstance(reply, dict) else _as_dict(reply)
    if as_json:
        print(json.dumps(data))
        return
    items = None                     # a reply that is only a list (profiles, clips, records): one line per item
    if not isinstance(reply, dict) and len(reply.DESCRIPTOR.fields) == 1 and reply.DESCRIPTOR.fields[0].is_repeated:
        items = data.get(reply.DESCRIPTOR.fields[0].name, [])
    for item in items if items is not None else [data]:
        print("  ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in item.items()))
    if items == []:
        print("(none)")


def run(skill: str, argv: list[str]) -> int:
    parser, actions = _parser(skill)
    args = parser.parse_args(argv)
    connection = connection_or_exit(parser, args)

    async def call():
        async with open_channel(connection) as channel:
            return await asyncio.wait_for(actions[args.task](channel, args), args.timeout)
    async def call_and_print():
        _print(await call(), args.json)
    return run_call(f"incar {skill} {args.task}", call_and_print())


def greeter_main(argv: list[str]) -> int:
    return run("greeter", argv)


def carfinder_main(argv: list[str]) -> int:
    return run("carfinder", argv)


def sentinel_main(argv: list[str]) -> int:
    return run("sentinel", argv)


def safety_main(argv: list[str]) -> int:
    return run("safety", argv)
