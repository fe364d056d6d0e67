"""Memory and cancel latency of long audio through a real ``aistack serve`` (faster_whisper, tiny.en).

1. Peak RSS: the server's VmHWM is reset (``/proc/PID/clear_refs``), then
   one request transcribes a long file; printed is the growth over the
   RSS before the request.  Two files: three hours of digital silence as
   FLAC (the issue's attack, 2 MB on the wire) and ``--tone-min`` minutes of
   faint room tone (noise at -50 dBFS), which the VAD has to listen to
   piece by piece.  Goal: well under 1.5 GB for three hours.
2. Cancel latency: the three-hour file is posted, the client hangs up
   after a random 0.5-2.5 s (the file is being decoded), and a small
   request is retried until it is no longer refused as busy; hang-up to
   slot free, over ``--trials``.  The same with ten minutes of speech and a
   hang-up after 1-6 s, which lands in VAD or in a model batch.  Goal: p95
   about 1 s.
3. The cheap refusals: a 2 MB WAV claiming 1 Hz and a FLAC claiming five
   hours, timed.

    PYTHONPATH=. python bench/bench_asr_memory.py [--trials 8] [--tone-min 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import av  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_asr_overhead import HTTP_TIMEOUT, Server, form, percentile, slot_free_after, write_wav  # noqa: E402
from bench_whisper_batched import speech_clip  # noqa: E402
from tests.test_asr_limits import set_flac_total_samples, silent_flac, wav_claiming  # noqa: E402


def room_tone_flac(path: Path, seconds: float, rate: int = 16000) -> Path:
    """Gaussian noise at -50 dBFS: not digital silence, so every piece goes through the VAD."""
    rng = np.random.default_rng(2)
    with av.open(str(path), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        for index in range(int(seconds // 10)):
            block = (rng.normal(0, 32768 * 10 ** (-50 / 20), (1, rate * 10))).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, index * block.shape[1]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


async def peak_growth(server: Server, session: aiohttp.ClientSession, path: Path) -> dict:
    before = server.memory_kb()["VmRSS"]
    reset = server.reset_peak_memory()
    started = time.perf_counter()
    async with session.post(server.base + "/v1/audio/transcriptions", data=form(path, model="whisper-1")) as response:
        body = await response.json()
        status = response.status
    after = server.memory_kb()
    return {
        "file": path.name,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "status": status,
        "text_chars": len(body.get("text", "")) if isinstance(body, dict) else None,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_growth_mb": round((after["VmHWM"] - before) / 1024, 1) if reset else None,
        "rss_after_growth_mb": round((after["VmRSS"] - before) / 1024, 1),
    }


async def cancel_latency(
    server: Server, path: Path, probe: Path, trials: int, delay_s: tuple[float, float] = (0.5, 2.5)
) -> dict:
    rng = random.Random(4)
    latencies = []
    for _ in range(trials):
        session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT, connector=aiohttp.TCPConnector(force_close=True))
        call = asyncio.create_task(session.post(server.base + "/v1/audio/transcriptions", data=form(path, model="whisper-1")))
        await asyncio.sleep(rng.uniform(*delay_s))
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            pass
        await session.close()
        hung_up = time.perf_counter()
        got_in, _ = await slot_free_after(server, probe)
        latencies.append(got_in - hung_up)
    return {
        "file": path.name,
        "hang_up_after_s": list(delay_s),
        "trials": trials,
        "latency_s": [round(t, 3) for t in latencies],
        "p50_s": round(percentile(latencies, 0.5), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3),
    }


async def refusal_s(session: aiohttp.ClientSession, server: Server, path: Path) -> dict:
    started = time.perf_counter()
    async with session.post(server.base + "/v1/audio/transcriptions", data=form(path, model="whisper-1")) as response:
        await response.read()
        return {"file": path.name, "status": response.status, "seconds": round(time.perf_counter() - started, 3)}


async def main_async(args: argparse.Namespace) -> dict:
    results: dict = {"cpu_count": len(os.sched_getaffinity(0)), "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="aistack-bench-") as tmp:
        workdir = Path(tmp)
        silence = silent_flac(workdir / "three_hours_silence.flac", 3 * 3600)
        tone = room_tone_flac(workdir / f"room_tone_{args.tone_min}min.flac", args.tone_min * 60)
        probe = workdir / "probe.wav"
        write_wav(probe, np.zeros(16000, dtype=np.int16), 16000)
        one_hz = wav_claiming(workdir / "one_hz.wav", 1, 1, 2_000_000)
        claims = set_flac_total_samples(silent_flac(workdir / "claims_5h.flac", 10), 5 * 3600 * 16000)
        server = Server(workdir)
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
                await server.wait_ready(session, timeout_s=120)
                async with session.post(server.base + "/v1/audio/transcriptions", data=form(probe, model="whisper-1")) as r:
                    await r.read()  # model loaded before any measurement
                results["refusals"] = [await refusal_s(session, server, one_hz), await refusal_s(session, server, claims)]
                results["memory"] = [await peak_growth(server, session, silence), await peak_growth(server, session, tone)]
                print(json.dumps(results), file=sys.stderr, flush=True)
                results["cancel_during_decode"] = await cancel_latency(server, silence, probe, args.trials)
                print(json.dumps(results["cancel_during_decode"]), file=sys.stderr, flush=True)
                # Ten minutes of speech: hang-ups land in VAD and in the model's batches.
                speech, _ = speech_clip(600.0)
                results["cancel_during_inference"] = await cancel_latency(
                    server, speech, probe, args.trials, delay_s=(1.0, 6.0)
                )
        finally:
            server.stop()
    results["load_avg_end"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--tone-min", type=int, default=20, help="minutes of room tone (VAD on every piece)")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
