"""The access log: one JSON line per request, in daily UTC files.

Requests never wait for the disk.  The event loop only appends the finished
request to a bounded in-memory queue; a daemon thread turns queued requests
into JSON lines and writes them in batches.  When the disk is slow, blocked
or full the queue fills and new records are dropped (counted, warned about
once) instead of holding up inference.

:class:`OffLoopWriter` is the queue-plus-thread both this log and payload
capture use.
"""

from __future__ import annotations

import collections
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Generic, TextIO, TypeVar

from .metrics import RequestOutcome

log = logging.getLogger("aistack.access_log")

Item = TypeVar("Item")

# Enough for minutes of a busy gateway with the disk stalled; a record is a few hundred bytes.
DEFAULT_MAX_PENDING_RECORDS = 10_000
# The thread sleeps this long between batches unless the queue is filling up,
# so a burst of requests costs one wake-up and one write, not one each.
DEFAULT_WAKE_EVERY_S = 0.5


class OffLoopWriter(Generic[Item]):
    """A daemon thread that handles queued items in order, in batches.

    The event-loop side calls :meth:`offer`, which never blocks and takes no
    lock: it returns False when ``max_pending`` items are already waiting.
    Only the loop thread offers and only the writer thread takes, and
    ``deque.append``/``popleft`` are atomic, so the count can be off by the
    batch being taken at that instant, never more.  ``handle_batch`` is
    expected to count and report its own failures; anything it lets escape
    is logged here and the batch is lost.
    """

    def __init__(
        self,
        name: str,
        handle_batch: Callable[[list[Item]], None],
        *,
        max_pending: int,
        wake_every_s: float = DEFAULT_WAKE_EVERY_S,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.max_pending = max_pending
        self._handle_batch = handle_batch
        self._wake_every_s = wake_every_s
        self._on_tick = on_tick  # called after every wake-up, for periodic chores
        self._pending: collections.deque[Item] = collections.deque()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._offered = 0
        self._handled = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def offer(self, item: Item) -> bool:
        pending = self._pending
        if len(pending) >= self.max_pending:
            return False
        pending.append(item)
        self._offered += 1
        if len(pending) * 2 > self.max_pending:  # filling up: do not wait for the next tick
            self._wake.set()
        return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wait_until_handled(self, timeout_s: float) -> bool:
        """Block until everything offered so far was handled (tests, shutdown)."""
        target = self._offered
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._handled >= target, timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Handle what is queued and end the thread; False if it is stuck (e.g. a blocked disk)."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning(
                "%s is still blocked after %.1f s (slow or stuck disk?); %d queued items will not be written",
                self.name, timeout_s, self.pending,
            )
            return False
        return True

    def _take_batch(self) -> list[Item]:
        pending = self._pending
        return [pending.popleft() for _ in range(len(pending))]

    def _run(self) -> None:
        while True:
            self._wake.wait(self._wake_every_s)
            self._wake.clear()
            batch = self._take_batch()
            if batch:
                try:
                    self._handle_batch(batch)
                except Exception:  # noqa: BLE001 - the writer must outlive a bad batch
                    log.exception("%s lost %d items", self.name, len(batch))
                with self._progress:
                    self._handled += len(batch)
                    self._progress.notify_all()
            if self._on_tick is not None:
                try:
                    self._on_tick()
                except Exception:  # noqa: BLE001
                    log.exception("%s: periodic task failed", self.name)
            if self._stopping and not self._pending:
                return


class AccessLog:
    """Daily ``access-YYYY-MM-DD.jsonl`` files (UTC) under ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        max_pending: int = DEFAULT_MAX_PENDING_RECORDS,
        wake_every_s: float = DEFAULT_WAKE_EVERY_S,
    ) -> None:
        self.directory = Path(directory)
        self.written = 0
        self.dropped = 0  # refused because the queue was full
        self.failed = 0  # lost to write errors (full disk, permissions)
        self._warned_full = False
        self._warned_failed = False
        self._file: TextIO | None = None
        self._file_date: str | None = None
        self.writer: OffLoopWriter[RequestOutcome] = OffLoopWriter(
            "aistack-access-log", self._write_batch, max_pending=max_pending, wake_every_s=wake_every_s
        )

    def path_for(self, date: str) -> Path:
        return self.directory / f"access-{date}.jsonl"

    def submit(self, outcome: RequestOutcome) -> None:
        """Queue one finished request; never blocks (event loop side)."""
        if self.writer.offer(outcome):
            return
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
        }

    def status(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "written": self.written,
            "dropped": self.dropped,
            "failed": self.failed,
            "pending": self.writer.pending,
        }

    # --- writer thread ------------------------------------------------------------

    def _write_batch(self, outcomes: list[RequestOutcome]) -> None:
        lines_by_date: dict[str, list[str]] = {}
        for outcome in outcomes:
            line = outcome.to_json_line()
            lines_by_date.setdefault(line[7:17], []).append(line)  # {"ts":"YYYY-MM-DD...
        for date, lines in lines_by_date.items():
            try:
                stream = self._open(date)
                stream.write("\n".join(lines) + "\n")
                stream.flush()
            except OSError as exc:
                self.failed += len(lines)
                self._close()
                if not self._warned_failed:
                    self._warned_failed = True
                    log.warning("access log: cannot write to %s (%s); records are being lost", self.path_for(date), exc)
                continue
            self.written += len(lines)

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
