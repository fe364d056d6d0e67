"""The gateway's default transcription request against the best in-process faster-whisper strategy.

Four clips, all speech made with Piper (so the reference text is exact):

* ``short_11s``   — varied sentences, 11 s;
* ``repeat_70s``  — the same three sentences said over and over with pauses,
  the case that sends faster-whisper's temperature fallback into a spin;
* ``noisy_70s``   — varied sentences over synthetic music (changing chords)
  and noise, about 8 dB below the speech;
* ``long_600s``   — ten minutes of varied sentences.

For each clip, alternated within each round:

* ``gateway``: what an OpenAI client sends by default — ``POST
  /v1/audio/transcriptions`` with ``model=whisper-1`` and ``json`` — to a
  real ``aistack serve`` subprocess (only faster_whisper loaded, bundled
  tiny.en);
* ``best``: faster-whisper in this process on the same model files:
  ``BatchedInferencePipeline.transcribe(path, vad_filter=True,
  batch_size=8, temperature=0, word_timestamps=False)``, decoding included.

Printed: median seconds per side, the ratio gateway/best (goal <= 1.0), the
WER of each against the reference, whether the gateway gave the same text
every round, and the streamed first-event time (``stream=true``).

    PYTHONPATH=. python bench/bench_asr_speed.py [--rounds 2] [--long-rounds 1] [--clips short_11s,repeat_70s]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_asr_overhead import HTTP_TIMEOUT, Server, form  # noqa: E402
from bench_whisper_batched import (  # noqa: E402
    OUT_DIR, SENTENCES, speech_clip, synthesize_sentences, tiny_en_backend, word_error_rate, write_wav,
)

REPEATED = SENTENCES[:3]
RATE = 22050


def repeated_clip(seconds: float = 70.0) -> tuple[Path, str]:
    """The same three sentences, round after round, with pauses of 0.8 to 1.6 s."""
    path = OUT_DIR / f"repeat_{int(seconds)}s.wav"
    text_path = path.with_suffix(".txt")
    if path.exists() and text_path.exists():
        return path, text_path.read_text()
    pieces, rate = synthesize_sentences(REPEATED)
    rng = random.Random(3)
    parts, texts, used, limit = [], [], 0, int(seconds * rate)
    while True:
        index = len(texts) % len(pieces)
        pause = np.zeros(int(rng.uniform(0.8, 1.6) * rate), dtype=np.int16)
        if used + pieces[index].size + pause.size > limit:
            break
        parts += [pieces[index], pause]
        texts.append(REPEATED[index])
        used += pieces[index].size + pause.size
    parts.append(np.zeros(limit - used, dtype=np.int16))
    write_wav(path, np.concatenate(parts), rate)
    text_path.write_text(" ".join(texts))
    return path, " ".join(texts)


def noisy_clip(seconds: float = 70.0) -> tuple[Path, str]:
    """Varied speech over changing chords and noise, about 8 dB below the speech."""
    path = OUT_DIR / f"noisy_{int(seconds)}s.wav"
    text_path = path.with_suffix(".txt")
    if path.exists() and text_path.exists():
        return path, text_path.read_text()
    clean_path, text = speech_clip(seconds, seed=11)
    import wave

    with wave.open(str(clean_path)) as wav:
        rate = wav.getframerate()
        speech = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).astype(np.float32)
    rng = np.random.default_rng(5)
    t = np.arange(speech.size) / rate
    music = np.zeros_like(speech)
    chords = [(220.0, 277.2, 329.6), (196.0, 246.9, 293.7), (174.6, 220.0, 261.6), (246.9, 311.1, 370.0)]
    step = int(2.0 * rate)
    for start in range(0, speech.size, step):
        chord = chords[(start // step) % len(chords)]
        span = slice(start, start + step)
        music[span] = sum(np.sin(2 * np.pi * f * t[span]) for f in chord)
    noise = rng.normal(0, 1, speech.size).astype(np.float32)
    background = music / np.std(music) + 0.5 * noise
    speech_rms = np.sqrt(np.mean(speech[speech != 0] ** 2))
    background *= speech_rms / np.std(background) * 10 ** (-8 / 20)
    mixed = np.clip(speech + background, -32768, 32767).astype(np.int16)
    write_wav(path, mixed, rate)
    text_path.write_text(text)
    return path, text


CLIPS = {
    "short_11s": lambda: speech_clip(11.0),
    "repeat_70s": repeated_clip,
    "noisy_70s": noisy_clip,
    "long_600s": lambda: speech_clip(600.0),
}


async def gateway_text(server: Server, session: aiohttp.ClientSession, path: Path) -> str:
    async with session.post(server.base + "/v1/audio/transcriptions", data=form(path, model="whisper-1")) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body}")
        return body["text"]


async def first_event_s(server: Server, path: Path) -> float:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        started = time.perf_counter()
        async with session.post(
            server.base + "/v1/audio/transcriptions", data=form(path, model="whisper-1", stream="true")
        ) as response:
            first = None
            async for line in response.content:  # read to the end: the next request needs the slot
                if first is None and line.startswith(b"data:"):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream sent no event")
    return first


async def main_async(args: argparse.Namespace) -> dict:
    from faster_whisper import BatchedInferencePipeline

    clips = {name: CLIPS[name]() for name in args.clips}
    loaded = tiny_en_backend(batched_above_s=15.0).load()
    pipeline = BatchedInferencePipeline(model=loaded.model)

    def best_text(path: Path) -> str:
        segments, _ = pipeline.transcribe(
            str(path), language="en", vad_filter=True, batch_size=8, temperature=0.0, word_timestamps=False
        )
        return " ".join(segment.text.strip() for segment in segments)

    results: dict = {"cpu_count": len(os.sched_getaffinity(0)), "load_avg_start": os.getloadavg()[0], "clips": {}}
    with tempfile.TemporaryDirectory(prefix="aistack-bench-") as tmp:
        server = Server(Path(tmp))
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
                await server.wait_ready(session, timeout_s=120)
                warm = clips.get("short_11s", next(iter(clips.values())))[0]
                await gateway_text(server, session, warm)  # loads the model and the VAD
                best_text(warm)
                for name, (path, reference) in clips.items():
                    rounds = args.long_rounds if name.startswith("long") else args.rounds
                    times: dict[str, list[float]] = {"gateway": [], "best": []}
                    texts: dict[str, list[str]] = {"gateway": [], "best": []}
                    for round_index in range(rounds):
                        sides = ["gateway", "best"] if round_index % 2 == 0 else ["best", "gateway"]
                        for side in sides:
                            started = time.perf_counter()
                            if side == "gateway":
                                text = await gateway_text(server, session, path)
                            else:
                                text = await asyncio.to_thread(best_text, path)
                            times[side].append(time.perf_counter() - started)
                            texts[side].append(text)
                    gateway_s, best_s = statistics.median(times["gateway"]), statistics.median(times["best"])
                    row = {
                        "seconds": {side: [round(t, 2) for t in values] for side, values in times.items()},
                        "gateway_s": round(gateway_s, 2),
                        "best_s": round(best_s, 2),
                        "ratio": round(gateway_s / best_s, 2),
                        "wer_gateway": round(word_error_rate(reference, texts["gateway"][0]), 3),
                        "wer_best": round(word_error_rate(reference, texts["best"][0]), 3),
                        "gateway_same_text_every_round": len(set(texts["gateway"])) == 1,
                        "first_event_s": round(await first_event_s(server, path), 2),
                    }
                    results["clips"][name] = row
                    print(json.dumps({name: row}), file=sys.stderr, flush=True)
        finally:
            server.stop()
    results["load_avg_end"] = os.getloadavg()[0]
    return results


def print_table(results: dict) -> None:
    print(f"\ncpus {results['cpu_count']}, load average {results['load_avg_start']:.1f} -> {results['load_avg_end']:.1f}")
    print(f"{'clip':<12} {'gateway s':>10} {'best s':>8} {'ratio':>6} {'WER gw':>7} {'WER best':>9} "
          f"{'stable':>7} {'1st event s':>12}")
    for name, row in results["clips"].items():
        print(f"{name:<12} {row['gateway_s']:>10.2f} {row['best_s']:>8.2f} {row['ratio']:>6.2f} "
              f"{row['wer_gateway']:>7.3f} {row['wer_best']:>9.3f} {str(row['gateway_same_text_every_round']):>7} "
              f"{row['first_event_s']:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds for the short and 70 s clips")
    parser.add_argument("--long-rounds", type=int, default=1, help="rounds for the 10-minute clip")
    parser.add_argument("--clips", default=",".join(CLIPS), help=f"comma-separated subset of {', '.join(CLIPS)}")
    args = parser.parse_args()
    args.clips = [name.strip() for name in args.clips.split(",") if name.strip()]
    unknown = [name for name in args.clips if name not in CLIPS]
    if unknown:
        parser.error(f"unknown clips: {', '.join(unknown)}")
    results = asyncio.run(main_async(args))
    print(json.dumps(results))
    print_table(results)


if __name__ == "__main__":
    main()
