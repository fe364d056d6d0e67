"""Time to the first audio byte versus the whole answer, for a default speech request.

OpenAI streams speech by default, and so does aistack: a plain
``POST /v1/audio/speech`` (no ``stream`` flag) for an eight-sentence
paragraph should deliver its first audio bytes long before the last ones.
For every response format this prints, per round and as medians, the
seconds until the first body byte, the seconds until the last one, and
their ratio (goal: first byte before 25 % of the total); next to them, the
first byte of the same request with ``"stream": false`` (the whole file at
once), which is what the default was before.

The gateway runs in this process (the piper plugin only, cache off) on a
loopback port and is called over real HTTP.  Usage::

    python bench/bench_tts_first_byte.py [--rounds 3] [--formats mp3,wav,pcm] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from aistack_core.app import create_app
from aistack_core.config import Config
from aistack_core.plugins import load_plugins

try:
    from aistack_plugins import piper as piper_plugin
except ImportError as exc:  # pragma: no cover - depends on the installation
    sys.exit(f"bench_tts_first_byte needs the piper extra (pip install 'aistack[piper]'): {exc}")

PARAGRAPH = (
    "The ferry left the harbour a little after seven. "
    "Most passengers stayed inside, out of the cold wind. "
    "A few stood at the rail and watched the town grow small. "
    "Gulls followed the wake, hoping for scraps. "
    "Halfway across, the sun broke through the clouds. "
    "The water turned from grey to a deep, bright green. "
    "Someone started to hum a song nobody else knew. "
    "By the time the island came into view, everyone was smiling."
)
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
GOAL = 0.25


async def timed_request(
    session: aiohttp.ClientSession, url: str, fmt: str, **extra
) -> tuple[float, float, int]:
    body = {"model": "tts-1", "voice": "alloy", "input": PARAGRAPH, "response_format": fmt, **extra}
    started = time.perf_counter()
    first_at = None
    size = 0
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            if first_at is None and chunk:
                first_at = time.perf_counter()
            size += len(chunk)
    total = time.perf_counter() - started
    assert first_at is not None, "no audio came back"
    return first_at - started, total, size


async def run(rounds: int, formats: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as state:
        root = Path(state)
        config = Config(
            upload_dir=root / "uploads", tts_cache_dir=root / "cache", tts_cache_ttl_min=0,
            obs_log_dir=root / "logs", obs_payload_dir=root / "payloads", obs_access_log=False,
        )
        plugins = load_plugins(load_entrypoints=False)
        plugins.register(piper_plugin, name="piper")
        runner = web.AppRunner(create_app(config, plugins=plugins), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}/v1/audio/speech"
        results: dict[str, dict] = {}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                await timed_request(session, url, "pcm")  # load the voice once, outside the figures
                for fmt in formats:
                    firsts, totals = [], []
                    for _ in range(rounds):
                        first, total, size = await timed_request(session, url, fmt)
                        firsts.append(first)
                        totals.append(total)
                    ratios = [f / t for f, t in zip(firsts, totals)]
                    whole_first, _, _ = await timed_request(session, url, fmt, stream=False)
                    results[fmt] = {
                        "first_byte_s": round(statistics.median(firsts), 3),
                        "total_s": round(statistics.median(totals), 3),
                        "ratio": round(statistics.median(ratios), 3),
                        "whole_file_first_byte_s": round(whole_first, 3),
                        "bytes": size,
                    }
        finally:
            await runner.cleanup()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    results = asyncio.run(run(args.rounds, formats))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"8-sentence paragraph, default request (streamed), median of {args.rounds} rounds")
        print(f"{'format':<7}{'first byte s':>14}{'total s':>10}{'first/total':>13}{'stream:false first byte s':>28}"
              f"  goal < {GOAL:.0%}")
        for fmt, row in results.items():
            verdict = "ok" if row["ratio"] < GOAL else "MISSED"
            print(f"{fmt:<7}{row['first_byte_s']:>14.3f}{row['total_s']:>10.3f}{row['ratio']:>12.1%}"
                  f"{row['whole_file_first_byte_s']:>28.3f}  {verdict}")
    return 0 if all(row["ratio"] < GOAL for row in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
