"""Prometheus metrics, named like vLLM's under the `gorgon:` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from decoding import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        scheduler = engine.scheduler
        Gauge("gorgon:num_requests_running", "Requests being decoded", registry=self.registry).set_function(
            lambda: len(scheduler.running))
        Gauge("gorgon:num_requests_waiting", "Requests waiting for admission", registry=self.registry).set_function(
            lambda: len(scheduler.waiting))
        Gauge("gorgon:kv_cache_usage_perc", "Fraction of KV cache blocks in use", registry=self.registry).set_function(
            lambda: engine.cache_usage().usage)
        self.time_to_first_token = Histogram("gorgon:time_to_first_token_seconds", "Time to first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("gorgon:inter_token_latency_seconds", "Time between tokens",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("gorgon:prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.generation_tokens = Counter("gorgon:generation_tokens", "Tokens generated", registry=self.registry)
        self.request_success = Counter("gorgon:request_success", "Finished requests by finish reason",
                                       ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
