"""The status of an instance as one JSON-able document: `/status.json`, and the data the
status page renders.

Assembled from what already exists: the configuration (sites, upstreams), the certificate
reports of `port443 certs`, the metrics exposition (upstream health, handshake failures) and
the traffic history. A supervisor passes its workers' merged metrics and traffic, so one
function serves a lone process and a whole instance. Nothing secret goes in: no keys, no
tokens, no query strings.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.certs.report import certificate_reports
from proxy.config import Config
from proxy.traffic import summarize


def instance_status(
    config: Config,
    *,
    started: float,
    exposition: bytes,
    traffic: dict[str, Any],
    workers: list[dict[str, Any]],
    unready: str | None,
    now: float | None = None,
) -> dict[str, Any]:
    """`workers` is empty for a lone process; each entry has index, pid, ready, reason."""
    now = time.time() if now is None else now
    samples = _samples(exposition)
    up = samples.get("port443_upstream_up", {})
    recent = summarize(traffic, now)
    sites = []
    for site in config.sites:
        upstreams = []
        for upstream in site.upstreams:  # up: the latest request got a response (metrics)
            state = up.get((("upstream", upstream.url),))
            upstreams.append({"url": upstream.url, "up": None if state is None else state == 1})
        counts = recent["sites"].get(site.name, {"requests": 0, "errors": 0})
        sites.append(
            {"name": site.name, "hosts": list(site.hosts), "upstreams": upstreams, **counts}
        )
    handshakes = samples.get("port443_tls_handshake_failures_total", {})
    now_dt = datetime.fromtimestamp(now, UTC)
    return {
        "version": proxy.__version__,
        "pid": os.getpid(),
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "uptime_seconds": now - started,
        "now": now_dt.isoformat(),
        "ready": unready is None,
        "unready_reason": unready,
        "workers": workers,
        "sites": sites,
        "certificates": [report.to_json(now_dt) for report in certificate_reports(config)],
        "traffic": recent,
        "handshake_failures": {
            dict(labels)["reason"]: value for labels, value in handshakes.items() if value
        },
    }


def _samples(exposition: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> sorted labels -> value."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples
