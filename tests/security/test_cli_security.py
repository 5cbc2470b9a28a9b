"""The client commands reach a server in every security mode (the container health check runs `incar health`),
and `--json` prints only JSON on stdout."""
from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc

from incar.v1 import vehicle_pb2, vehicle_pb2_grpc
from service.security.credentials import channel_credentials
from tests.conftest import ROOT
from tests.security.conftest import pki, secure_app  # noqa: F401  (fixtures)


async def incar(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    # The server runs on this test's event loop: the CLI must run beside it, not block it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_health_over_mtls_with_a_client_certificate(secure_app, pki):  # noqa: F811
    app = await secure_app("mtls", pki)
    target = f"localhost:{app.port}"
    code, out, err = await incar("health", "--target", target, "--ca", str(pki / "ca.pem"),
                                 "--cert", str(pki / "admin.pem"), "--key", str(pki / "admin.key"), "--json")
    assert code == 0, err
    status = json.loads(out)            # the whole of stdout is one JSON object
    assert status["serving"] is True and status["service"] == "overall"
    # Without a client certificate the handshake is refused: not serving, and the reason is given.
    code, out, _ = await incar("health", "--target", target, "--ca", str(pki / "ca.pem"), "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in out


async def test_health_over_tls_with_a_token_from_the_environment(secure_app, pki):  # noqa: F811
    app = await secure_app("tls", pki)
    token = (pki / "hmi.token").read_text().strip()
    env = {"INCAR_TARGET": f"localhost:{app.port}", "INCAR_CA": str(pki / "ca.pem"), "INCAR_TOKEN": token}
    code, out, err = await incar("health", env=env)
    assert code == 0, out + err
    assert out.startswith("overall: SERVING")
    assert "incar.v1.Assistant: SERVING" in out          # the System service's reasons need the role
    # Health itself is open (a probe needs no role), but the reasons are not: the output says why they are missing.
    code, out, _ = await incar("health", "--timeout", "2", env={**env, "INCAR_TOKEN": token + "x"})
    assert "no reasons: UNAUTHENTICATED" in out and "incar.v1.Assistant" not in out


async def test_events_json_holds_the_payload_as_an_object(secure_app, pki):  # noqa: F811
    app = await secure_app("mtls", pki)
    creds = channel_credentials(pki / "ca.pem", pki / "vehicle.pem", pki / "vehicle.key")
    async with grpc.aio.secure_channel(f"localhost:{app.port}", creds) as channel:
        await vehicle_pb2_grpc.VehicleStub(channel).UpdateState(
            vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, locked=True))
    code, out, err = await incar("events", "--target", f"localhost:{app.port}", "--ca", str(pki / "ca.pem"),
                                 "--cert", str(pki / "hmi.pem"), "--key", str(pki / "hmi.key"),
                                 "--json", "--limit", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["kind"] and isinstance(event["payload"], dict) and "payload_json" not in event


async def test_bad_connection_options_are_named():
    code, _, err = await incar("health", "--cert", "client.pem")
    assert code == 2 and "--ca" in err
    code, out, _ = await incar("--version")
    assert code == 0 and out.startswith("incar ")
