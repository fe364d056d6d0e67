"""The on-disk TTS audio cache: hits, expiry, size cap, damage, atomic writes, off switch, keys."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from aistack_core.media.tts_cache import ENTRY_SUFFIX, CachedAudio, TtsCache


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_cache(tmp_path: Path, *, ttl_s: float = 3600, max_bytes: int = 1_000_000, clock=None) -> TtsCache:
    return TtsCache(tmp_path / "cache", ttl_s, max_bytes, clock=clock or FakeClock())


def key_for(text: str, **extra) -> str:
    return TtsCache.key(model="piper-en_US-joe-medium", voice="joe", speed=1.0, format="wav", text=text, **extra)


def entry_files(cache: TtsCache) -> list[str]:
    return sorted(os.listdir(cache.directory)) if cache.directory.exists() else []


def test_miss_then_hit_returns_bytes_and_content_type(tmp_path):
    cache = make_cache(tmp_path)
    key = key_for("hello")
    assert cache.get(key) is None
    assert cache.put(key, b"RIFF-audio", "audio/wav") is True
    hit = cache.get(key)
    assert isinstance(hit, CachedAudio)
    assert (hit.data, hit.content_type) == (b"RIFF-audio", "audio/wav")
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["stores"], stats["entries"]) == (1, 1, 1, 1)
    assert stats["bytes"] > len(b"RIFF-audio")


def test_entries_expire_after_ttl(tmp_path):
    clock = FakeClock()
    cache = make_cache(tmp_path, ttl_s=60, clock=clock)
    key = key_for("short lived")
    cache.put(key, b"data", "audio/wav")
    clock.now += 59
    assert cache.get(key) is not None
    clock.now += 2
    assert cache.get(key) is None
    assert entry_files(cache) == []  # an expired entry is removed when found
    assert cache.stats()["expired"] == 1


def test_sweep_removes_expired_entries_and_abandoned_temp_files(tmp_path):
    clock = FakeClock()
    cache = make_cache(tmp_path, ttl_s=60, clock=clock)
    cache.put(key_for("old"), b"old", "audio/wav")
    clock.now += 30
    cache.put(key_for("new"), b"new", "audio/wav")
    abandoned = cache.directory / ".partial-crashed"
    abandoned.write_bytes(b"half")
    os.utime(abandoned, (clock.now - 7200, clock.now - 7200))
    clock.now += 40  # "old" is 70 s old, "new" 40 s
    assert cache.sweep() == 2
    assert entry_files(cache) == [key_for("new") + ENTRY_SUFFIX]
    assert cache.get(key_for("new")).data == b"new"


def test_size_cap_evicts_least_recently_used_first(tmp_path):
    clock = FakeClock()
    payload = b"x" * 1000
    probe = make_cache(tmp_path / "probe")
    probe.put(key_for("probe"), payload, "audio/wav")
    entry_size = probe.stats()["bytes"]

    cache = make_cache(tmp_path, max_bytes=3 * entry_size + 10, clock=clock)
    for text in ("first", "second", "third"):
        cache.put(key_for(text), payload, "audio/wav")
        clock.now += 1
    assert cache.stats()["entries"] == 3

    cache.put(key_for("fourth"), payload, "audio/wav")  # over the cap: the oldest goes
    clock.now += 1
    assert cache.get(key_for("first")) is None
    assert cache.get(key_for("second")) is not None  # a hit makes "second" recent
    clock.now += 1
    cache.put(key_for("fifth"), payload, "audio/wav")
    assert cache.get(key_for("third")) is None  # now the least recently used
    assert {cache.get(key_for(t)) is not None for t in ("second", "fourth", "fifth")} == {True}
    stats = cache.stats()
    assert stats["evicted"] == 2 and stats["bytes"] <= cache.max_bytes


def test_entry_larger_than_the_cap_is_not_stored(tmp_path):
    cache = make_cache(tmp_path, max_bytes=500)
    assert cache.put(key_for("big"), b"y" * 1000, "audio/wav") is False
    assert cache.get(key_for("big")) is None
    assert not any(name.endswith(ENTRY_SUFFIX) for name in entry_files(cache))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[:-3], id="truncated"),
        pytest.param(lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), id="flipped-byte"),
        pytest.param(lambda raw: b"garbage", id="not-an-entry"),
        pytest.param(lambda raw: raw[:20], id="cut-inside-header"),
    ],
)
def test_damaged_entry_is_dropped_and_treated_as_a_miss(tmp_path, damage):
    cache = make_cache(tmp_path)
    key = key_for("fragile")
    cache.put(key, b"audio bytes that matter", "audio/wav")
    path = cache.directory / (key + ENTRY_SUFFIX)
    path.write_bytes(damage(path.read_bytes()))
    assert cache.get(key) is None
    assert not path.exists()
    assert cache.stats()["corrupt"] == 1
    # The next put repairs it.
    cache.put(key, b"fresh", "audio/wav")
    assert cache.get(key).data == b"fresh"


def test_writes_leave_no_temporary_files(tmp_path):
    cache = make_cache(tmp_path)
    for index in range(5):
        cache.put(key_for(f"text {index}"), b"z" * 100, "audio/mpeg")
    names = entry_files(cache)
    assert len(names) == 5 and all(name.endswith(ENTRY_SUFFIX) for name in names)


def test_concurrent_readers_never_see_partial_data(tmp_path):
    cache = make_cache(tmp_path, max_bytes=50_000_000)
    key = key_for("contended")
    versions = [bytes([value]) * 2_000_000 for value in (1, 2, 3)]
    cache.put(key, versions[0], "audio/wav")
    stop = threading.Event()
    seen: list[bytes | None] = []
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(8):
                cache.put(key, data, "audio/wav")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            hit = cache.get(key)
            seen.append(None if hit is None else hit.data)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(data,)) for data in versions]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()

    assert not errors
    assert seen and all(data in versions for data in seen)  # whole versions only, never a miss or a mix
    assert cache.stats()["corrupt"] == 0
    assert len(entry_files(cache)) == 1


def test_disabled_cache_touches_nothing(tmp_path):
    for ttl_s, max_bytes in ((0, 1_000_000), (-1, 1_000_000), (60, 0)):
        cache = make_cache(tmp_path, ttl_s=ttl_s, max_bytes=max_bytes)
        assert cache.enabled is False
        assert cache.put(key_for("private"), b"secret", "audio/wav") is False
        assert cache.get(key_for("private")) is None
        assert cache.sweep() == 0
        assert cache.stats()["enabled"] is False
        assert not cache.directory.exists()


def test_directory_is_created_only_by_the_first_put(tmp_path):
    cache = make_cache(tmp_path)
    assert cache.get(key_for("x")) is None and cache.sweep() == 0 and cache.stats()["entries"] == 0
    assert not cache.directory.exists()
    cache.put(key_for("x"), b"x", "audio/wav")
    assert cache.directory.is_dir()


def test_keys_differ_by_every_parameter_and_ignore_spelling():
    base = dict(model="piper-en_US-joe-medium", voice="joe", speed=1.0, format="wav", text="Hello.")
    reference = TtsCache.key(**base)
    assert len(reference) == 64 and int(reference, 16) >= 0
    variations = [
        {"model": "piper-en_US-other-medium"},
        {"voice": "en_US-joe-medium"},
        {"speed": 1.5},
        {"format": "mp3"},
        {"text": "Hello!"},
        {"text": "Hello. "},
        {"instructions": "whisper it"},
        {"sample_rate": 16000},
    ]
    keys = {TtsCache.key(**{**base, **change}) for change in variations}
    assert reference not in keys and len(keys) == len(variations)
    # Equal requests written differently hash the same.
    assert TtsCache.key(**{**base, "speed": 1}) == reference
    assert TtsCache.key(**{**base, "instructions": None}) == reference
    assert TtsCache.key(**dict(reversed(list(base.items())))) == reference


def test_keys_that_are_not_hashes_are_refused(tmp_path):
    cache = make_cache(tmp_path)
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")
    with pytest.raises(ValueError):
        cache.put("not-a-key", b"x", "audio/wav")
