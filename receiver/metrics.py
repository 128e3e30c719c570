"""Prometheus metrics, one registry per app (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.callbacks = Counter(
            "receiver_callbacks", "Callbacks received, by outcome", ["outcome"], registry=r
        )
        self.verification_failures = Counter(
            "receiver_verification_failures",
            "Callbacks refused by verification",
            ["reason"],
            registry=r,
        )
        self.submissions = Counter(
            "receiver_submissions", "Jobs submitted to VLM Run, by outcome", ["outcome"], registry=r
        )
        self.deliveries = Counter(
            "receiver_deliveries",
            "Delivery attempts, by sink and outcome",
            ["sink", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "receiver_delivery_seconds",
            "Duration of one delivery attempt",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.recoveries = Counter(
            "receiver_reconciler_recoveries", "Results recovered by polling VLM Run", registry=r
        )
        self.polls = Counter(
            "receiver_reconciler_polls", "Polls of VLM Run, by outcome", ["outcome"], registry=r
        )
        self.timed_out = Counter(
            "receiver_jobs_timed_out", "Jobs marked timed_out past their deadline", registry=r
        )
        self.outbox_due = Gauge("receiver_outbox_due", "Deliveries due now", registry=r)
        self.outbox_oldest_age = Gauge(
            "receiver_outbox_oldest_due_seconds", "Age of the oldest due delivery", registry=r
        )
        self.dead = Gauge("receiver_deliveries_dead", "Dead (replayable) deliveries", registry=r)
        self.jobs_outstanding = Gauge(
            "receiver_jobs_outstanding", "Jobs without a terminal status", registry=r
        )
        self.http_limits = Counter(
            "receiver_http_limits",
            "Connections closed or refused by a server limit, by reason",
            ["reason"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "receiver_sink_circuit_open",
            "1 while a sink's circuit breaker is open",
            ["sink"],
            registry=r,
        )
