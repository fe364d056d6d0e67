"""The access log: one JSON line per request, in daily UTC files.

Requests never wait for the disk.  The event loop turns each finished
request into its JSON line and appends it to a bounded in-memory queue; a
daemon thread writes the queued lines in batches.  When the disk is slow,
blocked or full the queue fills and new lines are dropped (counted, warned
about once) instead of holding up inference.

The line is made on the loop, not in the thread, on purpose: making it is
CPU work that holds the GIL wherever it runs, and in the thread it ran a
half a second's worth of requests at a time, holding the GIL against the loop and
the worker threads for milliseconds and costing them a GIL hand-over each
time; on the loop it runs in the middleware's small batches.

A record that cannot be serialised is counted and skipped alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TextIO

from .record import RequestOutcome
from .writer import DEFAULT_WAKE_EVERY_S, OffLoopWriter

log = logging.getLogger("aistack.access_log")

# Enough for minutes of a busy gateway with the disk stalled; a record is a few hundred bytes.
DEFAULT_MAX_PENDING_RECORDS = 10_000
# ...but a client can make lines of tens of KB (a long path of escaped odd characters): capped by size too.
DEFAULT_MAX_PENDING_CHARS = 16 * 1024 * 1024


class AccessLog:
    """Daily ``access-YYYY-MM-DD.jsonl`` files (UTC) under ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        max_pending: int = DEFAULT_MAX_PENDING_RECORDS,
        max_pending_chars: int = DEFAULT_MAX_PENDING_CHARS,
        wake_every_s: float = DEFAULT_WAKE_EVERY_S,
    ) -> None:
        self.directory = Path(directory)
        self.written = 0
        self.dropped = 0  # refused because the queue was full
        self.failed = 0  # lost to write errors (full disk, permissions)
        self.unserialisable = 0  # records that could not become JSON, skipped one by one
        self._warned_full = False
        self._warned_failed = False
        self._warned_unserialisable = False
        self._file: TextIO | None = None
        self._file_date: str | None = None
        self.writer: OffLoopWriter[str] = OffLoopWriter(
            "aistack-access-log", self._write_batch, max_pending=max_pending, wake_every_s=wake_every_s,
            size_of=len, max_pending_size=max_pending_chars,
        )

    def path_for(self, date: str) -> Path:
        return self.directory / f"access-{date}.jsonl"

    def submit(self, outcome: RequestOutcome) -> None:
        """Queue one finished request's line; never blocks (event loop side)."""
        if self.writer.full:  # no line to make
            self._drop()
            return
        try:
            line = outcome.to_json_line()
        except (TypeError, ValueError) as exc:  # one bad record must not cost the others
            self.unserialisable += 1
            if not self._warned_unserialisable:  # once: this runs on the loop
                self._warned_unserialisable = True
                log.warning(
                    "access log: skipped the record of request %s (%s); "
                    "aistack_access_log_skipped_records_total counts every one", outcome.request_id, exc,
                )
            return
        if not self.writer.offer(line):
            self._drop()

    def _drop(self) -> None:
        self.dropped += 1
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "access log writer is behind (disk slow, blocked or full?): dropping records instead of "
                "delaying requests; aistack_access_log_dropped_records_total counts them"
            )

    def start(self) -> None:
        self.writer.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        stopped = self.writer.stop(timeout_s)
        if stopped:
            self._close()
        return stopped

    def counters(self) -> dict[str, tuple[str, float]]:
        return {
            "aistack_access_log_written_records": ("Access-log lines written.", self.written),
            "aistack_access_log_dropped_records": (
                "Access-log records dropped because the writer was behind.", self.dropped),
            "aistack_access_log_failed_records": ("Access-log records lost to write errors.", self.failed),
            "aistack_access_log_skipped_records": (
                "Access-log records skipped because they could not be serialised.", self.unserialisable),
        }

    def status(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "written": self.written,
            "dropped": self.dropped,
            "failed": self.failed,
            "skipped": self.unserialisable,
            "pending": self.writer.pending,
        }

    # --- writer thread ------------------------------------------------------------

    def _write_batch(self, lines: list[str]) -> None:
        lines_by_date: dict[str, list[str]] = {}
        for line in lines:
            lines_by_date.setdefault(line[7:17], []).append(line)  # {"ts":"YYYY-MM-DD...
        for date, day_lines in lines_by_date.items():
            try:
                stream = self._open(date)
                stream.write("\n".join(day_lines) + "\n")
                stream.flush()
            except OSError as exc:
                self.failed += len(day_lines)
                self._close()
                if not self._warned_failed:
                    self._warned_failed = True
                    log.warning("access log: cannot write to %s (%s); records are being lost", self.path_for(date), exc)
                continue
            self.written += len(day_lines)

    def _open(self, date: str) -> TextIO:
        if self._file is not None and self._file_date == date:
            return self._file
        self._close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path_for(date), "a", encoding="utf-8")
        self._file_date = date
        return self._file

    def _close(self) -> None:
        stream, self._file, self._file_date = self._file, None, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # the data it held is counted as failed already
