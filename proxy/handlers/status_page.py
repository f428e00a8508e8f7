"""The status page: `instance_status` rendered as one self-contained HTML document.

Rendered on the server from a template shipped in the package (no build step, no script, no
external asset: it works offline and behind strict policies); a meta refresh keeps it
current. Every value from the outside (host names, URLs, errors) is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from importlib.resources import files
from string import Template
from typing import Any

REFRESH_SECONDS = 10
CHART_WIDTH, CHART_HEIGHT = 360, 110
# Red below this: 90-day certificates renew 30 days ahead and the local CA's 7-day ones
# 2.3 days ahead, so by then a renewal has failed for a while.
WARN_DAYS = 2
TEMPLATE = Template(
    files("proxy.handlers").joinpath("templates/status.html").read_text(encoding="utf-8")
)


def render_status_page(status: dict[str, Any]) -> str:
    traffic = status["traffic"]
    window = len(traffic["series"]) * traffic["slot_seconds"]
    return TEMPLATE.substitute(
        refresh=REFRESH_SECONDS,
        version=escape(status["version"]),
        summary=_summary(status),
        window=f"{window // 60} minutes",
        charts=_charts(traffic["series"]),
        sites=_sites(status["sites"]),
        certificates=_certificates(status["certificates"]),
        errors=_errors(traffic["recent_errors"], status["handshake_failures"]),
    )


def _summary(status: dict[str, Any]) -> str:
    traffic = status["traffic"]
    workers = status["workers"]
    running = sum(1 for w in workers if w["ready"])
    parts = [
        _state(status["ready"], "ready", f"not ready: {status['unready_reason']}"),
        f"up {_duration(status['uptime_seconds'])}",
        f"{running}/{len(workers)} workers ready" if workers else "single process",
        f"{traffic['requests']} requests, {traffic['errors']} errors",
        f"p50 {_ms(traffic['p50'])}, p99 {_ms(traffic['p99'])}",
    ]
    html = "".join(f"<span>{part}</span>" for part in parts)
    if workers:
        html += _table(
            ("worker", "pid", "state"),
            [
                (str(w["index"]), str(w["pid"] or "-"), _state(w["ready"], "ready", w["reason"]))
                for w in workers
            ],
        )
    return html


def _sites(sites: list[dict[str, Any]]) -> str:
    rows = []
    for site in sites:
        upstreams = "<br>".join(
            f"<code>{escape(u['url'])}</code> "
            + (
                '<span class="unknown">not used yet</span>'
                if u["up"] is None
                else _state(u["up"], "up", "down")
            )
            for u in site["upstreams"]
        )
        errors = f"{site['errors']} of {site['requests']}"
        if site["errors"]:
            errors = f'<span class="bad">{errors}</span>'
        rows.append((escape(", ".join(site["hosts"])), upstreams, errors))
    return _table(("hosts", "upstreams", "errors, last minutes"), rows)


def _certificates(reports: list[dict[str, Any]]) -> str:
    rows = []
    for cert in reports:
        days = cert["days_left"]
        if days is None:
            validity = f'<span class="bad">{escape(cert["missing"] or "-")}</span>'
        else:
            label = f"{days:.1f} days left" if days > 0 else "expired"
            validity = _state(days > WARN_DAYS, label, label) + f"<br>{_when(cert['not_after'])}"
        plan = cert["renewal_plan"]
        renewal = escape(plan) if plan else _when(cert["next_renewal"])
        window = cert["ari_window"]
        if window:
            renewal += f"<br><small>ARI {_when(window[0])} - {_when(window[1])}</small>"
        error = cert["last_error"]
        rows.append(
            (
                escape(", ".join(cert["names"])),
                escape(cert["issuer"]),
                validity,
                renewal,
                f'<span class="bad">{escape(error)}</span>' if error else "-",
            )
        )
    return _table(("names", "issuer", "validity", "next renewal", "last error"), rows)


def _errors(recent: list[dict[str, Any]], handshakes: dict[str, float]) -> str:
    if not recent and not handshakes:
        return "<p>None.</p>"
    html = ""
    if recent:
        html += _table(
            ("time", "site", "status", "request", "upstream"),
            [
                (
                    _when(datetime.fromtimestamp(e["time"], UTC).isoformat()),
                    escape(e["site"] or "-"),
                    str(e["status"]),
                    escape(f"{e['method']} {e['path']}"),
                    escape(e["upstream"] or "-"),
                )
                for e in reversed(recent)
            ],
        )
    if handshakes:
        html += "<p>TLS handshake failures since start: " + ", ".join(
            f"{escape(reason)} {int(count)}" for reason, count in sorted(handshakes.items())
        )
        html += "</p>"
    return html


def _charts(series: list[dict[str, Any]]) -> str:
    rates = _chart(
        "requests/s (blue), errors/s (red)",
        [("#1f5fbf", [p["requests_per_second"] for p in series]),
         ("#b00020", [p["errors_per_second"] for p in series])],
        unit="/s",
    )  # fmt: skip
    latency = _chart(
        "latency p50 (blue), p99 (orange)",
        [("#1f5fbf", [p["p50"] for p in series]), ("#d9822b", [p["p99"] for p in series])],
        unit="s",
    )
    return f'<div class="charts">{rates}{latency}</div>'


def _chart(caption: str, lines: list[tuple[str, list[float | None]]], unit: str) -> str:
    """An inline SVG line chart; a point without data (None) breaks its line."""
    top = max([v for _, values in lines for v in values if v is not None] + [0.0]) or 1.0
    pad = 3  # room for the round caps at the edges
    step = (CHART_WIDTH - 2 * pad) / max(len(lines[0][1]) - 1, 1)
    paths = []
    for color, values in lines:
        commands = []
        pen_down = False
        for i, value in enumerate(values):
            if value is None:
                pen_down = False
                continue
            y = CHART_HEIGHT - value / top * (CHART_HEIGHT - 4) - 2
            # a lone point is a zero-length segment, which a round cap draws as a dot
            move = "L" if pen_down else "M"
            commands.append(f"{move}{pad + i * step:.1f},{y:.1f}{'' if pen_down else ' h0'}")
            pen_down = True
        if commands:
            paths.append(
                f'<path d="{" ".join(commands)}" fill="none" stroke="{color}" '
                'stroke-width="2" stroke-linecap="round" stroke-linejoin="round"/>'
            )
    return (
        f'<figure><svg width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" aria-label="{caption}">'
        f'<text x="4" y="12" font-size="10" fill="#666">max {top:.3g}{unit}</text>'
        f"{''.join(paths)}</svg><figcaption>{caption}</figcaption></figure>"
    )


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Cells are HTML already (escaped by the callers)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _state(good: bool, good_text: str, bad_text: str | None) -> str:
    if good:
        return f'<span class="ok">{escape(good_text)}</span>'
    return f'<span class="bad">{escape(bad_text or "-")}</span>'


def _when(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {secs}s"
