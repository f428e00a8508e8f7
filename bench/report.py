"""The report: docs/benchmarks.md (markdown tables) and its PNG figures (matplotlib).

Everything here is a pure function of the `Results` of one run, so the page can be rebuilt from
the JSON the run leaves in bench/results/ (`python bench/run.py --report-only FILE`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import CASES, Measurement
from bench.memory import IdleMemory, StreamMemory

# Issue 9's targets for port443's CPU per request, as a ratio to Caddy's in the same run.
TARGET_RATIO = {"h1": 2.0, "h2": 1.5, "tls-full": 1.1, "h1-100k": 1.5, "h2-100k": 1.5}
BUSY_PCT = 25.0  # other processes used this much of a core during a run: the row is noisy
CADDY = "Caddy 1p"


@dataclass
class Results:
    """One run of the bench, as the report needs it (and as the JSON keeps it)."""

    meta: dict[str, Any]
    targets: list[str]  # column labels, in start order
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why
    checks: dict[str, dict[str, str]] = field(default_factory=dict)
    cases: list[Measurement] = field(default_factory=list)
    sweep: list[Measurement] = field(default_factory=list)
    idle: list[IdleMemory] = field(default_factory=list)
    streams: list[StreamMemory] = field(default_factory=list)


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _marks(m: Measurement) -> str:
    return (
        ("!" if m.failed or m.note else "")
        + ("*" if m.generator_bound else "")
        + ("~" if m.other_pct >= BUSY_PCT else "")
    )


def _port443_labels(results: Results) -> list[str]:
    return [t for t in results.targets if t.startswith("port443")]


def ratio(results: Results, case: str, target: str) -> float | None:
    """target's CPU per request over Caddy's, in this run."""
    by = {(m.target, m.case): m for m in results.cases}
    mine, caddy = by.get((target, case)), by.get((CADDY, case))
    if mine is None or caddy is None or not mine.cpu_us or not caddy.cpu_us:
        return None
    return mine.cpu_us / caddy.cpu_us


def _case_grid(results: Results, cell: Callable[[Measurement], str], ratios: bool) -> list[str]:
    by = {(m.target, m.case): m for m in results.cases}
    p443 = _port443_labels(results) if ratios else []
    header = ["case", *results.targets, *(f"{t} / Caddy" for t in p443)]
    rows = []
    for case in CASES:
        if not any(m.case == case.name for m in results.cases):
            continue
        row = [case.title]
        row += [cell(by[(t, case.name)]) if (t, case.name) in by else "-" for t in results.targets]
        row += [fmt(ratio(results, case.name, t), ".2f") + "x" for t in p443]
        rows.append(row)
    return _table(header, rows)


def _targets_held(results: Results) -> list[str]:
    rows = []
    for case in CASES:
        goal = TARGET_RATIO.get(case.name)
        for t in _port443_labels(results):
            r = ratio(results, case.name, t)
            if goal is None or r is None:
                continue
            verdict = "holds" if r <= goal else f"misses by {r / goal:.2f}x"
            rows.append([case.title, t, f"{r:.2f}x", f"<= {goal:.1f}x", verdict])
    if not rows:
        return ["(no port443 and Caddy rows in this run)"]
    return _table(["case", "target", "CPU / Caddy", "issue 9 target", ""], rows)


def _memory(results: Results) -> list[str]:
    if not results.idle:
        return ["(not measured in this run: --no-memory)"]
    rows = [
        [
            m.target,
            fmt(m.base_mb, ".1f"),
            fmt(m.h1_mb_per_1000, ".1f"),
            fmt(m.h2_mb_per_1000, ".1f"),
            " / ".join(map(str, m.conns_per_process)) or "-",
            m.note,
        ]
        for m in results.idle
    ]
    count = results.idle[0].count if results.idle else 0
    header = [
        "target",
        "RSS at start (MB)",
        f"+ per 1,000 idle h1 TLS conns (MB, {count} opened)",
        f"+ per 1,000 idle h2 conns (MB, {count} opened)",
        "h1 conns per process",
        "note",
    ]
    return _table(header, rows)


def _streams(results: Results) -> list[str]:
    if not results.streams:
        return ["(not measured in this run: --no-memory, or port443 not among the targets)"]
    rows = [
        [
            s.direction,
            f"{s.size_mb:.0f}",
            f"{s.seconds:.1f}",
            f"{s.mb_per_s:.0f}",
            f"{s.base_mb:.1f}",
            f"{s.peak_mb:.1f}",
            f"{s.growth_mb:+.1f}",
            "ok" if s.ok else s.note,
        ]
        for s in results.streams
    ]
    header = ["direction", "MB", "s", "MB/s", "RSS before (MB)", "peak RSS (MB)", "growth", ""]
    return _table(header, rows)


def _workers(results: Results) -> list[str]:
    lines = []
    for m in results.cases:
        if m.target.startswith("port443") and len(m.cpu_split) > 1:
            split = " / ".join(f"{100 * s:.0f}%" for s in m.cpu_split)
            lines.append(f"- {m.target}, {m.case}: CPU split across processes {split}")
    for i in results.idle:
        if len(i.conns_per_process) > 1:
            lines.append(
                f"- {i.target}: {i.count} idle h1 connections held per process: "
                + " / ".join(map(str, i.conns_per_process))
            )
    for t, why in results.skipped.items():
        if t.startswith("port443"):
            lines.append(f"- {t}: {why}")
    return lines or ["- only one port443 process ran in this run"]


def _details(results: Results) -> list[str]:
    rows = [
        [
            m.target,
            m.case,
            fmt(m.rps),
            str(m.requests),
            f"{m.proxy_pct:.0f}",
            f"{m.h2load_pct:.0f}",
            f"{m.backend_pct:.0f}",
            f"{m.other_pct:.0f}",
            f"{m.tls}/{m.alpn}",
            m.note,
        ]
        for m in results.cases
    ]
    header = [
        "target",
        "case",
        "req/s",
        "requests",
        "proxy %",
        "h2load %",
        "backend %",
        "others %",
        "TLS/ALPN",
        "note",
    ]
    return _table(header, rows)


def _sweep_grid(results: Results) -> list[str]:
    if not results.sweep:
        return ["(not run: --no-sweep)"]
    points = sorted({m.concurrency for m in results.sweep})
    rows = []
    for proto in ("h1", "h2"):
        for t in results.targets:
            by = {
                m.concurrency: m
                for m in results.sweep
                if m.target == t and m.case.startswith(proto)
            }
            if by:
                rows.append(
                    [proto, t]
                    + [
                        f"{by[c].rps:.0f}{_marks(by[c])} / {fmt(by[c].p99_ms, '.1f')}"
                        if c in by
                        else "-"
                        for c in points
                    ]
                )
    return _table(["proto", "target", *(f"c={c}" for c in points)], rows)


def _run_notes(results: Results) -> list[str]:
    """Where the load generator was the bottleneck, and how busy the machine was."""
    bound = [f"{m.target} {m.case}" for m in results.cases if m.generator_bound]
    lines = [
        "- the load generator's core was saturated in: " + ", ".join(bound)
        if bound
        else "- the load generator's core was not saturated in any case row (no `*`)"
    ]
    others = [m.other_pct for m in results.cases]
    if others:
        lines.append(
            f"- other processes on the machine used {min(others):.0f}-{max(others):.0f}% of a "
            f"core during the case runs (median {sorted(others)[len(others) // 2]:.0f}%): "
            "they share the caches and cores with the system under test, which inflates every "
            "CPU figure; compare ratios within this run, not absolute values across runs"
        )
    return lines


def markdown(results: Results, figures: Sequence[str]) -> str:
    meta = results.meta
    out = [
        "# Benchmarks: port443 against nginx, HAProxy and Caddy",
        "",
        f"Generated by `{meta['command']}` on {meta['time']} ({meta['mode']} run, "
        f"{meta['wall_s']:.0f} s). Do not edit by hand: re-run the command.",
        "",
        "## Machine and method",
        f"- machine: {meta['nproc']} CPUs, {meta['cpu_model']}, kernel {meta['kernel']}; "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at the end",
        f"- pinning: the system under test on CPU {meta['proxy_cpus']}; h2load, curl and the "
        f"backend on CPU {meta['client_cpus']}",
        f"- load generator: h2load {meta['versions']['h2load']}, one thread (`-t 1`), pinned; "
        f"keep-alive cases {meta['seconds']:g} s each after a {meta['warmup']:g} s warm-up run; "
        "handshake cases: `-n` sized by a short calibration run to take about as long "
        "(`Connection: close`, one request per connection; the full-handshake case preloads "
        "`bench/templates/h2load-shim.c` so that h2load never resumes); the `Python client` "
        "rows (port443 only: h2load 1.52 has no HTTP/3) use `bench/pyclient.py`, aioquic for "
        "HTTP/3 and h2 for HTTP/2 in the same trio loop, so that the two differ only in the "
        "protocol; port443 runs with `[listen] http3 = true`",
        "- backend: nginx, 1 worker, plain HTTP on loopback: `/` answers `hello\\n` (6 bytes), "
        "`/100k` a 102,400-byte file",
        "- the same self-signed ECDSA P-256 certificate on every target; TLS 1.2 + 1.3, ALPN "
        "h2 and http/1.1; every proxy adds X-Forwarded-For/-Proto/-Host and HSTS",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "- peers: nginx with 1 worker, HAProxy with 1 thread, Caddy with GOMAXPROCS=1 "
        "(configs in `bench/templates/`); port443 as `python -m proxy run` from this checkout, "
        '`issuer = "files"`, access log and admin port off',
        "",
        "**CPU per request** is the CPU time (utime + stime from `/proc/<pid>/stat`, children "
        "included) of the target's whole process tree during the run divided by the requests "
        "that succeeded (by the connections, in the handshake cases). It does not depend on "
        "whether the load generator kept up, so it is the figure to compare; req/s and latency "
        "on two shared cores are moved by everything else that runs. Marks: `*` the load "
        "generator's side was the limit (its core >= 90% busy, by h2load, the backend or other "
        f"processes, while the proxy's core was not): req/s is a lower bound for that target; "
        f"`~` other processes used >= {BUSY_PCT:.0f}% "
        "of a core during the run (noisy; re-run); `!` failures, see the details.",
        "",
        *_run_notes(results),
        "",
        "## CPU microseconds per request (per connection for the handshake cases); lower is better",
        *_case_grid(results, lambda m: fmt(m.cpu_us) + _marks(m), ratios=True),
        "",
        "### Issue 9's targets (port443 / Caddy, CPU per request)",
        *_targets_held(results),
        "",
        "## Requests per second",
        *_case_grid(results, lambda m: fmt(m.rps) + _marks(m), ratios=False),
        "",
        "## Latency p50 / p99 (ms, from h2load --log-file)",
        *_case_grid(
            results, lambda m: f"{fmt(m.p50_ms, '.2f')} / {fmt(m.p99_ms, '.2f')}", ratios=False
        ),
        "",
        "## Concurrency sweep: req/s / p99 ms",
        "h1: c connections; h2: ceil(c/10) connections with up to 10 streams each "
        f"({meta['sweep_seconds']:g} s per point).",
        "",
        *_sweep_grid(results),
        "",
        "## Memory",
        "RSS (sum of `/proc/<pid>/statm` resident pages over the process tree) of a freshly "
        "started target, then the growth per 1,000 idle connections: first HTTP/1.1 keep-alive "
        "TLS connections, each after one request, then HTTP/2 connections on top of them.",
        "",
        *_memory(results),
        "",
        "port443 (1 worker) while one large body streams through it (HTTP/1.1 both sides; the "
        "upstream is `bench/sink.py`), RSS sampled every 50 ms:",
        "",
        *_streams(results),
        "",
        "## Workers",
        *_workers(results),
        "",
        "## Figures",
        *(f"![{Path(f).stem}]({f})" for f in figures),
        "",
        "## Details per run",
        *_details(results),
        "",
        "Functional checks (curl and openssl s_client; `resumes`: a second TLS 1.3 connection "
        "reports `Reused`):",
        "",
        *(
            f"- {t}: " + ", ".join(f"{k} {v}" for k, v in c.items())
            for t, c in results.checks.items()
        ),
        *(f"- {t}: skipped: {why}" for t, why in results.skipped.items()),
        "",
        "## Re-running",
        "```",
        "make bench                      # = .venv/bin/python bench/run.py, about 6-9 minutes",
        ".venv/bin/python bench/run.py --quick     # a smoke run, about 2 minutes",
        ".venv/bin/python bench/run.py --targets caddy,port443 --cases h1,h2 --no-sweep",
        "```",
        "`python bench/run.py --help` lists every option. Raw results go to "
        "`bench/results/bench-<time>.json`; `--report-only FILE` rebuilds this page from one.",
        "",
        "### The worker scaling curve on a bigger machine",
        "On a machine with more cores, give the proxy and the load generator separate core "
        "sets and list the worker counts; port443 runs once per count, with `workers = N` in "
        "its config, and `auto` means the cores of the proxy set:",
        "```",
        ".venv/bin/python bench/run.py --proxy-cpus 0-7 --client-cpus 8-15 \\",
        "    --workers 1,2,4,8 --targets port443 --cases h1,h2,tls-full --no-memory --no-sweep",
        "```",
        "req/s against N is the curve (it should grow near-linearly while the client set is "
        "not saturated: watch the `*` marks and give h2load more cores than the proxy), and the "
        "CPU per request should stay flat. The peers run with one worker each for the ratios.",
        "",
    ]
    return "\n".join(out)


def plots(results: Results, out_dir: Path) -> list[Path]:
    """The PNG figures; none (with the reason on stderr) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from bench.procs import log

        log("matplotlib is not installed (pip install -e '.[bench]'): no figures")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    cases = [c for c in CASES if any(m.case == c.name for m in results.cases)]
    if cases:
        by = {(m.target, m.case): m.cpu_us or 0.0 for m in results.cases}
        fig, ax = plt.subplots(figsize=(10, 4.8))
        width = 0.8 / max(1, len(results.targets))
        for i, t in enumerate(results.targets):
            xs = [j + i * width for j in range(len(cases))]
            ax.bar(xs, [by.get((t, c.name), 0.0) for c in cases], width, label=t)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c.name for c in cases])
        ax.set_ylabel("CPU µs per request (per connection: tls-*)")
        ax.set_title("CPU per request, lower is better")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "cpu-per-request.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)

    for proto in ("h1", "h2"):
        points = [m for m in results.sweep if m.case.startswith(proto)]
        if not points:
            continue
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for t in results.targets:
            mine = sorted((m for m in points if m.target == t), key=lambda m: m.concurrency)
            if mine:
                xs = [m.concurrency for m in mine]
                left.plot(xs, [m.rps for m in mine], marker="o", label=t)
                right.plot(xs, [m.p99_ms or 0.0 for m in mine], marker="o", label=t)
        for ax, label in ((left, "req/s"), (right, "p99 latency (ms)")):
            ax.set_xscale("log")
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(label)
        right.set_yscale("log")
        left.legend()
        fig.suptitle(f"{proto}: req/s and p99 against concurrency")
        fig.tight_layout()
        written.append(out_dir / f"sweep-{proto}.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    return written
