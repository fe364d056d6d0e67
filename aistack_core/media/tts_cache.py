"""The on-disk cache of synthesized speech.

Repeating a request with the same model, voice, speed, format and text
returns the stored bytes instead of synthesizing again.  Each entry is one
file, ``<sha256 key>.tts``, laid out as::

    MAGIC (8 bytes) | header length (4 bytes, big-endian) | header JSON | audio bytes

The header records the audio's length, its sha256, its content type and
when it was made, so a truncated or damaged file is recognised and dropped
instead of being served.  Files appear only through ``os.replace`` of a
finished temporary file, so a reader sees a whole entry or none.

Entries expire ``ttl_s`` after they were written.  When the directory grows
past ``max_bytes`` the least recently used entries go first (a hit refreshes
an entry's modification time).  ``ttl_s <= 0`` or ``max_bytes <= 0`` turns
the cache off entirely: nothing is read, written or even created on disk.

Every method blocks on file I/O; the server calls them through
``asyncio.to_thread``.  Several threads may use one cache at once.  Two
servers sharing a directory stay correct (each file is self-checking) but
each enforces the size cap on its own view of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs

log = logging.getLogger("aistack.tts_cache")

MAGIC = b"AISTTS\x01\n"
_HEADER_LENGTH = struct.Struct(">I")
_PREFIX_SIZE = len(MAGIC) + _HEADER_LENGTH.size
_MAX_HEADER_BYTES = 4096
ENTRY_SUFFIX = ".tts"
_TEMP_PREFIX = ".partial-"
# A temporary file this old was left by a writer that died; sweep() removes it.
_STALE_TEMP_S = 3600.0
# Part of every key: bump it when the meaning of the key's parts changes.
KEY_VERSION = 1
_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@attrs.frozen
class CachedAudio:
    data: bytes
    content_type: str
    created: float


@attrs.define
class CacheCounters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evicted: int = 0
    expired: int = 0
    corrupt: int = 0


def _canonical(value: Any) -> Any:
    """Make equal requests hash equally: 1 and 1.0 are the same speed, None is absence."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"cache key parts must be JSON-like, got {type(value).__name__}")


class TtsCache:
    def __init__(
        self,
        directory: Path,
        ttl_s: float,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        # Serialises writers so two puts do not both evict for the same overflow.
        self._write_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._counters = CacheCounters()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_bytes > 0

    # --- keys ----------------------------------------------------------------

    @staticmethod
    def key(**parts: Any) -> str:
        """A hex sha256 over the request's parts (model, voice, speed, format, text, ...).

        Parts set to None count as absent, and numbers compare by value.
        """
        document = {"v": KEY_VERSION, **_canonical(parts)}
        encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        if not _KEY_PATTERN.match(key):
            # Keys become file names; anything else could point outside the directory.
            raise ValueError(f"not a cache key: {key!r}")
        return self.directory / (key + ENTRY_SUFFIX)

    def _count(self, **increments: int) -> None:
        with self._counter_lock:
            for name, amount in increments.items():
                setattr(self._counters, name, getattr(self._counters, name) + amount)

    # --- reading -------------------------------------------------------------

    def get(self, key: str) -> CachedAudio | None:
        """The stored audio, or None when absent, expired or damaged (damaged files are deleted)."""
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
                inode = os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as exc:
            log.warning("tts cache: cannot read %s: %s", path, exc)
            self._count(misses=1)
            return None
        entry = _decode(raw)
        if entry is None:
            log.warning("tts cache: dropping damaged entry %s", path.name)
            self._remove_if_same(path, inode)
            self._count(misses=1, corrupt=1)
            return None
        if self._clock() - entry.created > self.ttl_s:
            self._remove_if_same(path, inode)
            self._count(misses=1, expired=1)
            return None
        try:
            now = self._clock()
            os.utime(path, (now, now))  # marks it recently used for eviction
        except OSError:
            pass  # replaced or removed meanwhile; what we read is still whole
        self._count(hits=1)
        return entry

    def _remove_if_same(self, path: Path, inode: int) -> None:
        """Delete ``path`` unless a writer has replaced it since we opened it."""
        try:
            if os.stat(path).st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("tts cache: cannot remove %s: %s", path, exc)

    # --- writing -------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str) -> bool:
        """Store ``data`` under ``key``; returns False when the cache is off or it cannot fit."""
        if not self.enabled:
            return False
        path = self._path(key)
        now = self._clock()
        encoded = _encode(data, content_type, now)
        if len(encoded) > self.max_bytes:
            log.info("tts cache: %d-byte entry exceeds the %d-byte cap; not stored", len(encoded), self.max_bytes)
            return False
        with self._write_lock:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                descriptor, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.directory)
            except OSError as exc:
                log.warning("tts cache: cannot write in %s: %s", self.directory, exc)
                return False
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(encoded)
                # Eviction orders by mtime, so it must come from the same clock as expiry.
                os.utime(temp_name, (now, now))
                os.replace(temp_name, path)
            except OSError as exc:
                log.warning("tts cache: cannot store %s: %s", path.name, exc)
                Path(temp_name).unlink(missing_ok=True)
                return False
            self._count(stores=1)
            self._enforce_cap(keep=path)
        return True

    def _entries(self) -> list[os.DirEntry]:
        try:
            with os.scandir(self.directory) as listing:
                return [item for item in listing if item.name.endswith(ENTRY_SUFFIX) and item.is_file()]
        except FileNotFoundError:
            return []

    def _enforce_cap(self, keep: Path) -> None:
        sized = []
        for item in self._entries():
            try:
                info = item.stat()
            except FileNotFoundError:
                continue
            sized.append((info.st_mtime, item.name, info.st_size))
        total = sum(size for _, _, size in sized)
        for _, name, size in sorted(sized):
            if total <= self.max_bytes:
                break
            if name == keep.name:
                continue
            (self.directory / name).unlink(missing_ok=True)
            total -= size
            self._count(evicted=1)

    # --- upkeep --------------------------------------------------------------

    def sweep(self) -> int:
        """Remove expired and damaged entries and abandoned temporary files; returns how many."""
        if not self.enabled:
            return 0
        removed = 0
        now = self._clock()
        try:
            listing = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for item in listing:
            path = Path(item.path)
            try:
                if item.name.startswith(_TEMP_PREFIX):
                    if now - item.stat().st_mtime > _STALE_TEMP_S:
                        path.unlink()
                        removed += 1
                    continue
                if not item.name.endswith(ENTRY_SUFFIX):
                    continue
                created = _read_created(path)
                if created is None:
                    path.unlink()
                    self._count(corrupt=1)
                    removed += 1
                elif now - created > self.ttl_s:
                    path.unlink()
                    self._count(expired=1)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("tts cache: cannot sweep %s: %s", path, exc)
        return removed

    def stats(self) -> dict[str, Any]:
        entries = self._entries() if self.enabled else []
        size = 0
        for item in entries:
            try:
                size += item.stat().st_size
            except FileNotFoundError:
                pass
        with self._counter_lock:
            counters = attrs.asdict(self._counters)
        return {
            "enabled": self.enabled,
            "directory": str(self.directory),
            "ttl_s": self.ttl_s,
            "max_bytes": self.max_bytes,
            "entries": len(entries),
            "bytes": size,
            **counters,
        }


def _encode(data: bytes, content_type: str, created: float) -> bytes:
    header = json.dumps(
        {
            "length": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "content_type": content_type,
            "created": created,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    if len(header) > _MAX_HEADER_BYTES:
        raise ValueError("cache header too large (content type too long?)")
    return MAGIC + _HEADER_LENGTH.pack(len(header)) + header + data


def _parse_header(prefix: bytes) -> tuple[dict, int] | None:
    """(header, offset of the audio) from the start of an entry file, or None if malformed."""
    if len(prefix) < _PREFIX_SIZE or not prefix.startswith(MAGIC):
        return None
    (header_length,) = _HEADER_LENGTH.unpack_from(prefix, len(MAGIC))
    end = _PREFIX_SIZE + header_length
    if header_length > _MAX_HEADER_BYTES or len(prefix) < end:
        return None
    try:
        header = json.loads(prefix[_PREFIX_SIZE:end])
        float(header["created"]), int(header["length"]), str(header["sha256"]), str(header["content_type"])
    except (ValueError, KeyError, TypeError):
        return None
    return header, end


def _decode(raw: bytes) -> CachedAudio | None:
    parsed = _parse_header(raw)
    if parsed is None:
        return None
    header, offset = parsed
    data = raw[offset:]
    if len(data) != int(header["length"]) or hashlib.sha256(data).hexdigest() != header["sha256"]:
        return None
    return CachedAudio(data=data, content_type=header["content_type"], created=float(header["created"]))


def _read_created(path: Path) -> float | None:
    """The creation time from an entry's header, reading only the header."""
    with open(path, "rb") as handle:
        prefix = handle.read(_PREFIX_SIZE + _MAX_HEADER_BYTES)
    parsed = _parse_header(prefix)
    return None if parsed is None else float(parsed[0]["created"])
