"""Watching a run: a live progress line on terminals, structured progress log lines, a final summary table."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from jobs.options.run_options import LOG_FORMATS
from schemas.loggers import logger_for
from schemas.text import printable

logger = logger_for("progress")

TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Progress:
    """Counts results as they arrive and shows them, with the run's phases.

    On a terminal (``live``) it redraws one status line on ``stream``: images done / total,
    images/s, ETA and errors (before the first image: the current phase). Elsewhere (cluster logs,
    ``ray job logs``) it stays off the stream and emits log records: a line per phase as it
    happens (`phase`: planning, starting Ray, each stage's actors starting and up, a stage waiting
    for capacity, the first image, publishing), each with the seconds since the job started, and,
    from `begin` to `close`, a heartbeat thread makes sure a line comes at least every
    ``log_every_s`` seconds whatever the job is doing: ``running: 12/40 images ... | <status>``, the
    status being what the runner last reported (`status`: actors up per stage, calls running,
    what a waiting stage lacks). Each record carries its numbers as structured fields
    (``record.progress``). ``clock`` is injectable so tests need no sleeping.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = _isatty(self.stream) if live is None else live
        self.log_every_s = log_every_s
        self.clock = clock
        self.run_id = ""
        self.num_images = 0
        self.num_done = 0
        self.num_errors = 0
        self.current = ""  # the latest phase or status
        self._begun = time.time()  # epoch seconds the job started (`begin`): phase lines count from it
        self._started: float | None = None  # clock reading at `start`
        self._last_log = 0.0
        self._last_draw = float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def begin(self, *, started_at: float | None = None) -> None:
        """The job started at epoch seconds ``started_at`` (default now): start the heartbeat (log mode)."""
        self._begun = time.time() if started_at is None else started_at
        self._last_log = self.clock()
        if self.live or not math.isfinite(self.log_every_s) or self._heartbeat is not None:
            return
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
        self._heartbeat.start()

    def close(self) -> None:
        """Stop the heartbeat."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None

    def phase(self, text: str) -> None:
        """Something happened (``text``): a log line now (log mode), the live line's text until images arrive."""
        self.current = text
        if self.live:
            self._draw(force=True)
        elif math.isfinite(self.log_every_s):
            self._log("phase", message=f"{text} ({self.elapsed():.1f} s)", event=text)

    def status(self, text: str) -> None:
        """What is going on now; shown by the next periodic line."""
        self.current = text

    def elapsed(self) -> float:
        """Seconds since the job started (`begin`)."""
        return max(time.time() - self._begun, 0.0)

    def start(self, *, run_id: str, num_images: int) -> None:
        """Begin a run that has ``num_images`` images to give a result (rendered or refused)."""
        self.run_id, self.num_images = run_id, num_images
        self.num_done, self.num_errors = 0, 0
        self._started = self.clock()
        self._log("started")
        self._draw(force=True)

    def update(self, *, num_done: int, num_errors: int = 0) -> None:
        """Count ``num_done`` images that just got a result, ``num_errors`` of them errors."""
        self.num_done += num_done
        self.num_errors += num_errors
        if not self.live and self.clock() - self._last_log >= self.log_every_s:
            self._log("running")
        self._draw()

    def finish(self) -> None:
        """End the run: final line on terminals, a final structured record everywhere."""
        self._draw(force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
        self._log("finished")

    def snapshot(self) -> dict[str, Any]:
        """The numbers shown: done/total images, errors, elapsed seconds, images/s, ETA seconds (None if unknown)."""
        elapsed = max(self.clock() - self._started, 0.0) if self._started is not None else 0.0
        rate = self.num_done / elapsed if elapsed > 0 and self.num_done else 0.0
        remaining = max(self.num_images - self.num_done, 0)
        eta = remaining / rate if rate > 0 else (0.0 if not remaining else None)
        return {
            "run_id": self.run_id,
            "num_done": self.num_done,
            "num_images": self.num_images,
            "num_errors": self.num_errors,
            "elapsed_s": round(elapsed, 1),
            "images_per_s": round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def line(self) -> str:
        """One human line: ``12/40 images (30%)  1.80 images/s  ETA 0:00:15  1 error(s)``."""
        snap = self.snapshot()
        total = snap["num_images"]
        percent = 100 * snap["num_done"] / total if total else 100.0
        eta = "-" if snap["eta_s"] is None else str(dt.timedelta(seconds=round(snap["eta_s"])))
        return (
            f"{snap['num_done']}/{total} images ({percent:.0f}%)  {snap['images_per_s']:.2f} images/s  "
            f"ETA {eta}  {snap['num_errors']} error(s)"
        )

    def _beat(self) -> None:
        """The heartbeat: a line whenever ``log_every_s`` passed without one."""
        while not self._stop.wait(min(0.25, self.log_every_s / 4)):  # a line at most a quarter second late
            if self.clock() - self._last_log >= self.log_every_s:
                self._log("running" if self._started is not None else "waiting", with_status=True)

    def _draw(self, *, force: bool = False) -> None:
        if not self.live:
            return
        now = self.clock()
        if not force and now - self._last_draw < 0.2:  # a redraw per batch can outpace any terminal
            return
        self._last_draw = now
        text = self.line() if self.num_done or not self.current else f"{self.current} ({self.elapsed():.0f} s)"
        self.stream.write(f"\r\x1b[Krendering {text}")
        self.stream.flush()

    def _log(
        self, phase: str, *, message: str | None = None, event: str | None = None, with_status: bool = False
    ) -> None:
        with self._lock:
            self._last_log = self.clock()
        fields: dict[str, Any] = {"phase": phase, "since_start_s": round(self.elapsed(), 1)}
        if event is not None:
            fields["event"] = event
        else:
            fields.update(self.snapshot())
        if message is None:
            started = self._started is not None
            message = f"{phase}: {self.line()}" if started else f"{phase}: {self.current or 'starting'}"
            if with_status and started and self.current:
                message += f" | {self.current}"
            if with_status:
                message += f" ({self.elapsed():.1f} s)"
        if with_status and self.current:
            fields["status"] = self.current
        logger.info("%s", message, extra={"progress": fields})


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per log record (``--log-format json``): time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        progress = getattr(record, "progress", None)
        if progress:
            entry["progress"] = progress
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Library notices a user of the job cannot act on, by logger: logged at debug level instead.
DEMOTED = {
    # a private local Ray is reachable from this machine only; a cluster's admins set its auth mode
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
}


class _Demote(logging.Filter):
    """Turns a library's notice into a debug record (kept only when debug logging is on)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and self.text in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(*, level: str, log_format: str) -> None:
    """Root logging for the driver: ``text`` (human) or ``json`` (one object per line, for log collectors)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    for name, text in DEMOTED.items():
        library = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in library.filters):
            library.addFilter(_Demote(text))
    root = logging.getLogger()
    root.setLevel(level.upper())
    if root.handlers:  # like logging.basicConfig: an embedding program (or pytest) already decided
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else PrintableFormatter(TEXT_LOG_FORMAT))
    root.addHandler(handler)


class PrintableFormatter(logging.Formatter):
    """Text log lines with control characters (terminal escape sequences a row id or a file may hold) escaped;
    the line breaks of tracebacks stay."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)


# Moments of stats.json's timeline the summary shows (seconds since the job started).
TIMELINE_ROWS = (
    ("first_dispatch", "seconds to first model call"),
    ("first_image_stored", "seconds to first image stored"),
    ("gallery_written", "seconds to gallery"),
)


def summary_table(stats: dict[str, Any]) -> str:
    """The end-of-run table printed by the CLI: this run and the whole output, side by side."""
    run, output = stats.get("this_run", {}), stats.get("output", {})
    rows: list[tuple[str, str, str]] = [("", "this run", "output (all runs)")]
    for status in ("ok", "error"):
        rows.append((f"images {status}", _count(run, "by_status", status), _count(output, "by_status", status)))
    modes = sorted(set(run.get("by_mode", {})) | set(output.get("by_mode", {})))
    for mode in modes:
        run_mode, out_mode = run.get("by_mode", {}).get(mode, {}), output.get("by_mode", {}).get(mode, {})
        rows.append((f"  {printable(mode)}", _mode_cell(run_mode), _mode_cell(out_mode)))
    kinds = sorted(set(run.get("errors_by_kind", {})) | set(output.get("errors_by_kind", {})))
    for kind in kinds:
        rows.append(
            (f"  error {printable(kind)}", _count(run, "errors_by_kind", kind), _count(output, "errors_by_kind", kind))
        )
    scores = stats.get("clip_score")
    if scores:
        rows.append(
            ("clip score mean (min-max)", "", f"{scores['mean']:.2f} ({scores['min']:.1f}-{scores['max']:.1f})")
        )
        rows.append(("images filtered (low score)", "", str(scores["num_filtered"])))
    rows.append(("skipped (already final)", str(stats.get("num_skipped_already_final", 0)), ""))
    if (stats.get("duplicates") or {}).get("num_repeated"):
        rows.append(("duplicate images (same inputs, seed)", str(stats["duplicates"]["num_repeated"]), ""))
    rows.append(("images/s", f"{stats.get('images_per_s', 0.0):g}", ""))
    for stage, seconds in stats.get("busy_seconds", {}).items():
        if seconds:  # a stage this run did not have (scoring, depth) has none
            rows.append((f"busy seconds {stage}", f"{seconds:.1f}", ""))
    timeline = stats.get("timeline", {})
    for mark, label in TIMELINE_ROWS:
        if mark in timeline:
            rows.append((label, f"{timeline[mark]:.1f}", ""))
    rows.append(("wall seconds", f"{stats.get('wall_seconds', 0.0):.1f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows]
    return f"run {stats.get('run_id', '?')} summary\n" + "\n".join(lines + _named(stats))


def _named(stats: dict[str, Any]) -> list[str]:
    """Lines naming this run's first failed images per error kind and its duplicate images, if any.

    Each id is `printable` here, newlines included: the CLI prints the summary keeping its own line breaks, so an
    id's ``\\n`` would otherwise start a line of its own (a fake summary line).
    """
    lines = []
    for kind, keys in stats.get("this_run", {}).get("first_failed", {}).items():
        lines.append(f"  first failed ({printable(kind)}): " + ", ".join(_image(key) for key in keys))
    repeats = stats.get("duplicates") or {}
    for group in repeats.get("examples", []) if repeats.get("num_repeated") else []:
        lines.append("  same inputs, settings and seed: " + " = ".join(_image(key) for key in group))
    return lines


def _image(key: Any) -> str:
    """``id #index`` of one image, the id on one line (`printable`)."""
    row_id, index = key
    return f"{printable(row_id)} #{index}"


def _count(section: dict[str, Any], group: str, key: str) -> str:
    return str(section.get(group, {}).get(key, 0))


def _mode_cell(counts: dict[str, int]) -> str:
    return " ".join(f"{status} {counts[status]}" for status in sorted(counts)) or "-"
