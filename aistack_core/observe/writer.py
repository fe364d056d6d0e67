"""The one off-loop writer the access log and payload capture share.

The event loop hands items to a bounded in-memory queue and never waits; a
daemon thread takes them in batches and does the I/O.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Generic, TypeVar

log = logging.getLogger("aistack.observe.writer")

# The thread sleeps this long between batches unless the queue is filling up,
# so a burst of requests costs one wake-up and one write, not one each.
DEFAULT_WAKE_EVERY_S = 0.5

Item = TypeVar("Item")


class OffLoopWriter(Generic[Item]):
    """A daemon thread that handles queued items in order, in batches.

    The event-loop side calls :meth:`offer`, which never blocks and takes no
    lock: it returns False when ``max_pending`` items are already waiting.
    Only the loop thread offers and only the writer thread takes, and
    ``deque.append``/``popleft`` are atomic, so the count can be off by the
    batch being taken at that instant, never more.  ``handle_batch`` is
    expected to count and report its own failures; anything it lets escape
    is logged here and the batch is lost.

    With ``size_of``, the queue is bounded by size as well: an item that
    would take it past ``max_pending_size`` is refused, and past a sixteenth
    of that the thread is woken at once.  Sizes are two running totals, one
    written only by the loop (offered) and one only by the thread (handled),
    so they need no lock either.
    """

    def __init__(
        self,
        name: str,
        handle_batch: Callable[[list[Item]], None],
        *,
        max_pending: int,
        wake_every_s: float = DEFAULT_WAKE_EVERY_S,
        on_tick: Callable[[], None] | None = None,
        size_of: Callable[[Item], int] | None = None,
        max_pending_size: int = 0,
    ) -> None:
        self.name = name
        self.max_pending = max_pending
        self.max_pending_size = max_pending_size
        self._size_of = size_of
        self._offered_size = 0
        self._handled_size = 0
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

    @property
    def pending_size(self) -> int:
        return self._offered_size - self._handled_size

    @property
    def full(self) -> bool:
        """Whether :meth:`offer` would refuse any item now (the count is at its limit)."""
        return len(self._pending) >= self.max_pending

    def offer(self, item: Item) -> bool:
        if self.full:
            return False
        pending = self._pending
        if self._size_of is not None:
            size = self._size_of(item)
            queued = self._offered_size - self._handled_size + size
            if queued > self.max_pending_size:
                return False
            self._offered_size += size
            if queued * 16 > self.max_pending_size:  # large items: write them now, not at the next tick
                self._wake.set()
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
                if self._size_of is not None:
                    self._handled_size += sum(map(self._size_of, batch))
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
