"""gRPC end to end: a real grpcio client -> the proxy (TLS, HTTP/2) -> a real grpcio server (h2c).

gRPC needs what plain HTTP rarely uses: TE: trailers towards the server (grpc-core refuses a
request without it), and trailers carrying its status back to the client, for errors as a
HEADERS-only "Trailers-Only" response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trio

from tests.support.proxy import ProxyProcess, sites_toml, start_proxy

pytestmark = pytest.mark.slow

SERVICE = "port443.test.Echo"
MESSAGES = 200


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    context.set_trailing_metadata((("x-served-by", "grpc-server"),))
    return b"pong:" + request


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for n in range(MESSAGES):
        yield b"%d:" % n + request * 1000


@pytest.fixture
def grpc_port() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.fixture
async def grpc_proxy(tmp_path: Path, grpc_port: int) -> AsyncIterator[ProxyProcess]:
    """The proxy in front of the gRPC server, for host localhost."""
    body = sites_toml((["localhost"], [f"h2c://127.0.0.1:{grpc_port}"]))
    running = await start_proxy(tmp_path, body, http=False)
    yield running
    await running.terminate()


def _channel(proxy: ProxyProcess) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=proxy.root_ca.read_bytes())
    return grpc.secure_channel(
        f"127.0.0.1:{proxy.https_port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )


async def test_unary_call_with_trailing_metadata(grpc_proxy: ProxyProcess) -> None:
    def call() -> tuple[bytes, dict[str, str]]:
        with _channel(grpc_proxy) as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            reply, rpc = unary.with_call(b"ping", timeout=20)
            return reply, dict(rpc.trailing_metadata())

    reply, trailing = await trio.to_thread.run_sync(call)
    assert reply == b"pong:ping"
    assert trailing["x-served-by"] == "grpc-server"  # a response trailer passed through


async def test_error_status_reaches_the_client(grpc_proxy: ProxyProcess) -> None:
    def call() -> grpc.RpcError:
        with _channel(grpc_proxy) as channel:
            try:
                channel.unary_unary(f"/{SERVICE}/Unary")(b"fail", timeout=20)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("the call succeeded")

    error = await trio.to_thread.run_sync(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert error.details() == "no such thing"  # type: ignore[attr-defined]


async def test_server_streaming_call(grpc_proxy: ProxyProcess) -> None:
    def call() -> list[bytes]:
        with _channel(grpc_proxy) as channel:
            return list(channel.unary_stream(f"/{SERVICE}/Stream")(b"abc", timeout=20))

    replies = await trio.to_thread.run_sync(call)
    assert replies == [b"%d:" % n + b"abc" * 1000 for n in range(MESSAGES)]  # 600 kB
