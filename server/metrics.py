"""Prometheus metrics, named like vLLM's under the `gorgon:` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from decoding import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        Gauge("gorgon:num_requests_running", "Requests being decoded", registry=self.registry).set_function(
            lambda: engine.stats().num_running)
        Gauge("gorgon:num_requests_waiting", "Requests waiting for admission", registry=self.registry).set_function(
            lambda: engine.stats().num_waiting)
        Gauge("gorgon:kv_cache_usage_perc", "Fraction of KV cache blocks in use", registry=self.registry).set_function(
            lambda: engine.cache_usage().usage)
        Gauge("gorgon:kv_cache_used_blocks", "KV cache blocks in use", registry=self.registry).set_function(
            lambda: engine.cache_usage().num_used_blocks)
        self.time_to_first_token = Histogram("gorgon:time_to_first_token_seconds", "Time to first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("gorgon:inter_token_latency_seconds", "Time between tokens",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("gorgon:prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.generation_tokens = Counter("gorgon:generation_tokens", "Tokens generated", registry=self.registry)
        self.request_success = Counter("gorgon:request_success", "Finished requests by finish reason",
                                       ["finished_reason"], registry=self.registry)
        self.registry.register(PrefixCacheCollector(engine))
        if engine.speculation is not None:
            self.registry.register(SpeculationCollector(engine.speculation.counters))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PrefixCacheCollector:
    """Prompt tokens looked up in the prefix cache and found there (vLLM's names), read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        yield CounterMetricFamily("gorgon:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=queries)
        yield CounterMetricFamily("gorgon:prefix_cache_hits", "Prompt tokens found in the prefix cache", value=hits)


class SpeculationCollector:
    """Speculative decoding's counters, read from the engine at scrape time (vLLM's spec_decode names)."""

    def __init__(self, counters):
        self.counters = counters

    def collect(self):
        c = self.counters
        yield CounterMetricFamily("gorgon:spec_decode_num_drafts", "Verified proposals", value=c.num_drafts)
        yield CounterMetricFamily("gorgon:spec_decode_num_draft_tokens", "Draft tokens proposed and verified",
                                  value=c.num_draft_tokens)
        yield CounterMetricFamily("gorgon:spec_decode_num_accepted_tokens", "Draft tokens the target kept",
                                  value=c.num_accepted_tokens)
        per_position = CounterMetricFamily("gorgon:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens kept, by position in the draft", labels=["position"])
        for position, count in enumerate(c.accepted_per_position):
            per_position.add_metric([str(position)], count)
        yield per_position
        yield GaugeMetricFamily("gorgon:spec_decode_acceptance_rate", "Accepted over drafted tokens",
                                value=c.acceptance_rate)
        yield GaugeMetricFamily("gorgon:spec_decode_mean_acceptance_length",
                                "Tokens per verification: 1 + accepted / drafts", value=c.mean_acceptance_length)
