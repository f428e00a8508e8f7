"""Access log, Prometheus metrics and health endpoints, seen from outside a real proxy."""

from __future__ import annotations

import errno
import json
import re
import signal
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from proxy.certs.issuers import Issued, IssueRequest, LocalIssuer
from proxy.certs.local_ca import LocalCA
from proxy.certs.manager import CertManager
from proxy.certs.store import CertStore
from proxy.config import CertsConfig, Config, SiteConfig
from proxy.config_load import ConfigError, load_config
from proxy.connections import Admission, ConnectionRegistry
from proxy.handlers.admin import unready_reason
from proxy.metrics import Metrics, handshake_failure_reason
from proxy.netio import StreamTimeout
from tests.support.backend import Backend
from tests.support.curl import Reply, curl
from tests.support.net import free_port
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy, wait_for_text

ACCESS_FIELDS = {
    "timestamp", "client_ip", "host", "method", "path", "protocol", "status", "bytes_in",
    "bytes_out", "duration", "upstream", "upstream_time", "tls_version", "alpn", "site",
    "listener",
}  # fmt: skip
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
CLF_TIME = r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\]"
UNKNOWN_CA = "tlsv1_alert_unknown_ca"  # the server's reason when a client distrusts it
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def json_access_lines(text: str) -> list[dict[str, object]]:
    """The access lines among the proxy's output; every other line must be a log record."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
        else:
            assert LOG_RECORD.match(line), f"neither a log record nor an access line: {line!r}"
    return lines


async def wait_for_lines(path: Path, count: int, prefix: str = "") -> list[str]:
    """The lines starting with `prefix`, once there are `count` (the access line of a
    request is written just after its response, so it may trail the client a little)."""

    def read() -> str:
        return path.read_text() if path.exists() else ""

    await wait_for_text(read, re.compile(f"^{re.escape(prefix)}", re.M), count=count, timeout=10)
    return [line for line in read().splitlines() if line.startswith(prefix)]


async def h1(proxy: ProxyProcess, path: str, *extra: str, host: str = "localhost") -> bytes:
    return (await curl("--http1.1", *extra, *proxy.curl_args(path, host))).body


async def admin_get(proxy: ProxyProcess, path: str, *extra: str) -> tuple[int, str]:
    """Status and body (without its final newline) of an admin endpoint."""
    reply = await proxy.admin(path, *extra)
    return reply.status, reply.text


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# -- access log ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_json_access_lines_carry_every_field(
    proxy: ProxyProcess, backend: Backend, tmp_path: Path
) -> None:
    before = datetime.now(UTC)
    echoed = await h1(proxy, "/echo?q=1")
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"u" * 5000)
    await h1(proxy, "/upload", "--data-binary", f"@{upload}")
    await h1(proxy, "/echo", "-H", "Host: nowhere.test")  # no such site: 421
    await curl("--http2", *proxy.curl_args("/echo?h2"))
    await wait_for_lines(proxy.log_path, 4, "{")

    get, post, misdirected, h2 = json_access_lines(proxy.log())
    assert set(get) == ACCESS_FIELDS
    assert get["client_ip"] == "127.0.0.1"
    assert get["host"] == f"localhost:{proxy.https_port}"
    assert (get["method"], get["path"], get["protocol"]) == ("GET", "/echo?q=1", "HTTP/1.1")
    assert (get["status"], get["bytes_in"], get["bytes_out"]) == (200, 0, len(echoed))
    assert (get["upstream"], get["site"]) == (backend.url, "localhost")
    assert (get["tls_version"], get["alpn"]) == ("TLSv1.3", "http/1.1")
    assert isinstance(get["duration"], float) and isinstance(get["upstream_time"], float)
    assert 0 < get["upstream_time"] <= get["duration"] < 5
    stamp = datetime.fromisoformat(str(get["timestamp"]))
    assert str(get["timestamp"]).endswith("Z")
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)

    assert (post["method"], post["path"], post["bytes_in"]) == ("POST", "/upload", 5000)
    assert misdirected["status"] == 421 and misdirected["site"] is None
    assert misdirected["upstream"] is None and misdirected["upstream_time"] is None
    assert (h2["path"], h2["protocol"], h2["alpn"]) == ("/echo?h2", "HTTP/2", "h2")


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["common", "combined"])
async def test_common_and_combined_formats(
    tmp_path: Path, backend: Backend, log_format: str
) -> None:
    body = f'[access_log]\nformat = "{log_format}"\n' + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    try:
        echoed = await h1(
            proxy, "/echo?a=%22", "-A", 'agent "quoted"\\', "-e", "https://from.test/"
        )
        [line] = await wait_for_lines(proxy.log_path, 1, "127.0.0.1 ")
    finally:
        await proxy.terminate()
    common = rf'127\.0\.0\.1 - - {CLF_TIME} "GET /echo\?a=%22 HTTP/1\.1" 200 {len(echoed)}'
    combined = common + r' "https://from\.test/" "agent \\x22quoted\\x22\\x5C"'
    assert re.fullmatch(common if log_format == "common" else combined, line), line


@pytest.mark.slow
async def test_file_log_is_reopened_on_sigusr1(tmp_path: Path, backend: Backend) -> None:
    path = tmp_path / "access.log"
    body = f'[access_log]\npath = "{path}"\n' + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    try:
        await h1(proxy, "/echo?1")
        await wait_for_lines(path, 1)
        rotated = path.rename(tmp_path / "access.log.1")  # what logrotate does
        await h1(proxy, "/echo?2")  # still written to the renamed file
        await wait_for_lines(rotated, 2)
        proxy.process.send_signal(signal.SIGUSR1)
        with trio.fail_after(10):
            while "reopened the access log" not in proxy.log():
                await trio.sleep(0.02)
        await h1(proxy, "/echo?3")
        [reopened] = await wait_for_lines(path, 1)
    finally:
        await proxy.terminate()
    assert [json.loads(line)["path"] for line in rotated.read_text().splitlines()] == [
        "/echo?1",
        "/echo?2",
    ]
    assert json.loads(reopened)["path"] == "/echo?3"
    assert json_access_lines(proxy.log()) == []  # nothing went to stdout


@pytest.mark.slow
async def test_plain_http_answers_are_logged_and_counted_by_listener(
    tmp_path: Path, backend: Backend
) -> None:
    proxy = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])), admin=True)
    try:
        plain = f"http://localhost:{proxy.http_port}"
        for path in ("/page?q=1", "/.well-known/acme-challenge/unknown-token"):
            await curl(plain + path)
        await h1(proxy, "/echo")
        lines = await wait_for_lines(proxy.log_path, 3, "{")
        status, text = await admin_get(proxy, "/metrics")
    finally:
        await proxy.terminate()
    assert status == 200
    seen = [(line["listener"], line["path"], line["status"]) for line in map(json.loads, lines)]
    assert sorted(seen) == [
        ("http", "/.well-known/acme-challenge/unknown-token", 404),
        ("http", "/page?q=1", 308),
        ("https", "/echo", 200),
    ]
    samples = parse_metrics(text)
    for code in ("308", "404"):
        labels = {"listener": "http", "site": "", "status": code, "protocol": "HTTP/1.1"}
        assert sample(samples, "port443_requests_total", **labels) == 1


# -- metrics -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_metrics_count_real_requests_and_handshake_failures(
    tmp_path: Path, backend: Backend
) -> None:
    dead = free_port()  # nothing listens there: connections are refused
    sites = sites_toml(
        (["localhost"], [backend.url]), (["down.test"], [f"http://127.0.0.1:{dead}"])
    )
    proxy = await start_proxy(tmp_path, sites, admin=True)
    try:
        for _ in range(3):
            await h1(proxy, "/echo")
        await h1(proxy, "/status/404")
        await h1(proxy, "/echo", "-H", "Host: nowhere.test")
        await h1(proxy, "/", host="down.test")
        untrusted = await curl("--resolve", proxy.resolve(), proxy.url("/"), check=False)
        assert untrusted.returncode == 60  # the client refused our certificate
        await wait_for_lines(proxy.log_path, 6, "{")
        failed = ("port443_tls_handshake_failures_total", frozenset({("reason", UNKNOWN_CA)}))
        async with await trio.open_tcp_stream("127.0.0.1", proxy.https_port):
            # A connection that has sent nothing yet is open, not yet a handshake.
            with trio.fail_after(10):
                while True:
                    status, text = await admin_get(proxy, "/metrics")
                    samples = parse_metrics(text)
                    if sample(samples, "port443_open_connections") == 1 and failed in samples:
                        break
                    await trio.sleep(0.02)
    finally:
        await proxy.terminate()
    assert status == 200

    def requests(site: str, status: str) -> float:
        return sample(
            samples,
            "port443_requests_total",
            listener="https",
            site=site,
            status=status,
            protocol="HTTP/1.1",
        )

    assert requests("localhost", "200") == 3
    assert requests("localhost", "404") == 1
    # Six curl runs completed a handshake (one connection each); the untrusted one did not.
    handshakes = sample(samples, "port443_tls_handshakes_total", version="TLSv1.3", alpn="http/1.1")
    assert handshakes == 6
    assert requests("", "421") == 1
    assert requests("down.test", "502") == 1
    assert sample(samples, "port443_request_duration_seconds_count", site="localhost") == 4
    assert sample(samples, "port443_upstream_response_seconds_count", upstream=backend.url) == 4
    assert sample(samples, "port443_upstream_up", upstream=backend.url) == 1
    assert sample(samples, "port443_upstream_up", upstream=f"http://127.0.0.1:{dead}") == 0
    assert samples[failed] == 1
    chain = (proxy.certs_dir / "localhost" / "fullchain.pem").read_bytes()
    not_after = x509.load_pem_x509_certificate(chain).not_valid_after_utc.timestamp()
    expiry = "port443_certificate_expiry_timestamp_seconds"
    assert sample(samples, expiry, cert="localhost") == not_after


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), "econnreset"),
        (StreamTimeout("handshake"), "timeout"),
        (ssl.SSLError(1, "no reason known"), "ssl_error"),
    ],
)
def test_handshake_failure_reasons_are_short_label_values(exc: Exception, reason: str) -> None:
    assert handshake_failure_reason(exc) == reason


class UnreachableCA(LocalIssuer):
    """The local CA's issuer, except that every order fails."""

    async def issue(self, request: IssueRequest) -> Issued:
        raise RuntimeError("CA unreachable")


@dataclass
class State:
    """The server state that the metrics read: here a real manager without a server."""

    config: Config
    certs: CertManager
    admission: Admission
    listening: bool = False
    shutting_down: bool = False


async def test_renewal_failures_are_counted_per_certificate(tmp_path: Path) -> None:
    config = Config(
        path=tmp_path / "port443.toml",
        certs=CertsConfig(dir=tmp_path / "certs"),
        sites=(SiteConfig(hosts=("a.test",), upstreams=()),),
    )
    certs = CertManager(config, ("http/1.1",), issuer=UnreachableCA(LocalCA(config.certs.dir)))
    metrics = Metrics(State(config, certs, Admission(registry=ConnectionRegistry(1))))
    failures = ("port443_certificate_renewal_failures_total", frozenset({("cert", "a.test")}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(certs.run)
        with trio.fail_after(10):  # the manager retries: the count is the first seen
            while failures not in (samples := parse_metrics(metrics.exposition().decode())):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert samples[failures] >= 1
    assert not [key for key in samples if key[0].startswith("port443_certificate_expiry")]


# -- health ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_healthz_and_readyz_until_shutdown(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])), admin=True)
    slow: list[Reply] = []
    try:
        assert await admin_get(proxy, "/healthz") == (200, "ok")
        assert await admin_get(proxy, "/readyz") == (200, "ready")
        assert (await admin_get(proxy, "/nope"))[0] == 404
        assert (await admin_get(proxy, "/readyz", "-X", "POST"))[0] == 405
        async with trio.open_nursery() as nursery:

            async def slow_request() -> None:
                slow.append(await curl("--http1.1", *proxy.curl_args("/sleep/2"), check=False))

            nursery.start_soon(slow_request)
            await trio.sleep(0.5)  # the request is in flight
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                while (await admin_get(proxy, "/readyz"))[0] != 503:
                    await trio.sleep(0.05)
            assert await admin_get(proxy, "/readyz") == (503, "not ready: shutting down")
            assert await admin_get(proxy, "/healthz") == (200, "ok")
            assert proxy.process.poll() is None  # still draining the slow request
        assert await proxy.wait(10) == 0
    finally:
        await proxy.terminate()
    assert slow[0].returncode == 0, slow[0].stderr


async def test_readiness_needs_listeners_and_every_certificate(tmp_path: Path) -> None:
    sites = (
        SiteConfig(hosts=("a.test",), upstreams=()),
        SiteConfig(hosts=("b.test",), upstreams=()),
    )
    broken, working = (
        Config(path=tmp_path / "port443.toml", certs=CertsConfig(dir=tmp_path / d), sites=sites)
        for d in ("broken", "working")
    )
    ca = LocalCA(broken.certs.dir)
    CertStore(broken.certs.dir).write("a.test", *ca.issue(["a.test"]), {})
    certs = CertManager(broken, ("http/1.1",), issuer=UnreachableCA(ca))
    state = State(broken, certs, Admission(registry=ConnectionRegistry(1)))
    assert unready_reason(state) == "listeners not up"
    state.listening = True
    async with trio.open_nursery() as nursery:
        await nursery.start(certs.run)  # a.test is loaded, b.test cannot be had
        assert unready_reason(state) == "no certificate for site b.test"
        nursery.cancel_scope.cancel()
    state.config, state.certs = working, CertManager(working, ("http/1.1",))
    async with trio.open_nursery() as nursery:
        await nursery.start(state.certs.run)  # the local CA issues both
        assert unready_reason(state) is None
        nursery.cancel_scope.cancel()
    state.shutting_down = True
    assert unready_reason(state) == "shutting down"


# -- configuration ---------------------------------------------------------------------------

SITE = '[[sites]]\nhosts = ["localhost"]\nupstreams = ["http://127.0.0.1:8000"]\n'


def test_observability_config_defaults_and_values(tmp_path: Path) -> None:
    config_path = tmp_path / "port443.toml"
    config_path.write_text(SITE)
    default = load_config(config_path)
    assert (default.access_log.enabled, default.access_log.format) == (True, "json")
    assert default.access_log.path is None  # stdout
    assert (default.admin.enabled, default.admin.address, default.admin.port) == (
        True,
        "127.0.0.1",
        2019,
    )
    config_path.write_text(
        f'[access_log]\nenabled = false\nformat = "combined"\npath = "{tmp_path}/a.log"\n'
        '[admin]\nenabled = false\naddress = "::1"\nport = 9100\n' + SITE
    )
    config = load_config(config_path)
    assert (config.access_log.enabled, config.access_log.format) == (False, "combined")
    assert config.access_log.path == tmp_path / "a.log"
    assert (config.admin.enabled, config.admin.address, config.admin.port) == (False, "::1", 9100)


def test_observability_config_problems(tmp_path: Path) -> None:
    config_path = tmp_path / "port443.toml"
    config_path.write_text(
        '[access_log]\nformat = "xml"\npath = "/no/such/dir/a.log"\nrotate = 1\n'
        '[admin]\naddress = "localhost"\nport = 443\n' + SITE
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_path)
    assert [p.removeprefix(f"{config_path}:") for p in info.value.problems] == [
        '2: access_log.format: must be one of "json", "common", "combined", got "xml"',
        "3: access_log.path: directory not found: /no/such/dir",
        "4: access_log.rotate: unknown key",
        '6: admin.address: must be an IP address such as "0.0.0.0" or "::", got "localhost"',
        "7: admin.port: must differ from listen.http and listen.https",
    ]
