"""Worker metrics: one /metrics on METRICS_PORT for all the processes `dramatiq workers` starts.

Each worker process writes its counters (ours from ``refunds.metrics`` and the dramatiq_*
ones below) to memory-mapped files in one folder (prometheus-client multiprocess mode);
an exposition process forked by dramatiq (``serve_worker_metrics``) sums them on scrape.

Why this module runs code at import: prometheus-client picks in-memory or multiprocess
values when it is first imported, so PROMETHEUS_MULTIPROC_DIR must be set before that.
``workers.broker`` imports this module first for that reason. The folder is emptied once
per `dramatiq` run (the first process of a run finds another run's mark), so counters of
an earlier run never add to this one's.

The scheduler's gauges are served from its own process (``serve_scheduler_metrics``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from refunds.errors import ConfigError
from refunds.settings import get_settings

RUN_MARK = ".run"


def _in_dramatiq_worker() -> bool:
    """True in the processes `dramatiq` forks (workers, exposition), not in its parent, tests or the scheduler."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return multiprocessing.parent_process() is not None and "dramatiq" in (argv0.name, argv0.parent.name)


def _run_id() -> str:
    """The `dramatiq` parent process this process belongs to: its pid and start time (pids are reused)."""
    ppid = os.getppid()
    try:
        started = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{ppid}:{started}"


def _empty_once_per_run(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    run = _run_id()
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mark = folder / RUN_MARK
        if not mark.exists() or mark.read_text() != run:
            for stale in folder.glob("*.db"):
                stale.unlink(missing_ok=True)
            mark.write_text(run)


def _prepare() -> Path | None:
    """Set up multiprocess mode in a dramatiq worker; the folder, or None elsewhere."""
    if not _in_dramatiq_worker():
        return None
    try:
        port = get_settings().metrics_port
    except ConfigError:
        return None  # setup_broker reports the malformed setting in one line
    folder = (os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("dramatiq_prom_db")
              or os.path.join(tempfile.gettempdir(), f"refunds-worker-metrics-{port}"))
    if "prometheus_client" in sys.modules and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        print("worker: prometheus_client was imported before workers.metrics; worker metrics stay per process",
              file=sys.stderr)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    _empty_once_per_run(Path(folder))
    return Path(folder)


MULTIPROC_DIR = _prepare()

import dramatiq  # noqa: E402  (after _prepare: see the module docstring)
from dramatiq.common import current_millis, q_name  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server  # noqa: E402

from refunds import logs, metrics  # noqa: E402

log = logging.getLogger(__name__)
DURATION_BUCKETS = metrics.LATENCY_BUCKETS + (60,)  # up to the actors' 60 s time limit


class WorkerMetrics(dramatiq.Middleware):
    """dramatiq_* metrics and the exposition fork, in place of ``dramatiq.middleware.prometheus``.

    Why not dramatiq's own middleware (2.x): it takes its folder, host and port from
    dramatiq_prom_* variables at import and its server dies with a traceback on a taken port
    (so no METRICS_PORT, METRICS_HOST, METRICS_PORT=0 or one-line error); its delayed-messages
    gauge has no multiprocess mode (a series per pid, growing with restarts) and is only
    decremented if the process that held the message also runs it, which with Redis it need
    not; its queue label is "refunds.DQ" for delayed messages; and its duration histogram is
    in milliseconds, a unit promtool rejects. The counter names are the same as its.
    """

    def __init__(self) -> None:
        self.started: dict[str, int] = {}
        self.delayed: set[str] = set()
        labels = ["queue_name", "actor_name"]
        # registry=None: in a worker the files are the registry; elsewhere (tests) they stay private
        self.messages = Counter("dramatiq_messages", "Messages processed", labels, registry=None)
        self.errors = Counter("dramatiq_message_errors", "Messages whose actor raised", labels, registry=None)
        self.retries = Counter("dramatiq_message_retries", "Messages re-enqueued for a retry", labels, registry=None)
        self.rejects = Counter("dramatiq_message_rejects", "Messages dead-lettered", labels, registry=None)
        self.inprogress = Gauge("dramatiq_messages_inprogress", "Messages being processed", labels,
                                registry=None, multiprocess_mode="livesum")
        self.delayed_inprogress = Gauge("dramatiq_delayed_messages_inprogress", "Delayed messages held in memory",
                                        labels, registry=None, multiprocess_mode="livesum")
        self.duration = Histogram("dramatiq_message_duration_seconds", "Time spent processing a message",
                                  labels, registry=None, buckets=DURATION_BUCKETS)

    @property
    def forks(self):
        if MULTIPROC_DIR is None or get_settings().metrics_port == 0:
            return []
        return [serve_worker_metrics]

    def after_process_boot(self, broker):
        metrics.initialise_worker_series()

    def after_worker_shutdown(self, broker, worker):
        if MULTIPROC_DIR is not None:
            multiprocess.mark_process_dead(os.getpid(), str(MULTIPROC_DIR))

    def after_ack(self, broker, message):
        self._release_delayed(message)

    def after_nack(self, broker, message):
        self._release_delayed(message)
        self.rejects.labels(q_name(message.queue_name), message.actor_name).inc()

    def after_enqueue(self, broker, message, delay):
        if "retries" in message.options:
            self.retries.labels(q_name(message.queue_name), message.actor_name).inc()

    def before_delay_message(self, broker, message):
        self.delayed.add(message.message_id)
        self.delayed_inprogress.labels(q_name(message.queue_name), message.actor_name).inc()

    def _release_delayed(self, message):
        """A delayed message leaves this process's memory when its delay-queue copy is acked:
        it is then on the ready queue, where any process may take it (so not at processing)."""
        if message.message_id in self.delayed and message.queue_name != q_name(message.queue_name):
            self.delayed.discard(message.message_id)
            self.delayed_inprogress.labels(q_name(message.queue_name), message.actor_name).dec()

    def before_process_message(self, broker, message):
        labels = (message.queue_name, message.actor_name)
        self.inprogress.labels(*labels).inc()
        self.started[message.message_id] = current_millis()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        labels = (message.queue_name, message.actor_name)
        started = self.started.pop(message.message_id, None)
        if started is not None:
            self.duration.labels(*labels).observe((current_millis() - started) / 1000)
            self.inprogress.labels(*labels).dec()
        self.messages.labels(*labels).inc()
        if exception is not None:
            self.errors.labels(*labels).inc()

    after_skip_message = after_process_message


def serve_worker_metrics() -> int:
    """The exposition process (a dramatiq fork): sums every worker process's files on each scrape."""
    logs.configure("worker-metrics", get_settings().log_level.upper())
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(MULTIPROC_DIR))
    host, port = get_settings().metrics_host, get_settings().metrics_port
    try:
        _, thread = start_http_server(port, host, registry)
    except OSError as exc:
        log.error("worker metrics: cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    log.info("worker metrics on http://%s:%d/metrics from %s", host, port, MULTIPROC_DIR)
    thread.join()
    return 0


def serve_scheduler_metrics(gauges: metrics.DatabaseGauges, port: int) -> None:
    """The scheduler's /metrics (a daemon thread): its database gauges plus its own process metrics."""
    from prometheus_client import REGISTRY

    REGISTRY.register(gauges)
    if port:
        start_http_server(port, get_settings().metrics_host, REGISTRY)


def read_queue_depth(client, queue: str) -> dict[tuple[str, str], int]:
    """Messages in one dramatiq Redis queue (blocking: call in a thread), by kind.

    ready: waiting for a worker; delayed: scheduled for later (retries, rate-limit waits);
    dead_letter: given up by dramatiq (the outbox sweep still owns the refund).
    """
    pipe = client.pipeline(transaction=False)
    pipe.llen(_queue_key(queue))
    pipe.hlen(_queue_key(queue, ".DQ.msgs"))
    pipe.zcard(_queue_key(queue, ".XQ"))
    ready, delayed, dead = pipe.execute()
    return {(queue, "ready"): ready, (queue, "delayed"): delayed, (queue, "dead_letter"): dead}


def oldest_ready_message_at(client, queue: str) -> datetime | None:
    """When the message at the head of the ready queue was made (blocking); None if empty.

    dramatiq's ready queue is a FIFO list, so every message behind the head is younger.
    """
    head = client.lindex(_queue_key(queue), 0)
    data = None if head is None else client.hget(_queue_key(queue, ".msgs"), head)
    if data is None:  # empty, or taken by a worker meanwhile
        return None
    return datetime.fromtimestamp(json.loads(data)["message_timestamp"] / 1000, timezone.utc)  # dramatiq's JSON encoding


def _queue_key(queue: str, suffix: str = "") -> str:
    """dramatiq's Redis key for a queue (its default namespace) or one of its companions."""
    return f"dramatiq:{queue}{suffix}"
