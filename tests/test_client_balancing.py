"""Client-side load balancing and channel options, over real gRPC on loopback.

Each test starts small in-process ``Locator`` servers (``FakeLocator`` of test_client_grpc,
which counts the ``Locate`` calls it answers) on free 127.0.0.1 ports. What is under test is
the client's channel: which servers its calls reach, and which limits it applies.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from test_client_grpc import FakeLocator, img, serve_fake

from visloc_client import AsyncLocatorClient, LocateError, LocatorClient
from visloc_client._common import DEFAULT_MAX_MESSAGE_BYTES, LOAD_BALANCING_POLICIES
from visloc_client.cli import main

CALLS = 20
# Neighbours that make a response larger than gRPC's own 4 MiB receive limit (~30 bytes each).
BIG = 160_000


@pytest.fixture
def two():
    """Two servers and one target that resolves to both: ``ipv4:127.0.0.1:P1,127.0.0.1:P2``."""
    with serve_fake() as (first, a), serve_fake() as (second, b):
        yield [first, second], f"ipv4:{a},{b}"


@pytest.fixture
def one():
    with serve_fake() as served:
        yield served


def _connection(target: str = "127.0.0.1:1", **kwargs):
    """The settings a client opens its channel with (a channel connects only when used)."""
    kwargs = {"tls": False, "token": None, "timeout": 1.0, "retries": 0, "max_message_bytes": 1 << 20, **kwargs}
    with LocatorClient(target, **kwargs) as client:
        return client._conn


def _calls(servicers: list[FakeLocator]) -> list[int]:
    return [s.calls for s in servicers]


def _locate_sync(target: str, **kwargs) -> None:
    with LocatorClient(target, **kwargs) as client:
        client.info()  # connect first (GetInfo is not counted)
        for i in range(CALLS):
            assert client.locate(img(i, i)).lat == i


def _locate_async(target: str, **kwargs) -> None:
    async def run() -> None:
        async with AsyncLocatorClient(target, **kwargs) as client:
            await client.info()
            for i in range(CALLS):
                assert (await client.locate(img(i, i))).lat == i

    asyncio.run(run())


# --- load balancing --------------------------------------------------------------------------


@pytest.mark.parametrize("locate", [_locate_sync, _locate_async], ids=["sync", "async"])
def test_round_robin_reaches_every_server(two, locate):
    servicers, target = two
    locate(target, load_balancing="round_robin")
    calls = _calls(servicers)
    assert sum(calls) == CALLS and min(calls) > 0, calls


@pytest.mark.parametrize("locate", [_locate_sync, _locate_async], ids=["sync", "async"])
@pytest.mark.parametrize("policy", [None, "pick_first"])
def test_pick_first_is_the_default_and_uses_one_server(two, locate, policy):
    servicers, target = two
    locate(target, load_balancing=policy)
    assert sorted(_calls(servicers)) == [0, CALLS]


@pytest.mark.parametrize("policy", ["least_request", "ROUND_ROBIN", "", 1])
def test_unknown_policy_is_a_value_error(one, policy):
    servicer, target = one
    with pytest.raises(ValueError) as err:
        LocatorClient(target, load_balancing=policy)
    for allowed in LOAD_BALANCING_POLICIES:
        assert allowed in str(err.value)

    async def run() -> None:
        AsyncLocatorClient(target, load_balancing=policy)

    with pytest.raises(ValueError, match="round_robin"):
        asyncio.run(run())
    assert servicer.calls == 0


def test_the_policy_goes_into_the_service_config():
    conn = _connection()
    assert "grpc.service_config" not in dict(conn.options)  # default: gRPC's own pick_first
    conn = _connection(load_balancing="round_robin")
    assert json.loads(dict(conn.options)["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}


def test_a_callers_service_config_is_merged_not_replaced(two):
    servicers, target = two
    method_config = {"methodConfig": [{"name": [{"service": "visloc.v1.Locator"}], "timeout": "7s"}]}
    extra = [("grpc.service_config", json.dumps(method_config))]
    conn = _connection(target, load_balancing="round_robin", channel_options=extra)
    names = [name for name, _ in conn.options]
    assert names.count("grpc.service_config") == 1
    assert json.loads(dict(conn.options)["grpc.service_config"]) == {
        **method_config,
        "loadBalancingConfig": [{"round_robin": {}}],
    }
    # gRPC accepts the merged config, and it balances.
    _locate_sync(target, load_balancing="round_robin", channel_options=extra)
    assert min(_calls(servicers)) > 0
    # The policy given twice is ambiguous.
    lb = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"pick_first": {}}]}))]
    with pytest.raises(ValueError, match="twice"):
        LocatorClient(target, load_balancing="round_robin", channel_options=lb)
    # Without load_balancing the caller's service config is passed as given.
    _locate_sync(target, channel_options=lb)


# --- channel options -------------------------------------------------------------------------


def test_channel_options_override_the_receive_limit(one):
    servicer, target = one
    small = 64 * 1024
    with LocatorClient(target, channel_options=[("grpc.max_receive_message_length", small)]) as client:
        assert client.locate(img(1, 2), neighbours=10).lat == 1  # a small answer still fits
        with pytest.raises(LocateError) as err:
            client.locate(img(1, 2), neighbours=5000)  # ~150 kB
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 2  # the server answered; the client refused the answer

    async def run() -> grpc.StatusCode:
        async with AsyncLocatorClient(target, channel_options=[("grpc.max_receive_message_length", small)]) as client:
            with pytest.raises(LocateError) as err:
                await client.locate(img(1, 2), neighbours=5000)
        return err.value.code

    assert asyncio.run(run()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_clients_defaults_stay_otherwise(one):
    servicer, target = one
    extra = [("grpc.max_receive_message_length", 64 * 1024), ("grpc.keepalive_time_ms", 60_000)]
    conn = _connection(max_message_bytes=8 << 20, channel_options=extra)
    options = dict(conn.options)
    assert options["grpc.max_receive_message_length"] == 64 * 1024
    assert options["grpc.max_send_message_length"] == 8 << 20
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.primary_user_agent"].startswith("visloc-client/")
    assert len(conn.options) == len(options)  # one entry per name
    assert conn.max_message_bytes == 8 << 20

    # Over a channel with an unrelated option, the client's 20 MiB receive limit still holds:
    # an answer above gRPC's own 4 MiB default arrives.
    with LocatorClient(target, channel_options=[("grpc.keepalive_time_ms", 60_000)]) as client:
        result = client.locate(img(3, 4), neighbours=BIG)
    assert len(result.neighbours) == BIG and DEFAULT_MAX_MESSAGE_BYTES > 4 << 20
    assert servicer.metadata[-1]["user-agent"].startswith("visloc-client/")


def test_an_overridden_send_limit_is_checked_locally(one):
    servicer, target = one
    with LocatorClient(target, channel_options=[("grpc.max_send_message_length", 64 * 1024)]) as client:
        with pytest.raises(LocateError) as err:
            client.locate(b"x" * 100_000)
        items = list(client.locate_many([b"x" * 100_000, img(5, 6)]))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and servicer.calls == 0
    # In a batch the oversize image is its own failure; the stream goes on.
    assert items[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and items[1].result.lat == 5


@pytest.mark.parametrize("bad", ["grpc.x", [("grpc.x",)], [(1, 2)]])
def test_malformed_channel_options_are_refused(bad):
    with pytest.raises(TypeError):
        LocatorClient("127.0.0.1:1", channel_options=bad)


# --- CLI -------------------------------------------------------------------------------------


def _images(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(CALLS):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(img(i, i))
        paths.append(str(path))
    return paths


def test_cli_load_balancing_flag(two, tmp_path, capsys):
    servicers, target = two
    images = _images(tmp_path)

    assert main(["--target", target, "--load-balancing", "round_robin", "locate", *images]) == 0
    assert len(capsys.readouterr().out.splitlines()) == CALLS
    calls = _calls(servicers)
    assert sum(calls) == CALLS and min(calls) > 0, calls

    # After the command, like the other connection options.
    assert main(["locate", *images, "--target", target, "--load-balancing", "round_robin"]) == 0
    calls = _calls(servicers)
    assert sum(calls) == 2 * CALLS and min(calls) > 0, calls


def test_cli_default_is_pick_first(two, tmp_path, capsys):
    servicers, target = two
    images = _images(tmp_path)
    assert main(["--target", target, "locate", *images]) == 0
    assert sorted(_calls(servicers)) == [0, CALLS]
    assert main(["--target", target, "--load-balancing", "pick_first", "info"]) == 0


def test_cli_rejects_an_unknown_policy(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--load-balancing", "random", "info"])
    assert exit_.value.code == 2
    assert "round_robin" in capsys.readouterr().err
