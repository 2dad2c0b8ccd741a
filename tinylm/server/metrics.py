"""Prometheus metrics of the server (/metrics), in a registry of its own so several apps can live in one process.

Names follow vLLM's where one exists (tinylm: instead of vllm:), so dashboards carry over.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tinylm.engine.sequence import StepOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tinylm:requests", "Requests received, by route and HTTP status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("tinylm:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tinylm:generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("tinylm:request_success", "Finished requests, by finish reason", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("tinylm:time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tinylm:inter_token_latency_seconds", "Time between two tokens of one request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        waiting = Gauge("tinylm:num_requests_waiting", "Requests queued for the engine", registry=r)
        running = Gauge("tinylm:num_requests_running", "Requests in the running batch", registry=r)
        usage = Gauge("tinylm:kv_cache_usage_perc", "Fraction of KV cache blocks in use", registry=r)
        preemptions = Gauge("tinylm:num_preemptions", "Sequences preempted so far (recomputed later)", registry=r)
        hits = Gauge("tinylm:prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r)
        waiting.set_function(lambda: engine.num_waiting)
        running.set_function(lambda: engine.num_running)
        usage.set_function(lambda: engine.blocks.usage)
        preemptions.set_function(lambda: engine.scheduler.num_preemptions)
        hits.set_function(lambda: engine.blocks.hits)
        compiling = Gauge("tinylm:compile_in_progress", "1 while a decode graph is built in the background (batched "
                          "steps decode eagerly until it is ready), else 0", registry=r)
        compiling.set_function(lambda: float(engine.compiling))
        if engine.drafter is not None:  # speculative decoding (vLLM's counters)
            drafts = Gauge("tinylm:spec_decode_num_draft_tokens", "Draft tokens checked so far", registry=r)
            accepted = Gauge("tinylm:spec_decode_num_accepted_tokens", "Draft tokens accepted so far", registry=r)
            drafts.set_function(lambda: engine.drafter.num_proposed)
            accepted.set_function(lambda: engine.drafter.num_accepted)

    def on_output(self, output: StepOutput, since_arrival: float, since_last: float | None) -> None:
        """Called on the event loop for every token the engine thread hands over (AsyncEngine._hand_over)."""
        if output.token_id is not None:
            self.generation_tokens.inc()
            if since_last is None:
                self.ttft.observe(since_arrival)
            else:
                self.itl.observe(since_last)
        if output.finish_reason is not None:
            self.prompt_tokens.inc(output.num_prompt_tokens)
            self.finished.labels(output.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
