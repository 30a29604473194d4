"""The opt-in Prometheus endpoint (``metrics_port``): the status figures as counters and gauges.

The HTTP server runs in a thread of the server process, so it never reads the
broker's state: the broker loop publishes a status snapshot (``refresh``, at
most every ``METRICS_REFRESH_S``) and a scrape renders the latest one, a dict
nobody changes once published. One request is served at a time, each socket
read bounded by ``REQUEST_TIMEOUT_S``, so a scraper holds one connection at
most; it listens on ``metrics_host`` only (loopback by default).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from .config import ConfigError

log = logging.getLogger("ringfeed.metrics")

METRICS_REFRESH_S = 0.5
REQUEST_TIMEOUT_S = 5.0
SERVE_POLL_S = 0.5  # how soon an idle serving thread sees close()
CLOSE_TIMEOUT_S = REQUEST_TIMEOUT_S + 2 * SERVE_POLL_S
SLOT_STATES = ("free", "filling", "ready", "leased")
COUNTERS = (  # (status key, metric name without _total, help)
    ("batches_served", "ringfeed_batches_served", "Batches handed to clients."),
    ("samples_served", "ringfeed_samples_served", "Samples handed to clients (batches x batch size)."),
    ("samples_skipped", "ringfeed_samples_skipped", "Samples replaced after an op failed (on_error=skip)."),
    ("worker_restarts", "ringfeed_worker_restarts", "Workers replaced after they died or hung."),
    ("protocol_errors", "ringfeed_protocol_errors", "Malformed or unexpected messages received."),
)


def families(status: dict) -> list:
    """The metric families for one status snapshot (``Broker.status``)."""
    window = f"over the last {status['metrics_window_s']:.0f} s"
    out = [InfoMetricFamily("ringfeed", "The service's identity.",
                            value={"name": status["name"], "endpoint": status["endpoint"]}),
           GaugeMetricFamily("ringfeed_ready", "1 while the service serves batches.", int(status["ready"])),
           GaugeMetricFamily("ringfeed_uptime_seconds", "Seconds since the broker started.", status["uptime_s"]),
           GaugeMetricFamily("ringfeed_batch_size", "Samples per batch.", status["batch_size"]),
           GaugeMetricFamily("ringfeed_samples_per_second", f"Samples served per second, {window}.",
                             status["samples_per_s_window"]),
           GaugeMetricFamily("ringfeed_clients", "Connected clients.", status["clients"]),
           GaugeMetricFamily("ringfeed_workers", "Live worker processes.", status["workers"])]
    out += [CounterMetricFamily(name, text, status[key]) for key, name, text in COUNTERS]
    slots = GaugeMetricFamily("ringfeed_ring_slots", "Ring slots by state.", labels=["state"])
    for state in SLOT_STATES:
        slots.add_metric([state], status["slots"][state])
    out.append(slots)
    if status["ring_dry_share"] is not None:
        out.append(GaugeMetricFamily(
            "ringfeed_ring_dry_ratio", f"Share of the time with a client, {window}, that some client had "
            "read every batch it was sent and waited for more.", status["ring_dry_share"]))
    busy = GaugeMetricFamily("ringfeed_worker_busy_ratio", f"Share of the time a worker had tasks, {window}.",
                             labels=["worker"])
    batch = GaugeMetricFamily("ringfeed_worker_batch_seconds", f"Mean busy seconds per batch, {window}.",
                              labels=["worker"])
    for worker in status["per_worker"]:
        busy.add_metric([str(worker["worker"])], worker["busy_share"])
        if worker["batch_s"] is not None:
            batch.add_metric([str(worker["worker"])], worker["batch_s"])
    return [*out, busy, batch]


class StatusCollector:
    """A prometheus_client collector over the last published status."""

    def __init__(self):
        self._status: dict | None = None

    def publish(self, status: dict) -> None:
        self._status = status  # one reference swap: a scrape sees the old dict or the new one

    def collect(self):
        status = self._status
        return families(status) if status is not None else []


class _Server(HTTPServer):
    def __init__(self, address: tuple[str, int], handler, family: int):
        self.address_family = family
        super().__init__(address, handler)

    def handle_error(self, request, client_address):  # a scraper that hung up: its problem, not ours
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


def _handler(registry: CollectorRegistry):
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # each read and write on the connection

        def do_GET(self):
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "ringfeed serves /metrics only")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            log.debug("metrics: %s %s", self.address_string(), format % args)

    return Handler


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: a free one, see ``url``), from a daemon thread."""

    def __init__(self, host: str, port: int):
        registry = CollectorRegistry()
        self.collector = StatusCollector()
        registry.register(self.collector)
        family = socket.AF_INET6 if host != "localhost" and ipaddress.ip_address(host).version == 6 else socket.AF_INET
        try:
            self._server = _Server((host, port), _handler(registry), family)
        except OSError as exc:
            raise ConfigError(f"metrics_port: cannot listen on {host}:{port}: {exc}") from None
        self._server.timeout = SERVE_POLL_S  # handle_request waits this long for a connection
        self._published_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ringfeed-metrics", daemon=True)
        self._thread.start()
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics on %s: anyone who can reach it can read them", self.url)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def refresh(self, status) -> None:
        """Publish ``status()`` unless the last snapshot is younger than ``METRICS_REFRESH_S``."""
        now = time.monotonic()
        if now - self._published_at >= METRICS_REFRESH_S:
            self._published_at = now
            self.collector.publish(status())

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._server.handle_request()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(CLOSE_TIMEOUT_S)  # past it, a daemon thread still in a request ends with us
        self._server.server_close()
