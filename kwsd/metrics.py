"""Service metrics: Prometheus counters and gauges on a private registry, an optional /metrics endpoint, and
the same figures as a small dict for the retained MQTT status message."""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from kwsd import __version__

log = logging.getLogger(__name__)

# One inference step: ~1 ms for one stream on a fast CPU, up to ~200 ms for many streams on a small host.
STEP_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5)
# From the keyword's end to the wake event: the model's ~240 ms look-ahead plus one step and the capture block.
LATENCY_BUCKETS = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)


class Metrics:
    """All counters of one daemon instance, on a registry of its own (no clash between tests or reloads).

    The pipeline calls the small recording methods; ``summary()`` reads the same values back for the status
    topic; ``serve()`` exposes them to Prometheus.
    """

    def __init__(self, namespace: str = "kwsd") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._prefix = f"{namespace}_" if namespace else ""
        reg = self.registry
        self.detections = Counter(
            "detections",
            "Wake words detected and published",
            ["site", "keyword"],
            namespace=namespace,
            registry=reg,
        )
        self.rejected = Counter(
            "rejected_candidates",
            "Keyword candidates rejected (threshold, duration limits, refractory period)",
            ["site", "keyword"],
            namespace=namespace,
            registry=reg,
        )
        self.overruns = Counter(
            "audio_overruns",
            "Audio blocks lost because the ring buffer was full or the device overran",
            ["input"],
            namespace=namespace,
            registry=reg,
        )
        self.reopens = Counter(
            "device_reopens",
            "Capture devices reopened after an error or unplug",
            ["input"],
            namespace=namespace,
            registry=reg,
        )
        self.broker_reconnects = Counter(
            "broker_reconnects",
            "Connections to the MQTT broker re-established after a loss",
            namespace=namespace,
            registry=reg,
        )
        self.outbox_depth = Gauge(
            "outbox_depth",
            "Messages waiting in the MQTT outbox",
            namespace=namespace,
            registry=reg,
        )
        self.step_seconds = Histogram(
            "inference_step_seconds",
            "Wall time of one batched inference step (all streams)",
            buckets=STEP_BUCKETS,
            namespace=namespace,
            registry=reg,
        )
        self.real_time_factor = Gauge(
            "real_time_factor",
            "Processing time divided by audio time (below 1 keeps up)",
            namespace=namespace,
            registry=reg,
        )
        self.streams = Gauge("streams", "Audio streams being decoded", namespace=namespace, registry=reg)
        self.provider = Gauge("execution_provider", "The onnxruntime execution provider running the model (1)",
                              ["provider"], namespace=namespace, registry=reg)
        self.input_up = Gauge(
            "input_up",
            "1 while the input delivers audio, 0 while its device is missing or failing",
            ["input"],
            namespace=namespace,
            registry=reg,
        )
        self.broker_connected = Gauge(
            "broker_connected",
            "1 while connected to the MQTT broker",
            namespace=namespace,
            registry=reg,
        )
        self.wake_latency = Histogram(
            "wake_latency_seconds",
            "From the end of the keyword in the audio to its wake event",
            buckets=LATENCY_BUCKETS,
            namespace=namespace,
            registry=reg,
        )
        self.published = Counter(
            "published_messages",
            "MQTT messages the broker acknowledged",
            namespace=namespace,
            registry=reg,
        )
        self.dropped = Counter(
            "dropped_messages",
            "MQTT messages dropped (outbox bound, refused by the broker)",
            namespace=namespace,
            registry=reg,
        )
        self.build_info = Info("build", "Version of kwsd and of the Python running it", namespace=namespace,
                               registry=reg)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        # process_cpu_seconds_total, process_resident_memory_bytes, ... and python_info, as every exporter has.
        reg.register(PROCESS_COLLECTOR)
        reg.register(PLATFORM_COLLECTOR)
        # The review loop (kwsd/review): verdicts fed back, and the effective wake rate over review.window_days.
        site_kw = ["site", "keyword"]
        self.false_wakes = Counter("false_wakes", "Wakes marked false_wake", site_kw, namespace=namespace,
                                   registry=reg)
        self.confirmed_wakes = Counter("confirmed_wakes", "Wakes marked wake (confirmed)", site_kw,
                                       namespace=namespace, registry=reg)
        self.missed_wakes = Counter("missed_wakes", "Missed wakes reported (near misses marked missed, reports)",
                                    site_kw, namespace=namespace, registry=reg)
        self.near_misses = Counter("near_misses", "Candidates kept as near misses (just below the threshold)",
                                   site_kw, namespace=namespace, registry=reg)
        self.effective_wake_rate = Gauge("effective_wake_rate",
                                         "(wakes - false wakes) / wakes requested over review.window_days",
                                         site_kw, namespace=namespace, registry=reg)
        self.review_errors = Counter("review_errors", "Wakes or near misses the archive could not keep",
                                     ["reason"], namespace=namespace, registry=reg)
        self.review_bytes = Gauge("review_bytes", "Bytes kept in the review archive", ["kind"],
                                  namespace=namespace, registry=reg)
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- recording (called by the pipeline; cheap and thread-safe) -----------------------------------------

    def detection(self, site: str, keyword: str) -> None:
        self.detections.labels(site=site, keyword=keyword).inc()

    def rejection(self, site: str, keyword: str, count: int = 1) -> None:
        self.rejected.labels(site=site, keyword=keyword).inc(count)

    def overrun(self, input_name: str, blocks: int = 1) -> None:
        if blocks > 0:
            self.overruns.labels(input=input_name).inc(blocks)

    def reopen(self, input_name: str, count: int = 1) -> None:
        if count > 0:
            self.reopens.labels(input=input_name).inc(count)

    def broker_reconnect(self, count: int = 1) -> None:
        if count > 0:
            self.broker_reconnects.inc(count)

    def set_outbox_depth(self, depth: int) -> None:
        self.outbox_depth.set(depth)

    def observe_step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def set_real_time_factor(self, rtf: float) -> None:
        self.real_time_factor.set(rtf)

    def set_streams(self, count: int) -> None:
        self.streams.set(count)

    def set_provider(self, provider: str) -> None:
        """The provider in use (``ModelSession.provider``); the previous one's series is removed."""
        self.provider.clear()
        self.provider.labels(provider=provider).set(1)

    def observe_wake_latency(self, seconds: float) -> None:
        self.wake_latency.observe(max(0.0, seconds))

    def set_input_up(self, input_name: str, up: bool) -> None:
        self.input_up.labels(input=input_name).set(1 if up else 0)

    def forget_input(self, input_name: str) -> None:
        """An input removed by a reload: its gauge goes (its counters stay, they are totals)."""
        try:
            self.input_up.remove(input_name)
        except KeyError:
            pass

    def read_broker_connected(self, read: Callable[[], bool]) -> None:
        """Take ``kwsd_broker_connected`` from ``read()`` at each scrape (the publisher's ``connected``)."""
        self.broker_connected.set_function(lambda: 1.0 if read() else 0.0)

    def add_published(self, count: int) -> None:
        if count > 0:
            self.published.inc(count)

    def add_dropped(self, count: int) -> None:
        if count > 0:
            self.dropped.inc(count)

    def verdict(self, site: str, keyword: str, verdict: str) -> None:
        """A verdict recorded in the review archive (``false_wake``, ``wake``, ``missed``)."""
        counter = {"false_wake": self.false_wakes, "wake": self.confirmed_wakes, "missed": self.missed_wakes}
        counter[verdict].labels(site=site, keyword=keyword).inc()

    def near_miss(self, site: str, keyword: str) -> None:
        self.near_misses.labels(site=site, keyword=keyword).inc()

    def set_effective_wake_rate(self, site: str, keyword: str, rate: float | None) -> None:
        """None removes the series (nothing requested in the window)."""
        if rate is None:
            try:
                self.effective_wake_rate.remove(site, keyword)
            except KeyError:
                pass
        else:
            self.effective_wake_rate.labels(site=site, keyword=keyword).set(rate)

    def review_error(self, reason: str) -> None:
        """``write`` (disk full, folder not writable) or ``queue_full`` (the archive fell behind)."""
        self.review_errors.labels(reason=reason).inc()

    def set_review_bytes(self, kind: str, size: int) -> None:
        self.review_bytes.labels(kind=kind).set(size)

    # --- reading -------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The same figures as plain JSON-ready values, for the retained status topic.

        ``detections``/``rejected``: {site: {keyword: n}}; ``overruns``/``reopens``: {input: n};
        ``inference_step``: count and mean in ms.
        """
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

        def by(name: str, *labels: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for (sample_name, label_items), value in samples.items():
                if sample_name != name:
                    continue
                values = dict(label_items)
                node = out
                for label in labels[:-1]:
                    node = node.setdefault(values[label], {})
                node[values[labels[-1]]] = int(value)
            return out

        def scalar(name: str) -> float:
            return samples.get((name, ()), 0.0)

        ns = self._prefix
        rates: dict[str, dict[str, float]] = {}
        for (sample_name, label_items), value in samples.items():
            if sample_name == f"{ns}effective_wake_rate":
                labels = dict(label_items)
                rates.setdefault(labels["site"], {})[labels["keyword"]] = round(value, 4)
        count = int(scalar(f"{ns}inference_step_seconds_count"))
        total = scalar(f"{ns}inference_step_seconds_sum")
        return {
            "detections": by(f"{ns}detections_total", "site", "keyword"),
            "rejected": by(f"{ns}rejected_candidates_total", "site", "keyword"),
            "overruns": by(f"{ns}audio_overruns_total", "input"),
            "reopens": by(f"{ns}device_reopens_total", "input"),
            "broker_reconnects": int(scalar(f"{ns}broker_reconnects_total")),
            "outbox_depth": int(scalar(f"{ns}outbox_depth")),
            "inference_step": {"count": count, "mean_ms": round(1000 * total / count, 3) if count else None},
            "real_time_factor": round(scalar(f"{ns}real_time_factor"), 4),
            "streams": int(scalar(f"{ns}streams")),
            "review": {
                "false_wakes": by(f"{ns}false_wakes_total", "site", "keyword"),
                "confirmed_wakes": by(f"{ns}confirmed_wakes_total", "site", "keyword"),
                "missed_wakes": by(f"{ns}missed_wakes_total", "site", "keyword"),
                "near_misses": by(f"{ns}near_misses_total", "site", "keyword"),
                "effective_wake_rate": rates,
                "errors": by(f"{ns}review_errors_total", "reason"),
            },
        }

    # --- HTTP endpoint -------------------------------------------------------------------------------------

    def serve(self, address: str = "127.0.0.1", port: int = 9750) -> tuple[str, int]:
        """Start the /metrics endpoint on its own thread; return the bound (address, port) (port 0 picks one).

        Raises OSError naming the address when it cannot bind (port in use, address not local).
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("metrics endpoint already running")
            try:
                server, thread = start_http_server(port, addr=address, registry=self.registry)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot serve metrics on {address}:{port}: {exc.strerror}") from exc
            self._server, self._thread = server, thread
        bound = server.server_address
        log.info("metrics endpoint on http://%s:%d/metrics", address, bound[1])
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop the endpoint if it runs; safe to call twice."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
