"""Transport security and roles over real TLS connections with certificates from our development CA."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, events_pb2,
                      events_pb2_grpc, skills_pb2, skills_pb2_grpc, system_pb2, system_pb2_grpc, vehicle_pb2,
                      vehicle_pb2_grpc)
from service.config import ConfigError, load_config
from service.security import integration
from service.security.config import SecurityConfig, check_listen
from service.security.credentials import channel_credentials
from tests.security.conftest import make_app, security_overrides


def tls_channel(app, pki, role: str | None = None, token: str | None = None) -> grpc.aio.Channel:
    creds = channel_credentials(pki / "ca.pem", pki / f"{role}.pem" if role else None,
                                pki / f"{role}.key" if role else None, token=token)
    # The server certificate names localhost/127.0.0.1; connect by name like a real client.
    return grpc.aio.secure_channel(f"localhost:{app.port}", creds)


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


async def stream_frames(ch) -> tuple[grpc.StatusCode, str]:
    async def frames():
        yield cameras_pb2.Frame(camera_id="front", sequence=1)
    try:
        async for _ in cameras_pb2_grpc.CamerasStub(ch).StreamFrames(frames()):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


async def ask(ch) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in assistant_pb2_grpc.AssistantStub(ch).Ask(assistant_pb2.AskRequest(question="hi")):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


async def test_mtls_handshake_and_each_role_reaches_its_methods(secure_app, pki):
    app = await secure_app("mtls", pki)
    async with tls_channel(app, pki, "vehicle") as ch:
        stub = vehicle_pb2_grpc.VehicleStub(ch)
        reply = await stub.UpdateState(vehicle_pb2.VehicleState(speed_kmh=12, gear=vehicle_pb2.GEAR_DRIVE))
        assert reply.vehicle_mode == "driving"
        assert (await stub.GetState(vehicle_pb2.GetStateRequest())).speed_kmh == 12
        # Health is open to every authenticated peer.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with tls_channel(app, pki, "hmi") as ch:
        status = await system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest())
        assert status.version
        listed = await events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest(limit=10))
        assert listed.next_cursor == 0 and not listed.events   # driving at 12 km/h is no HMI event
        code, details = await code_of(vehicle_pb2_grpc.VehicleStub(ch).UpdateState(vehicle_pb2.VehicleState()))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "/incar.v1.Vehicle/UpdateState" in details and "'hmi'" in details
        # Enrolment is admin-only (biometric data).
        code, details = await code_of(skills_pb2_grpc.GreeterStub(ch).Enroll(skills_pb2.EnrollRequest(name="a")))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "Greeter/Enroll" in details
    async with tls_channel(app, pki, "admin") as ch:
        code, _ = await code_of(skills_pb2_grpc.GreeterStub(ch).Enroll(skills_pb2.EnrollRequest(name="a")))
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        reply = await vehicle_pb2_grpc.VehicleStub(ch).UpdateState(vehicle_pb2.VehicleState())
        assert reply.vehicle_mode == "off"


async def test_camera_certificate_streams_frames_but_is_denied_assistant_and_vehicle(secure_app, pki):
    app = await secure_app("mtls", pki)
    async with tls_channel(app, pki, "camera") as ch:
        code, details = await stream_frames(ch)
        # Authorised: the frame reaches the Cameras service (UNIMPLEMENTED only while this build mounts none).
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), details
        if "incar.v1.Cameras" in app.health.status:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), details
        else:
            assert code == grpc.StatusCode.UNIMPLEMENTED
        code, details = await ask(ch)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "/incar.v1.Assistant/Ask" in details and "'camera'" in details
        code, details = await code_of(vehicle_pb2_grpc.VehicleStub(ch).GetState(vehicle_pb2.GetStateRequest()))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "Vehicle/GetState" in details
        code, _ = await code_of(events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest()))
        assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_mtls_server_refuses_a_client_without_certificate(secure_app, pki):
    app = await secure_app("mtls", pki)
    async with tls_channel(app, pki) as ch:
        code, _ = await code_of(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no RPC ever reaches a handler
    # Nor does a plaintext client get anywhere.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        code, _ = await code_of(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_bearer_token_over_tls_is_hmi_and_a_bad_token_is_unauthenticated(secure_app, pki):
    app = await secure_app("tls", pki)
    token = (pki / "hmi.token").read_text().strip()
    async with tls_channel(app, pki, token=token) as ch:
        status = await system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest())
        assert status.version
        code, details = await code_of(vehicle_pb2_grpc.VehicleStub(ch).UpdateState(vehicle_pb2.VehicleState()))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'hmi'" in details and "hmi-token-dashboard" in details
    async with tls_channel(app, pki, token=token + "x") as ch:
        code, details = await code_of(system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "/incar.v1.System/GetStatus" in details and "unknown bearer token" in details
    async with tls_channel(app, pki) as ch:   # TLS, but no identity at all
        code, details = await code_of(events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "no client certificate and no bearer token" in details
        # Unmounted methods are refused the same way: no probing the API without an identity.
        code, _ = await ask(ch)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Health from loopback stays open for orchestrators.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_insecure_loopback_on_a_public_address_is_refused_at_start(tmp_path, pki):
    app = make_app(tmp_path, ["security.mode=insecure-loopback", "server.listen=0.0.0.0:0"])
    with pytest.raises(ConfigError, match=r"^security\.mode: insecure-loopback refuses server\.listen='0\.0\.0\.0:0'"):
        await app.start()
    assert app.server is None or not app.port
    app.db.close()
    # The check the lead calls, on its own, for every non-loopback form.
    cfg = SecurityConfig()
    for listen in ("0.0.0.0:50051", "[::]:50051", "192.168.1.4:50051", "car.local:50051"):
        with pytest.raises(ValueError, match="^mode: "):
            check_listen(cfg, listen)
    for listen in ("127.0.0.1:50051", "[::1]:50051", "localhost:50051"):
        check_listen(cfg, listen)
    with pytest.raises(ValueError, match="^metrics_listen: "):
        check_listen(cfg, "127.0.0.1:1", "0.0.0.0:9464")
    check_listen(SecurityConfig(metrics_listen_public=True), "127.0.0.1:1", "0.0.0.0:9464")


def test_config_errors_name_the_key(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"^security\.mode: "):
        load_config(env={}, overrides=["security.mode=plaintext"])
    with pytest.raises(ConfigError, match=r"^security\.ca_file: required in mode mtls"):
        load_config(env={}, overrides=["security.mode=mtls", f"security.cert_file={pki / 'server.pem'}",
                                       f"security.key_file={pki / 'server.key'}"])
    with pytest.raises(ConfigError, match=r"^security\.cert_file: .* is not a readable file"):
        load_config(env={}, overrides=["security.mode=tls", f"security.cert_file={tmp_path / 'nope.pem'}",
                                       f"security.key_file={pki / 'server.key'}"])
    bad_tokens = tmp_path / "tokens.yaml"
    bad_tokens.write_text('{"%s": ["x", "superuser"]}' % ("a" * 64))
    with pytest.raises(ConfigError, match=r"^security\.tokens\.aaaaaaaaaaaa\.\.\.: unknown role 'superuser'"):
        load_config(env={}, overrides=[f"security.tokens_file={bad_tokens}"])
    config = load_config(env={}, overrides=security_overrides(pki, "mtls"))
    assert integration.security_of(config).mode == "mtls"


async def test_renewed_certificates_take_effect_without_a_restart(secure_app, pki, tmp_path):
    from service.security.devca import make_dev_pki
    live, renewed = tmp_path / "live", tmp_path / "renewed"
    live.mkdir()
    make_dev_pki(renewed)                           # a whole new CA, server and client set
    for name in ("server.pem", "server.key", "ca.pem", "tokens.yaml"):
        (live / name).write_bytes((pki / name).read_bytes())
    app = await secure_app("mtls", live)

    async def works(client_pki) -> grpc.StatusCode:
        async with tls_channel(app, client_pki, "hmi") as ch:
            code, _ = await code_of(system_pb2_grpc.SystemStub(ch).GetStatus(system_pb2.GetSystemStatusRequest(),
                                                                             timeout=10))
            return code
    assert await works(pki) == grpc.StatusCode.OK
    assert await works(renewed) == grpc.StatusCode.UNAVAILABLE
    # Mid-rotation (new certificate, old key): ignored, the old set keeps serving.
    (live / "server.pem").write_bytes((renewed / "server.pem").read_bytes())
    assert await works(pki) == grpc.StatusCode.OK
    (live / "server.key").write_bytes((renewed / "server.key").read_bytes())
    (live / "ca.pem").write_bytes((renewed / "ca.pem").read_bytes())
    assert await works(renewed) == grpc.StatusCode.OK
    assert await works(pki) == grpc.StatusCode.UNAVAILABLE


async def test_a_key_that_does_not_match_its_certificate_stops_the_start(tmp_path, pki):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("server.pem", "ca.pem", "tokens.yaml"):
        (mixed / name).write_bytes((pki / name).read_bytes())
    (mixed / "server.key").write_bytes((pki / "hmi.key").read_bytes())
    app = make_app(tmp_path / "app", security_overrides(mixed, "mtls"))
    with pytest.raises(ConfigError, match=r"^security\.key_file: does not belong to the certificate"):
        await app.start()
    app.db.close()
