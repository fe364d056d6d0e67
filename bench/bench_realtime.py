"""Live transcription: how soon the final text arrives after the speaker stops.

Against a real ``aistack serve`` subprocess (faster_whisper plugin only,
bundled tiny.en, Silero server VAD), utterances of 2-10 s of Piper speech
are streamed over ``/v1/realtime`` at real-time pace in 40 ms chunks, each
followed by silence.  Measured per utterance:

- end of speech -> ``completed``: from the moment the last speech sample was
  sent to the moment the completed transcript arrived.  This includes the
  server VAD's ``silence_duration_ms`` (the wait that decides the turn is
  over), so it is what a caption user feels;
- ``speech_stopped`` -> ``completed``: the gateway's own part (decode, and any
  partial decode still running when the turn ended);
- RTF: decode time / utterance length, from the server's per-utterance record;
- WER of the completed transcripts.

Side by side in the same run: the same utterances POSTed to
``/v1/audio/transcriptions`` (the plain decode a client would otherwise
wait for after uploading), and a second pass with two sessions streaming at
once, which share the one GPU slot.  Goal: end of speech -> completed p50
<= 0.5 s on the 2-core machine with tiny.en.  The server's own share
(``speech_stopped`` -> ``completed``) is the figure that goal can be held
to: the VAD's silence wait (OpenAI's default 500 ms) comes on top.

    python bench/bench_realtime.py [--utterances 8] [--silence-ms 200] [--partial-s 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import av  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_asr_overhead import Server, form  # noqa: E402
from bench_whisper_batched import synthesize_sentences, word_error_rate, write_wav  # noqa: E402

RATE = 24000
CHUNK_MS = 40
# Piper reads about 15 characters a second: these run from about 2 s to about 10 s.
SENTENCES = [
    "Please turn left at the old bakery.",
    "The meeting moved to Thursday at half past two in the afternoon.",
    "Could you send me the quarterly report before lunch tomorrow, please?",
    "Our train was delayed for forty minutes because of a signal failure near the river bridge.",
    "The museum opens at ten, and the guided tour of the east wing starts an hour later on weekdays only.",
    "Bring a warm jacket and sturdy shoes for the walk.",
    "She planted tomatoes, beans and a long row of sunflowers along the fence at the back of the garden, "
    "and watered them every single evening through the dry summer.",
    "When the storm finally passed, the whole village came out to clear the fallen branches from the road "
    "and to check on the neighbours who lived alone at the edge of the forest.",
    "Keep the receipt in case the printer stops working.",
    "He practised the piano every evening until his fingers knew the piece by heart.",
]


def to_24k(pcm: np.ndarray, rate: int) -> np.ndarray:
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16)


def noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 30, int(seconds * RATE)).astype(np.int16)


def utterances(count: int) -> list[tuple[str, np.ndarray]]:
    pieces, rate = synthesize_sentences(SENTENCES[:count])
    return [(text, to_24k(pcm, rate)) for text, pcm in zip(SENTENCES, pieces)]


async def stream_session(session: aiohttp.ClientSession, base: str, items, silence_ms: int, gap_s: float,
                         seed: int) -> list[dict]:
    """One realtime session; returns one record per utterance with client-side timings."""
    ws = await session.ws_connect(base.replace("http", "ws") + "/v1/realtime?intent=transcription",
                                  max_msg_size=0)
    assert (await ws.receive_json())["type"] == "session.created"
    await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": RATE},
        "transcription": {"model": "whisper-1", "language": "en"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}})
    assert (await ws.receive_json())["type"] == "session.updated"
    records: list[dict] = [{"text": text, "audio_s": pcm.size / RATE} for text, pcm in items]
    speech_starts: list[float] = []
    speech_ends: list[float] = []
    stops: dict[str, float] = {}  # item_id -> when speech_stopped arrived
    finals: dict[str, tuple[float, str]] = {}  # item_id -> (when completed arrived, transcript)
    arrived = asyncio.Event()  # set after every event, so the sender can re-check what it waits for

    async def read() -> None:
        try:
            while True:
                message = await ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"session ended early: {message}")
                event = json.loads(message.data)
                now = time.monotonic()
                if event["type"] == "input_audio_buffer.speech_stopped":
                    stops[event["item_id"]] = now
                elif event["type"] == "conversation.item.input_audio_transcription.completed":
                    finals[event["item_id"]] = (now, event["transcript"])
                elif event["type"] == "error":
                    print("error event:", event["error"], file=sys.stderr)
                arrived.set()
        finally:
            arrived.set()  # wake the waiter so it sees the reader ended

    reader = asyncio.create_task(read())
    step = RATE * CHUNK_MS // 1000
    timeline = [noise(0.5, seed)]
    for index, (_, pcm) in enumerate(items):
        timeline += [pcm, noise(gap_s, seed + index + 1)]
    started = time.monotonic()
    sent = 0
    for index, block in enumerate(timeline):
        if index % 2 == 1:
            speech_starts.append(time.monotonic())
        for offset in range(0, block.size, step):
            chunk = block[offset:offset + step]
            await ws.send_json({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(chunk.tobytes()).decode()})
            sent += chunk.size
            ahead = started + sent / RATE - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        if index % 2 == 1:  # a speech block just ended
            speech_ends.append(time.monotonic())

    async def every_turn_final() -> None:
        # Every turn that was stopped has its final text (and there was at least one turn).
        while not (stops and set(finals) >= set(stops)):
            if reader.done():
                reader.result()  # the session ended early: say why
            arrived.clear()
            await arrived.wait()

    try:
        await asyncio.wait_for(every_turn_final(), timeout=120)
    finally:
        reader.cancel()
    await ws.close()
    # Each utterance owns the turns that ended while it was being sent or in the gap after it
    # (a pause inside a sentence may split it into two turns: their texts are joined).
    bounds = speech_starts[1:] + [float("inf")]
    turns = 0
    for record, begin, end, bound in zip(records, speech_starts, speech_ends, bounds):
        owned = sorted((at, item) for item, at in stops.items() if begin <= at < bound)
        if not owned:
            continue
        turns += len(owned)
        last_final = max(finals[item][0] for _, item in owned)
        record["speech_end_to_final_s"] = last_final - end
        record["stopped_to_final_s"] = last_final - owned[-1][0]
        heard = " ".join(finals[item][1] for _, item in owned)
        record["wer"] = word_error_rate(record["text"], heard)
        if record["wer"] > 0.1:
            print(f"WER {record['wer']:.2f}: said {record['text']!r}, heard {heard!r}", file=sys.stderr)
    if turns != len(items):
        print(f"note: {turns} turns for {len(items)} utterances (pauses inside sentences)", file=sys.stderr)
    return records


def pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, records: list[dict]) -> dict:
    final = [r["speech_end_to_final_s"] for r in records if "speech_end_to_final_s" in r]
    server = [r["stopped_to_final_s"] for r in records if "stopped_to_final_s" in r]
    wers = [r["wer"] for r in records if "wer" in r]
    line = {
        "run": name, "utterances": len(final),
        "speech_end_to_final_p50_s": round(statistics.median(final), 3),
        "speech_end_to_final_p95_s": round(pct(final, 95), 3),
        "stopped_to_final_p50_s": round(statistics.median(server), 3),
        "stopped_to_final_p95_s": round(pct(server, 95), 3),
        "mean_wer": round(statistics.mean(wers), 3),
    }
    print(json.dumps(line))
    return line


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--gap-s", type=float, default=1.2)
    parser.add_argument("--partial-s", type=float, default=1.0)
    args = parser.parse_args()
    items = utterances(min(args.utterances, len(SENTENCES)))
    print("utterance lengths (s):", [round(pcm.size / RATE, 1) for _, pcm in items], file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["AISTACK_REALTIME_PARTIAL_S"] = str(args.partial_s)
        server = Server(workdir)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
                await server.wait_ready(session)
                # The plain upload path first (it also loads the model, so no run below pays for that).
                uploads = []
                for index, (_, pcm) in enumerate(items):
                    path = workdir / f"u{index}.wav"
                    write_wav(path, pcm, RATE)
                    started = time.monotonic()
                    async with session.post(server.base + "/v1/audio/transcriptions",
                                            data=form(path, model="whisper-1")) as response:
                        assert response.status == 200, await response.text()
                    uploads.append(time.monotonic() - started)
                upload_p50 = statistics.median(uploads[1:] or uploads)
                one = summary("one session", await stream_session(session, server.base, items, args.silence_ms,
                                                                    args.gap_s, 1))
                async with session.get(server.base + "/admin/api/metrics?recent=100") as response:
                    realtime = (await response.json())["realtime"]
                finals = [u for u in realtime["recent_utterances"] if u["outcome"] == "completed"]
                for u in finals[::-1]:
                    print("utterance", {k: u[k] for k in ("audio_s", "decode_ms", "final_latency_ms", "partials",
                                                            "early_final")}, file=sys.stderr)
                early_finals = sum(1 for u in finals if u["early_final"])
                rtf = statistics.median(u["decode_ms"] / 1000 / u["audio_s"] for u in finals)
                half = len(items) // 2 or 1
                both = await asyncio.gather(
                    stream_session(session, server.base, items[:half], args.silence_ms, args.gap_s, 11),
                    stream_session(session, server.base, items[half:] + items[:1], args.silence_ms, args.gap_s, 21),
                )
                two = summary("two sessions at once", both[0] + both[1])
        finally:
            server.stop()
    print(json.dumps({
        "upload_then_transcribe_p50_s": round(upload_p50, 3),
        "final_decode_rtf_p50": round(rtf, 4),
        "early_finals": f"{early_finals} of {len(finals)}",
        "server_final_latency_ms": realtime["final_latency_ms"],
        "ratio_speech_end_to_final_vs_upload": round(one["speech_end_to_final_p50_s"] / upload_p50, 3),
        "ratio_two_sessions_vs_one": round(two["speech_end_to_final_p50_s"] / one["speech_end_to_final_p50_s"], 3),
        "silence_duration_ms": args.silence_ms,
        "goal_stopped_to_final_p50_le_0.5_s": one["stopped_to_final_p50_s"] <= 0.5,
    }))


if __name__ == "__main__":
    asyncio.run(main())
