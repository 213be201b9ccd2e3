"""The load model servers publish on ``/metrics`` (Prometheus text), read with
prometheus-client's own parser.

==================  ===========================================  ==========================
server              waiting / running                            KV cache (0-1)
==================  ===========================================  ==========================
vLLM                ``vllm:num_requests_waiting`` /              ``vllm:kv_cache_usage_perc``
                    ``vllm:num_requests_running``                (older: ``vllm:gpu_cache_
                                                                 usage_perc``)
llama.cpp           ``llamacpp:requests_deferred`` /             ``llamacpp:kv_cache_usage_
(``--metrics``)     ``llamacpp:requests_processing``             ratio``
SGLang              ``sglang:num_queue_reqs`` /                  ``sglang:token_usage``
                    ``sglang:num_running_reqs``
TEI                 ``te_queue_size`` / -                        -
==================  ===========================================  ==========================

Several series of one gauge (one per model or engine) are summed; the KV cache is the
fullest of them.
"""

from __future__ import annotations

import math
from typing import Final

import httpx
from prometheus_client.parser import text_string_to_metric_families

from coordinator.core.heartbeat import ServerLoad
from worker_tasks.model_servers.http import headers

WAITING: Final = (
    "vllm:num_requests_waiting",
    "llamacpp:requests_deferred",
    "sglang:num_queue_reqs",
    "te_queue_size",
)
RUNNING: Final = (
    "vllm:num_requests_running",
    "llamacpp:requests_processing",
    "sglang:num_running_reqs",
)
KV_CACHE: Final = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "llamacpp:kv_cache_usage_ratio",
    "sglang:token_usage",
)
MAX_METRICS_BYTES: Final = 4 * 1024 * 1024


def parse_load(text: str) -> ServerLoad | None:
    """The load in a ``/metrics`` page; ``None`` when it has none of the gauges above."""
    sums: dict[str, float] = {}
    kv: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = sample.value
            if not math.isfinite(value) or value < 0:
                continue
            if sample.name in KV_CACHE:
                kv = max(kv or 0.0, min(value, 1.0))
            elif sample.name in WAITING or sample.name in RUNNING:
                sums[sample.name] = sums.get(sample.name, 0.0) + value
    if not sums and kv is None:
        return None
    waiting = sum(v for name, v in sums.items() if name in WAITING)
    running = sum(v for name, v in sums.items() if name in RUNNING)
    return ServerLoad(waiting=int(waiting), running=int(running), kv_cache_usage=kv)


def fetch_load(client: httpx.Client, url: str, api_key: str | None) -> ServerLoad | None:
    """``GET {url}/metrics`` parsed; ``None`` when the server publishes none (llama-server
    without ``--metrics``) or answers with something that is not Prometheus text."""
    try:
        response = client.get(f"{url}/metrics", headers=headers(api_key))
        response.raise_for_status()
        if len(response.content) > MAX_METRICS_BYTES:
            return None
        return parse_load(response.text)
    except (httpx.HTTPError, ValueError, TypeError, IndexError):
        return None
