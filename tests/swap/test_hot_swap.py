"""Hot swap over real gRPC: questions asked without pause while an admin swaps the bundle get answers, every one;
health never says NOT_SERVING; answers in flight finish on the old bundle; a refused bundle changes nothing."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from incar.v1 import assistant_pb2, assistant_pb2_grpc, models_pb2, models_pb2_grpc
from service.config import load_config
from service.security.signing import generate_keypair, load_private_key, sign_bundle
from service.server import Application
from tests.conftest import base_overrides
from tests.signing.bundles import DEFAULT_BUNDLE, bundle_copy, tamper

ASSISTANT = "incar.v1.Assistant"


@pytest.fixture
async def served(tmp_path):
    key, pub = generate_keypair(tmp_path / "keys")
    first = bundle_copy(tmp_path / "first", name="first-bundle")
    sign_bundle(first, load_private_key(key))
    app = Application(load_config(env={}, overrides=base_overrides(tmp_path) + [
        f"runtime.bundle={first}", "security.allow_unsigned_bundles=false", f"security.bundle_trusted_keys=[{pub}]"]))
    await app.start()
    await asyncio.wait_for(app.ready(), 300)
    assert app.health.status[ASSISTANT][0], app.health.status[ASSISTANT]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield app, channel, key
    await channel.close()
    await app.stop(0.5)


async def test_asking_without_pause_through_a_swap_fails_nothing_and_never_goes_not_serving(served, tmp_path):
    app, channel, key = served
    second = bundle_copy(tmp_path / "second", name="second-bundle")
    sign_bundle(second, load_private_key(key))
    assistant = assistant_pb2_grpc.AssistantStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stop = asyncio.Event()
    answered: list[str] = []          # the model that answered each request, in completion order
    failures: list[str] = []
    statuses: list[int] = []

    async def ask_forever(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                async for item in assistant.Ask(assistant_pb2.AskRequest(question=f"Count to three ({worker}.{n})",
                                                                         max_tokens=12), timeout=120):
                    if item.HasField("done"):
                        answered.append(item.done.model)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    async def watch_health() -> None:
        while not stop.is_set():
            for service in (ASSISTANT, ""):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                statuses.append(reply.status)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(ask_forever(i)) for i in range(3)] + [asyncio.create_task(watch_health())]
    try:
        while len(answered) < 3:                 # asking is under way on the first bundle
            await asyncio.sleep(0.05)
        reply = await models_pb2_grpc.ModelsStub(channel).SwapBundle(
            models_pb2.SwapBundleRequest(bundle_path=str(second)), timeout=600)
        assert reply.previous_model == "first-bundle" and reply.now.model == "second-bundle" and reply.now.signed
        switched_at = len(answered)
        while answered.count("second-bundle") < 3:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert failures == []
    assert statuses and all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses)
    assert "first-bundle" in answered[:switched_at] and set(answered[switched_at:]) <= {"first-bundle", "second-bundle"}
    # After the switch nothing new starts on the old bundle: once the new one answers, the old never does again.
    first_new = answered.index("second-bundle")
    assert "first-bundle" not in answered[first_new + 3:]
    info = await models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest())
    assert info.model == "second-bundle" and info.bundle_path == str(second)


async def test_a_tampered_or_unsigned_bundle_is_refused_and_the_old_one_serves_on(served, tmp_path):
    app, channel, key = served
    models = models_pb2_grpc.ModelsStub(channel)
    tampered = bundle_copy(tmp_path / "tampered", name="tampered-bundle")
    sign_bundle(tampered, load_private_key(key))
    tamper(tampered)
    unsigned = bundle_copy(tmp_path / "unsigned", name="unsigned-bundle")
    for path, why in ((tampered, "does not match its signature"), (unsigned, "unsigned bundle")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await models.SwapBundle(models_pb2.SwapBundleRequest(bundle_path=str(path)), timeout=300)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and why in err.value.details()
        serving, reason = app.health.status[ASSISTANT]
        assert serving and "refused" in reason and path.name in reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await models.SwapBundle(models_pb2.SwapBundleRequest(bundle_path=str(tmp_path)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bundle_path" in err.value.details()
    assert (await models.GetModel(models_pb2.GetModelRequest())).model == "first-bundle"
    answer = [i async for i in assistant_pb2_grpc.AssistantStub(channel).Ask(
        assistant_pb2.AskRequest(question="Hello", max_tokens=4)) if i.HasField("done")]
    assert answer[0].done.model == "first-bundle"


async def test_only_admin_may_swap(tmp_path):
    app = Application(load_config(env={}, overrides=base_overrides(tmp_path) + ["security.loopback_role=hmi"]))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await models_pb2_grpc.ModelsStub(ch).SwapBundle(
                    models_pb2.SwapBundleRequest(bundle_path=str(DEFAULT_BUNDLE)))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "hmi" in err.value.details()
    finally:
        await app.stop(0.2)
