"""Fast in-process tests of the pieces behind `workers`: the config key and the merge of the
workers' metrics into one exposition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config_load import ConfigError, parse_config
from proxy.metrics import merge_expositions

SITE = '[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n'


def _workers(value: str) -> int:
    return parse_config(f"[server]\nworkers = {value}\n{SITE}", Path("x.toml")).server.workers


def test_workers_default_number_and_auto() -> None:
    assert parse_config(SITE, Path("x.toml")).server.workers == 1
    assert _workers("3") == 3
    assert _workers('"auto"') == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", '"many"', "2.5", "true", "100000"])
def test_bad_worker_counts_are_refused_with_the_line(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _workers(value)
    assert caught.value.problems == [
        f'x.toml:2: server.workers: must be "auto" or an integer from 1 to 1024, got {value}'
    ]


WORKER_1 = """\
# HELP port443_requests_total Requests.
# TYPE port443_requests_total counter
port443_requests_total{site="a",status="200"} 3.0
port443_requests_created{site="a",status="200"} 100.0
# HELP port443_open_connections Open.
# TYPE port443_open_connections gauge
port443_open_connections 2.0
# HELP port443_certificate_expiry_timestamp_seconds Expiry.
# TYPE port443_certificate_expiry_timestamp_seconds gauge
port443_certificate_expiry_timestamp_seconds{cert="a"} 2000.0
# HELP port443_request_duration_seconds Duration.
# TYPE port443_request_duration_seconds histogram
port443_request_duration_seconds_bucket{le="0.1",site="a"} 1.0
port443_request_duration_seconds_bucket{le="+Inf",site="a"} 3.0
port443_request_duration_seconds_count{site="a"} 3.0
port443_request_duration_seconds_sum{site="a"} 0.5
"""
WORKER_2 = """\
# HELP port443_requests_total Requests.
# TYPE port443_requests_total counter
port443_requests_total{site="a",status="200"} 4.0
port443_requests_created{site="a",status="200"} 90.0
port443_requests_total{site="a",status="502"} 1.0
# HELP port443_open_connections Open.
# TYPE port443_open_connections gauge
port443_open_connections 5.0
# HELP port443_certificate_expiry_timestamp_seconds Expiry.
# TYPE port443_certificate_expiry_timestamp_seconds gauge
port443_certificate_expiry_timestamp_seconds{cert="a"} 1000.0
# HELP port443_request_duration_seconds Duration.
# TYPE port443_request_duration_seconds histogram
port443_request_duration_seconds_bucket{le="0.1",site="a"} 2.0
port443_request_duration_seconds_bucket{le="+Inf",site="a"} 2.0
port443_request_duration_seconds_count{site="a"} 2.0
port443_request_duration_seconds_sum{site="a"} 0.25
"""


def test_merged_metrics_add_up_counts_and_keep_the_earliest_facts() -> None:
    merged = merge_expositions([WORKER_1, WORKER_2]).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(merged)
        for sample in family.samples
    }
    site = (("site", "a"),)
    assert samples["port443_requests_total", (*site, ("status", "200"))] == 7
    assert samples["port443_requests_total", (*site, ("status", "502"))] == 1
    assert samples["port443_requests_created", (*site, ("status", "200"))] == 90
    assert samples["port443_open_connections", ()] == 7
    assert samples["port443_certificate_expiry_timestamp_seconds", (("cert", "a"),)] == 1000
    assert samples["port443_request_duration_seconds_bucket", (("le", "0.1"), *site)] == 3
    assert samples["port443_request_duration_seconds_bucket", (("le", "+Inf"), *site)] == 5
    assert samples["port443_request_duration_seconds_sum", site] == 0.75
    assert "# TYPE port443_request_duration_seconds histogram" in merged
