"""The [tracing] table: OpenTelemetry spans over OTLP/HTTP."""

from __future__ import annotations

import dataclasses

from proxy.config import TracingConfig
from proxy.config_load import convert
from proxy.config_load.reader import Reader, Table
from proxy.toml_lines import KeyPath

_TRACING_KEYS = tuple(f.name for f in dataclasses.fields(TracingConfig))


class TracingSections(Reader):
    def _tracing(self, root: Table) -> TracingConfig:
        key: KeyPath = ("tracing",)
        table = self._section(root, "tracing", _TRACING_KEYS)
        default = TracingConfig()
        return TracingConfig(
            enabled=self._value(table, key, "enabled", default.enabled, convert.boolean),
            endpoint=self._value(table, key, "endpoint", default.endpoint, convert.http_url),
            service_name=self._value(
                table, key, "service_name", default.service_name, convert.text
            ),
            sample_ratio=self._value(
                table, key, "sample_ratio", default.sample_ratio, convert.ratio
            ),
            headers=self._value(table, key, "headers", default.headers, convert.fields),
            trust_incoming=self._value(
                table, key, "trust_incoming", default.trust_incoming, convert.boolean
            ),
        )
