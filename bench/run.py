#!/usr/bin/env python3
"""Benchmark port443 against nginx, HAProxy and Caddy on loopback; write docs/benchmarks.md.

    python bench/run.py            # everything, about 6-9 minutes on 2 cores
    python bench/run.py --quick    # a smoke run

For each target (Caddy, nginx, HAProxy, port443 with each --workers count) in turn: start it
pinned to the proxy CPUs in front of the one nginx backend, check it, measure its RSS with idle
connections, run the load cases and the concurrency sweep with h2load on the client CPUs
(port443 also HTTP/3 beside HTTP/2 with bench/pyclient.py: h2load has no HTTP/3), stop it.
Then port443's RSS while 1 GB streams each way. Every process the bench starts is its own
process group and is stopped on exit, Ctrl-C, SIGTERM or failure.

Rooms: targets.py (how each system starts), load.py (h2load runs and /proc accounting,
procstat.py), memory.py (RSS), report.py (the page and figures), procs.py (process groups).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `proxy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load, memory, report, targets
from bench.procs import BenchError, Processes, log, sigterm_as_exit

REPO = Path(__file__).resolve().parent.parent
KINDS = ("caddy", "nginx", "haproxy", "port443")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: short runs, fewer points")
    p.add_argument("--targets", default=",".join(KINDS), help="comma list of " + ", ".join(KINDS))
    p.add_argument("--workers", default="1,2", help="port443 worker counts, e.g. 1,2,4 or 1,auto")
    p.add_argument("--cases", default=",".join(c.name for c in load.CASES), help="comma list")
    p.add_argument("--seconds", type=float, help="seconds per measured run (5; quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up run per case (1; quick 0.5)")
    p.add_argument("--sweep", help="sweep concurrencies (1,10,50,200; quick 1,50)")
    p.add_argument("--sweep-seconds", type=float, help="seconds per sweep point (2; quick 1)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--idle", type=int, help="idle connections per protocol (1000; quick 200)")
    p.add_argument("--stream-mb", type=int, help="MB streamed each way (1024; quick 128)")
    p.add_argument("--no-memory", action="store_true", help="skip idle-RSS and streaming runs")
    two = (os.cpu_count() or 1) >= 2
    p.add_argument("--proxy-cpus", default="0", help="CPUs of the system under test (0)")
    p.add_argument("--client-cpus", default="1" if two else "0", help="CPUs of h2load+backend")
    p.add_argument(
        "--python",
        type=Path,
        default=Path(sys.executable),
        help="runs port443 (make bench: the distribution's python3, built with PGO and LTO)",
    )
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--report-only", type=Path, metavar="JSON", help="rebuild the page from JSON")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = p.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds or (1.0 if quick else 5.0)
    args.warmup = args.warmup or (0.5 if quick else 1.0)
    args.sweep = [int(x) for x in (args.sweep or ("1,50" if quick else "1,10,50,200")).split(",")]
    args.sweep_seconds = args.sweep_seconds or (1.0 if quick else 2.0)
    args.idle = args.idle or (200 if quick else 1000)
    args.stream_mb = args.stream_mb or (128 if quick else 1024)
    args.targets = [x for x in args.targets.split(",") if x]
    args.workers = [x for x in args.workers.split(",") if x]
    names = {c.name: c for c in load.CASES}
    if bad := [x for x in args.targets if x not in KINDS]:
        p.error(f"unknown target(s) {bad}; choose from {', '.join(KINDS)}")
    if bad := [x for x in args.cases.split(",") if x not in names]:
        p.error(f"unknown case(s) {bad}; choose from {', '.join(names)}")
    if bad := [w for w in args.workers if not (w.isdigit() and int(w) > 0) and w != "auto"]:
        p.error(f"--workers takes positive counts or auto, not {bad}")
    args.cases = [names[x] for x in args.cases.split(",")]
    return args


def _version(argv: list[str], word: int) -> str:
    """The version in word `word` of a tool's first output line ("nginx/1.22.1" -> "1.22.1")."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    words = (out.stdout + out.stderr).split("\n", 1)[0].split()
    return words[word].rsplit("/", 1)[-1] if len(words) > word else "?"


def machine_meta(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, object]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "command": shlex.join(["python", "bench/run.py", *argv]),
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "proxy_cpus": args.proxy_cpus,
        "client_cpus": args.client_cpus,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "sweep_seconds": args.sweep_seconds,
        "versions": {
            "h2load": _version(["h2load", "--version"], 1),
            "nginx": _version(["nginx", "-v"], 2),
            "HAProxy": _version(["haproxy", "-v"], 2),
            "Caddy": _version(["caddy", "version"], 0),
            "OpenSSL": _version(["openssl", "version"], 1),
            "Python (port443)": f"{_version([str(args.python), '--version'], 1)} "
            f"({args.python.resolve()})",
        },
    }


class Session:
    """One bench run: the work dir, the processes, and the results as they come."""

    def __init__(self, args: argparse.Namespace, procs: Processes, work: Path) -> None:
        self.args = args
        self.procs = procs
        self.fx = targets.make_fixture(
            work, proxy_cpus=args.proxy_cpus, client_cpus=args.client_cpus, python=args.python
        )
        self.gen = load.LoadGenerator.prepare(work, args.client_cpus)
        self.backend = targets.start_backend(self.fx, procs)

    def measure(self, t: targets.Target, case: load.Case, seconds: float) -> load.Measurement:
        if not t.group.alive():
            raise BenchError(f"{t.label} died:\n{t.group.log_tail()}")
        m = self.gen.measure(
            case,
            target=t.label,
            port=t.port,
            proxy_pid=t.group.pid,
            backend_pid=self.backend.group.pid,
            seconds=seconds,
        )
        log(
            f"  {t.label} {case.name}: {m.rps:.0f} req/s, {report.fmt(m.cpu_us)} us CPU/req, "
            f"p99 {report.fmt(m.p99_ms, '.2f')} ms, proxy {m.proxy_pct:.0f}% h2load "
            f"{m.h2load_pct:.0f}% others {m.other_pct:.0f}% {m.note}"
        )
        return m

    def bench_target(self, kind: str, workers: str, results: report.Results) -> None:
        label = f"port443 {workers}w" if kind == "port443" else targets.PEER_STARTERS[kind][0]
        log(f"{label}: starting")
        try:
            t = targets.start_target(self.fx, self.procs, kind, self.backend.port, workers)
        except BenchError as exc:
            log(f"{label} skipped: {exc}")
            results.skipped[label] = str(exc).split("; log:")[0]
            return
        results.targets.append(t.label)
        try:
            results.checks[t.label] = targets.functional_checks(t, self.fx.work / "tmp")
            log(f"  checks: {results.checks[t.label]}")
            if not self.args.no_memory:
                idle = memory.idle_memory(t, self.args.idle)
                results.idle.append(idle)
                log(f"  idle RSS: {idle}")
            for case in self.args.cases:
                if case.handshake == "full" and self.gen.shim is None:
                    continue
                if case.pyclient and kind != "port443":
                    continue  # the HTTP/3 comparison is port443's own
                self.gen.warm_up(case, t.port, self.args.warmup)
                results.cases.append(self.measure(t, case, self.args.seconds))
            for proto in () if self.args.no_sweep else ("h1", "h2"):
                for c in self.args.sweep:
                    m = self.measure(t, load.sweep_case(proto, c), self.args.sweep_seconds)
                    results.sweep.append(m)
        except BenchError as exc:
            log(str(exc))
            results.skipped[t.label] = "failed during the run: " + str(exc).splitlines()[0]
        finally:
            self.procs.stop(t.group)

    def bench_streaming(self, results: report.Results) -> None:
        sink = targets.start_sink(self.fx, self.procs)
        try:
            t = targets.start_target(self.fx, self.procs, "port443", sink.port)
        except BenchError as exc:
            log(f"streaming runs skipped: {exc}")
            return
        try:
            for direction in ("download", "upload"):
                s = memory.stream_memory(
                    t,
                    direction=direction,
                    size=self.args.stream_mb * memory.MB,
                    client_cpus=self.args.client_cpus,
                    tmp=self.fx.work / "tmp",
                    timeout=120,
                )
                log(f"  stream {direction}: {s}")
                results.streams.append(s)
        finally:
            self.procs.stop(t.group)
            self.procs.stop(sink.group)


def run(args: argparse.Namespace, argv: Sequence[str]) -> report.Results:
    t0 = time.monotonic()
    results = report.Results(meta=machine_meta(args, argv), targets=[])
    work = Path(tempfile.mkdtemp(prefix="port443-bench-"))
    log(f"work dir {work}")
    try:
        with Processes() as procs:
            session = Session(args, procs, work)
            for kind in args.targets:
                for workers in args.workers if kind == "port443" else ["1"]:
                    session.bench_target(kind, workers, results)
            if not args.no_memory and "port443" in args.targets:
                session.bench_streaming(results)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results.meta["wall_s"] = time.monotonic() - t0
    results.meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return results


def save_json(results: report.Results) -> Path:
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dataclasses.asdict(results), indent=1) + "\n")
    return path


def load_json(path: Path) -> report.Results:
    raw = json.loads(path.read_text())
    return report.Results(
        meta=raw["meta"],
        targets=raw["targets"],
        skipped=raw["skipped"],
        checks=raw["checks"],
        cases=[load.Measurement(**m) for m in raw["cases"]],
        sweep=[load.Measurement(**m) for m in raw["sweep"]],
        idle=[memory.IdleMemory(**m) for m in raw["idle"]],
        streams=[memory.StreamMemory(**m) for m in raw["streams"]],
    )


def write_report(results: report.Results, out: Path) -> None:
    figures = report.plots(results, out.parent / out.stem)
    rel = [str(f.relative_to(out.parent)) for f in figures]
    out.write_text(report.markdown(results, rel))
    log(f"wrote {out} and {len(figures)} figure(s)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.report_only:
            write_report(load_json(args.report_only), args.out)
            return 0
        with sigterm_as_exit():
            results = run(args, argv)
        log(f"raw results: {save_json(results)}")
        write_report(results, args.out)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
