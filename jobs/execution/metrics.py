"""The job's metrics, defined once: recorded by the driver through ``ray.util.metrics``, exported by Ray.

Ray's metrics agent on each node serves them in Prometheus format on the node's metrics export port
(``ray start --metrics-export-port``; Ray's dashboard and its Grafana dashboards read the same), with
the prefix ``ray_``: a counter ``kandinsky_render_images`` is scraped as
``ray_kandinsky_render_images_total``, a histogram as ``..._bucket`` / ``_sum`` / ``_count``. The
driver exports every ``metrics_report_interval_ms`` (Ray's default 10 s). Counters stay on the agent
after the job ends; gauges (pool sizes, queues) disappear about two intervals after it.

Every metric carries the tag ``run_id`` (one run = one series) next to Ray's own (``SessionName``,
``NodeAddress``...). Only the driver records (the runner's loop and the job): actors never import
Ray, and nothing here adds work to a model call. `MetricsRecorder` does nothing when Ray is not
connected (``--runner local``, a run with nothing pending).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.loggers import logger_for

logger = logger_for(__name__)

PREFIX = "kandinsky_render_"
# Seconds per image, from a tiny CPU model's milliseconds to a large image on a slow GPU.
SECONDS_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """One metric: its kind (counter, gauge, histogram), name (without the exported ``ray_`` prefix), tags, help."""

    kind: str
    name: str
    tags: tuple[str, ...]
    description: str

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (a counter's with Prometheus' ``_total``)."""
        return f"ray_{PREFIX}{self.name}" + ("_total" if self.kind == "counter" else "")


# The metric table: cluster/grafana-dashboard.json and README.md use these names.
METRICS = (
    MetricSpec(kind="counter", name="images", tags=("status", "mode"), description="images published by status, mode"),
    MetricSpec(kind="counter", name="image_errors", tags=("error_kind",), description="error images published by kind"),
    MetricSpec(kind="counter", name="shards_published", tags=(), description="shards whose marker was written"),
    MetricSpec(kind="counter", name="stage_busy_seconds", tags=("stage",), description="seconds of the stage's calls"),
    MetricSpec(kind="counter", name="stage_calls", tags=("stage",), description="calls the stage's actors finished"),
    MetricSpec(
        kind="counter",
        name="retries",
        tags=("stage", "kind"),
        description="work run again after an infrastructure failure: kind=call (its batches) or shard (whole)",
    ),
    MetricSpec(
        kind="counter",
        name="actor_restarts",
        tags=("stage",),
        description="actors that died or were killed past their call deadline (Ray restarts them)",
    ),
    MetricSpec(kind="gauge", name="pool_actors", tags=("stage", "state"), description="actors: state=total or ready"),
    MetricSpec(
        kind="gauge", name="queue_depth", tags=("stage",), description="batches waiting for the stage + in flight"
    ),
    MetricSpec(
        kind="gauge", name="run_images", tags=("state",), description="this run's images: state=total, done, errors"
    ),
    MetricSpec(kind="histogram", name="seconds_per_image", tags=("stage",), description="a call's seconds per image"),
)
METRIC_BY_NAME = {spec.name: spec for spec in METRICS}


class MetricsRecorder:
    """Records the job's metrics for run ``run_id``; a no-op unless Ray is connected when it is made."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._metrics: dict[str, Any] = {}
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util import metrics
        except ImportError:
            return
        kinds = {"counter": metrics.Counter, "gauge": metrics.Gauge}
        for spec in METRICS:
            tags = ("run_id", *spec.tags)
            name = PREFIX + spec.name
            if spec.kind == "histogram":
                metric = metrics.Histogram(name, spec.description, boundaries=list(SECONDS_BUCKETS), tag_keys=tags)
            else:
                metric = kinds[spec.kind](name, spec.description, tag_keys=tags)
            metric.set_default_tags({"run_id": run_id})
            self._metrics[spec.name] = metric

    @property
    def enabled(self) -> bool:
        """Whether values are recorded (Ray was connected)."""
        return bool(self._metrics)

    def add(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add ``value`` to counter ``name``."""
        if value > 0 and name in self._metrics:
            self._metrics[name].inc(value, tags=tags)

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set gauge ``name``."""
        if name in self._metrics:
            self._metrics[name].set(value, tags=tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Record one observation of histogram ``name``."""
        if name in self._metrics:
            self._metrics[name].observe(value, tags=tags)

    def published(self, counts: Any) -> None:
        """A shard part was published with ``counts`` (a `schemas.summary.Counts`): its images, errors, the shard."""
        for mode, statuses in counts.by_mode.items():
            for status, number in statuses.items():
                self.add("images", number, status=status, mode=mode)
        for kind, number in counts.errors_by_kind.items():
            self.add("image_errors", number, error_kind=kind)
        self.add("shards_published")
