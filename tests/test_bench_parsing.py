"""The pure parts of bench/: h2load output, /proc accounting, the report's arithmetic.

Samples are recorded from h2load 1.52 and Linux 6.x; nothing here starts a process.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hyperframe.frame import GoAwayFrame, HeadersFrame, RstStreamFrame

from bench import attacks, load, procstat, report, targets
from bench.memory import IdleMemory
from proxy.config_load import load_config

# h2load --h1 -n 20 -c 2 against a plain HTTP server (recorded).
H2LOAD_OK = """starting benchmark...
spawning thread #0: 2 total client(s). 20 total requests
Application protocol: http/1.1
progress: 10% done
progress: 100% done

finished in 18.80ms, 1063.60 req/s, 56.71KB/s
requests: 20 total, 20 started, 20 done, 20 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 20 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.07KB (1092) total, 2.36KB (2420) headers (space savings 0.00%), 35.43KB (36280) data
                     min         max         mean         sd        +/- sd
time for request:      497us      7.12ms      1.49ms      1.83ms    90.00%
"""

# h2load --h1 -H "Connection: close" against `openssl s_server -www` over TLS (recorded): the
# handshakes work, every request fails.
H2LOAD_TLS_FAILED = """starting benchmark...
spawning thread #0: 2 total client(s). 6 total requests
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
No protocol negotiated. Fallback behaviour may be activated
Server does not support NPN/ALPN. Falling back to HTTP/1.1.
Application protocol: http/1.1

finished in 6.53ms, 0.00 req/s, 1.33MB/s
requests: 6 total, 2 started, 0 done, 0 succeeded, 6 failed, 6 errored, 0 timeout
status codes: 2 2xx, 0 3xx, 0 4xx, 0 5xx
"""

# --log-file lines: start (us since the epoch), status (-1: failed), request time in us.
H2LOAD_LOG = (
    "1796228366700113\t200\t2038\n1796228366700104\t200\t7117\n1796228366702215\t-1\t6351\n"
)


def test_h2load_summary_of_a_good_run() -> None:
    s = load.parse_h2load(H2LOAD_OK)
    assert (s.rps, s.succeeded, s.failed, s.alpn, s.tls) == (1063.60, 20, 0, "http/1.1", "-")


def test_h2load_summary_counts_failures_and_the_tls_version() -> None:
    s = load.parse_h2load(H2LOAD_TLS_FAILED)
    assert (s.rps, s.succeeded, s.failed, s.tls) == (0.0, 0, 12, "TLSv1.3")


def test_h2load_summary_of_garbage_is_empty() -> None:
    assert load.parse_h2load("h2load: connection refused") == load.H2loadSummary()


def test_latencies_skip_failed_requests_and_percentiles_use_nearest_rank() -> None:
    lat = load.parse_log_latencies(H2LOAD_LOG)
    assert lat == [2.038, 7.117]
    assert load.percentile(lat, 50) == 2.038
    assert load.percentile(lat, 99) == 7.117
    assert load.percentile(list(range(1, 101)), 99) == 99
    assert load.percentile([], 50) is None


def test_sweep_cases_keep_the_concurrency() -> None:
    assert load.sweep_case("h1", 50).clients == 50
    h2 = load.sweep_case("h2", 200)
    assert (h2.clients, h2.streams, h2.concurrency) == (20, 10, 200)
    assert load.sweep_case("h2", 1).concurrency == 1


def test_cpu_list_of_taskset_lists() -> None:
    assert load.cpu_list("0") == [0]
    assert load.cpu_list("1,3") == [1, 3]
    assert load.cpu_list("0,4-6") == [0, 4, 5, 6]


def test_generator_bound_when_the_client_core_is_full_and_the_proxy_is_not() -> None:
    m = load.Measurement(target="t", case="h1", concurrency=50, client_busy_pct=95, proxy_pct=60)
    assert m.generator_bound
    m.proxy_pct = 97  # both sides full: the proxy is (also) the limit
    assert not m.generator_bound
    m.proxy_pct, m.client_busy_pct, m.h2load_pct = 60, 50, 92  # h2load alone fills its core
    assert m.generator_bound


def test_stat_line_with_a_hostile_command_name() -> None:
    # /proc/self/stat of `cat` (recorded), with the name replaced by one holding ") S 9 ".
    raw = (
        "12616 (a) S 9 (x)) R 12611 12611 5864 0 -1 4194304 100 0 0 0 7 5 3 2 20 0 1 0 109601 "
        "3133440 411 18446744073709551615 94407124373504"
    )
    assert procstat.parse_stat(raw) == procstat.StatLine(ppid=12611, ticks=17)


def test_tree_of_follows_children_only() -> None:
    table = {
        1: procstat.StatLine(ppid=0, ticks=0),
        10: procstat.StatLine(ppid=1, ticks=5),  # nginx master
        11: procstat.StatLine(ppid=10, ticks=50),  # its worker
        12: procstat.StatLine(ppid=11, ticks=1),
        20: procstat.StatLine(ppid=1, ticks=99),  # someone else
    }
    assert sorted(procstat.tree_of(table, 10)) == [10, 11, 12]
    assert procstat.tree_of(table, 42) == []


def test_ticks_delta_counts_a_newborn_process_from_zero() -> None:
    assert procstat.ticks_delta({10: 5, 11: 50}, {10: 7, 11: 80, 13: 4}) == {10: 2, 11: 30, 13: 4}


def test_busy_ticks_leave_out_idle_and_iowait() -> None:
    stat = (
        "cpu  100 5 50 9000 30 1 2 0 0 0\n"
        "cpu0 60 2 25 4500 15 0 1 0 0 0\n"
        "cpu1 40 3 25 4500 15 1 1 0 0 0\n"
        "intr 12345 0 0\n"
    )
    assert procstat.parse_busy(stat) == 100 + 5 + 50 + 1 + 2
    assert procstat.parse_busy(stat, [1]) == 40 + 3 + 25 + 1 + 1


def test_statm_rss_is_in_pages() -> None:
    assert procstat.parse_statm_rss("3133 411 300 5 0 200 0\n") == 411 * procstat.PAGE_SIZE


def test_established_inodes_by_local_port() -> None:
    net_tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n"
        "   0: 0100007F:B15F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
        "        0 37085 1 000000005e9e0ea7 100 0 0 10 0\n"  # listening on 45407
        "   1: 0100007F:B15F 0100007F:DC31 01 00000000:00000000 00:00000000 00000000     0"
        "        0 37107 1 0000000065cf9f85 20 4 30 10 -1\n"  # established on 45407
        "   2: 0100007F:DC31 0100007F:B15F 01 00000000:00000000 00:00000000 00000000     0"
        "        0 37108 1 0000000065cf9f86 20 4 30 10 -1\n"  # the client side of it
    )
    assert procstat.established_inodes(net_tcp, 0xB15F) == {37107}


def test_port443_config_without_workers_is_valid_today(tmp_path: Path) -> None:
    fx = targets.Fixture(
        work=tmp_path,
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
        pem=tmp_path / "combined.pem",
        proxy_cpus="0",
        client_cpus="1",
        python=Path("python"),
    )
    fx.cert.write_text("")
    fx.key.write_text("")
    toml = tmp_path / "p.toml"
    toml.write_text(targets.port443_toml(fx, port=8443, upstream_port=9000, workers="1"))
    config = load_config(toml)
    assert config.listen.https == 8443
    assert "[server]" not in toml.read_text()
    assert "workers = 2\n" in targets.port443_toml(fx, port=1, upstream_port=2, workers="2")
    assert 'workers = "auto"' in targets.port443_toml(fx, port=1, upstream_port=2, workers="auto")


def _m(
    target: str, case: str, cpu_us: float, other_pct: float = 0.0, h2load_pct: float = 0.0
) -> load.Measurement:
    return load.Measurement(
        target=target,
        case=case,
        concurrency=50,
        cpu_us=cpu_us,
        rps=1000,
        other_pct=other_pct,
        h2load_pct=h2load_pct,
    )


META = {
    "command": "python bench/run.py",
    "time": "2026-01-01 00:00 UTC",
    "mode": "full",
    "wall_s": 400.0,
    "nproc": 2,
    "cpu_model": "x",
    "kernel": "6.1",
    "loadavg_start": "0.1",
    "loadavg_end": "0.2",
    "proxy_cpus": "0",
    "client_cpus": "1",
    "seconds": 5.0,
    "warmup": 1.0,
    "sweep_seconds": 2.0,
    "versions": {"h2load": "1.52.0"},
}


@pytest.fixture
def page() -> str:
    results = report.Results(
        meta=META,
        targets=["Caddy 1p", "port443 1w"],
        skipped={"port443 2w": "this port443 does not accept [server] workers = 2 yet"},
        cases=[
            _m("Caddy 1p", "h1", 100.0),
            _m("port443 1w", "h1", 250.0, other_pct=40.0),
            _m("Caddy 1p", "tls-full", 600.0),
            _m("port443 1w", "tls-full", 630.0, h2load_pct=95.0),  # and the proxy core idle
        ],
        idle=[IdleMemory(target="port443 1w", count=1000, conns_per_process=[501, 499])],
    )
    assert report.ratio(results, "h1", "port443 1w") == 2.5
    assert report.ratio(results, "h2", "port443 1w") is None
    return report.markdown(results, figures=["benchmarks/cpu-per-request.png"])


def test_page_has_the_ratio_to_caddy_and_marks(page: str) -> None:
    assert "| case | Caddy 1p | port443 1w | port443 1w / Caddy |" in page
    assert "| HTTP/1.1 keep-alive over TLS | 100 | 250~ | 2.50x |" in page  # ~: busy machine
    assert "| full TLS 1.3 handshake + 1 request | 600 | 630* | 1.05x |" in page  # *: h2load


def test_page_says_which_issue_targets_hold(page: str) -> None:
    assert "| port443 1w | 2.50x | <= 2.0x | misses by 1.25x |" in page
    assert "| port443 1w | 1.05x | <= 1.1x | holds |" in page


def test_page_shows_the_worker_spread_and_the_skipped_workers(page: str) -> None:
    assert "- port443 1w: 1000 idle h1 connections held per process: 501 / 499" in page
    assert "- port443 2w: this port443 does not accept [server] workers = 2 yet" in page
    assert "![cpu-per-request](benchmarks/cpu-per-request.png)" in page
    assert "(not run: --no-sweep)" in page


def test_attackers_read_http2_frames_by_their_headers_across_reads() -> None:
    """What bench/abuse.py reports an HTTP/2 attacker got: responses, resets, GOAWAY."""
    frames = (
        HeadersFrame(1, data=b"\x88", flags=["END_HEADERS"]).serialize()
        + RstStreamFrame(3, error_code=8).serialize()
        + GoAwayFrame(0, last_stream_id=3, error_code=11).serialize()
    )
    reader = attacks.FrameReader()
    assert reader.ending() == "closed without GOAWAY"
    for at in range(0, len(frames), 5):  # frame headers split across reads
        reader.feed(frames[at : at + 5])
    assert (reader.heads, reader.resets) == (1, 1)
    assert reader.ending() == "GOAWAY ENHANCE_YOUR_CALM"
    reader.feed(GoAwayFrame(0, error_code=0xFF).serialize())
    assert reader.ending() == "GOAWAY 255"  # a code h2 does not name


def test_attackers_read_http1_responses_whole() -> None:
    answers = io.BytesIO(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 5\r\n\r\nslow!"
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    )
    assert [attacks.read_status(answers), attacks.read_status(answers)] == [429, 200]
