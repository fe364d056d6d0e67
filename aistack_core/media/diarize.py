"""Who spoke when: speaker turns joined to a transcript, known speakers, RTTM.

A diarization backend finds speaker turns; any speech-to-text backend finds
the words.  This module puts the two together, the same way for every
route that answers with speakers (diarized transcriptions, the diarization
endpoint):

- each word goes to the speaker whose turns overlap its time the most (the
  nearest turn when none overlaps: words often start a hair before the
  turn the diarizer found); a backend without word times has each segment
  assigned whole, by the same overlap rule;
- consecutive words of one speaker within one segment form a speaker
  segment, so a segment is cut wherever the speaker changes;
- speakers are labelled "A", "B", ... in order of first appearance, or
  with the names of known speakers whose reference clips sound most like
  them (cosine similarity of the backend's speaker vectors).

Everything here but :func:`find_turns` and :func:`decode_reference` is pure
and fast; those two block (model inference, audio decode) and run in
worker threads.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import string
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs
import numpy as np

from ..backends import CancelToken, DiarizationOptions, Segment, SpeakerTurn, Word, load_on
from ..context import model_cache_key
from ..errors import Malformed, Network
from ..forms import Field, Form
from .segments import join_words

SAMPLE_RATE = 16000
# OpenAI accepts up to four known speakers per request.
MAX_KNOWN_SPEAKERS = 4
# OpenAI asks for 2-10 s reference clips; a little slack each side.
MIN_REFERENCE_S = 0.5
MAX_REFERENCE_S = 30.0
MAX_NAME_CHARS = 64
# At most this much of one speaker's audio is embedded to describe them.
SPEAKER_CLIP_S = 30.0
# Below this cosine similarity a speaker is not taken for a known one.
MIN_SIMILARITY = 0.5
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@attrs.frozen
class SpeakerSegment:
    """A stretch of transcript spoken by one speaker (already labelled)."""

    speaker: str
    segment: Segment


@attrs.frozen
class KnownSpeaker:
    name: str
    samples: np.ndarray = attrs.field(eq=False, repr=False)


# --- labels ---------------------------------------------------------------------


def letter_label(index: int) -> str:
    """"A", "B", ..., "Z", "AA", "AB", ... (spreadsheet columns)."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = string.ascii_uppercase[rest] + label
    return label


def clean_turns(turns: Iterable[SpeakerTurn], duration: float | None) -> list[SpeakerTurn]:
    """Turns sorted by start, clamped to the audio, without empty ones."""
    cleaned = []
    for turn in turns:
        start, end = max(0.0, float(turn.start)), float(turn.end)
        if duration is not None:
            end = min(end, duration)
        if end > start:
            cleaned.append(attrs.evolve(turn, start=start, end=end, speaker=str(turn.speaker)))
    return sorted(cleaned, key=lambda t: (t.start, t.end, t.speaker))


def talk_time(turns: Sequence[SpeakerTurn]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for turn in turns:
        totals[turn.speaker] = totals.get(turn.speaker, 0.0) + turn.duration
    return totals


def cap_speakers(turns: Sequence[SpeakerTurn], most: int) -> list[SpeakerTurn]:
    """Keep the ``most`` speakers who talk longest; give the others' turns to the nearest kept turn's speaker."""
    totals = talk_time(turns)
    if len(totals) <= most:
        return list(turns)
    kept = set(sorted(totals, key=lambda s: (-totals[s], s))[:most])
    anchors = [t for t in turns if t.speaker in kept]
    capped = []
    for turn in turns:
        if turn.speaker not in kept:
            turn = attrs.evolve(turn, speaker=speaker_at(anchors, turn.start, turn.end) or turn.speaker, embedding=None)
        capped.append(turn)
    return capped


def relabel(turns: Sequence[SpeakerTurn], names: dict[str, str] | None = None) -> list[SpeakerTurn]:
    """Backend labels → known names where matched, else letters in order of first appearance.

    Letters skip any a known name already uses, so two speakers never share a label.
    """
    names = names or {}
    taken = set(names.values())
    labels: dict[str, str] = dict(names)
    next_letter = 0
    for turn in turns:
        if turn.speaker in labels:
            continue
        while letter_label(next_letter) in taken:
            next_letter += 1
        labels[turn.speaker] = letter_label(next_letter)
        taken.add(labels[turn.speaker])
    return [attrs.evolve(turn, speaker=labels[turn.speaker]) for turn in turns]


# --- words to speakers ----------------------------------------------------------------


def speaker_at(turns: Sequence[SpeakerTurn], start: float, end: float) -> str | None:
    """The speaker whose turns overlap [start, end] the most; the nearest turn's when none overlaps."""
    if not turns:
        return None
    overlap: dict[str, float] = {}
    for turn in turns:
        shared = min(end, turn.end) - max(start, turn.start)
        if shared > 0:
            overlap[turn.speaker] = overlap.get(turn.speaker, 0.0) + shared
    if overlap:
        # Ties go to the speaker who talked first among them, so the answer is stable.
        return max(overlap, key=lambda s: overlap[s])
    middle = (start + end) / 2
    nearest = min(turns, key=lambda t: (max(t.start - middle, middle - t.end, 0.0), t.start))
    return nearest.speaker


def _run_segment(words: Sequence[Word], segment_id: int, source: Segment) -> Segment:
    return Segment(
        id=segment_id, start=words[0].start, end=words[-1].end,
        text=join_words([w.word for w in words]), words=tuple(words), extra=dict(source.extra),
    )


def assign_speakers(
    segments: Iterable[Segment], turns: Sequence[SpeakerTurn], first_id: int = 0, fallback: str = "A"
) -> list[SpeakerSegment]:
    """Cut ``segments`` where the speaker changes and label each piece.

    ``turns`` must already carry the labels clients see (:func:`relabel`).
    Without any turns (silence, or speech the diarizer did not pick up)
    everything goes to ``fallback``.
    """
    assigned: list[SpeakerSegment] = []
    for segment in segments:
        if not segment.words:
            speaker = speaker_at(turns, segment.start, segment.end) or fallback
            assigned.append(SpeakerSegment(speaker, attrs.evolve(segment, id=first_id + len(assigned))))
            continue
        run: list[Word] = []
        run_speaker = None
        for word in segment.words:
            speaker = speaker_at(turns, word.start, word.end) or fallback
            if run and speaker != run_speaker:
                assigned.append(SpeakerSegment(run_speaker, _run_segment(run, first_id + len(assigned), segment)))
                run = []
            run.append(word)
            run_speaker = speaker
        if run:
            assigned.append(SpeakerSegment(run_speaker, _run_segment(run, first_id + len(assigned), segment)))
    return assigned


# --- known speakers -------------------------------------------------------------------


def _unit(vector: Any) -> np.ndarray | None:
    array = np.asarray(vector, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(array))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return array / norm


def match_known(speakers: dict[str, Any], known: dict[str, Any], min_similarity: float = MIN_SIMILARITY) -> dict[str, str]:
    """Backend speaker label → known name, one to one, most similar pairs first."""
    pairs = []
    for label, vector in speakers.items():
        unit = _unit(vector)
        if unit is None:
            continue
        for name, reference in known.items():
            ref = _unit(reference)
            if ref is None or ref.shape != unit.shape:
                continue
            pairs.append((float(unit @ ref), label, name))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    matched: dict[str, str] = {}
    used: set[str] = set()
    for similarity, label, name in pairs:
        if similarity < min_similarity or label in matched or name in used:
            continue
        matched[label] = name
        used.add(name)
    return matched


def speaker_clips(turns: Sequence[SpeakerTurn], samples: np.ndarray, most_s: float = SPEAKER_CLIP_S) -> dict[str, np.ndarray]:
    """Up to ``most_s`` of each speaker's audio, longest turns first (they carry the cleanest voice)."""
    pieces: dict[str, list[np.ndarray]] = {}
    taken: dict[str, float] = {}
    for turn in sorted(turns, key=lambda t: -t.duration):
        if taken.get(turn.speaker, 0.0) >= most_s:
            continue
        piece = samples[int(turn.start * SAMPLE_RATE): int(turn.end * SAMPLE_RATE)]
        if piece.size:
            pieces.setdefault(turn.speaker, []).append(piece)
            taken[turn.speaker] = taken.get(turn.speaker, 0.0) + piece.size / SAMPLE_RATE
    return {speaker: np.concatenate(parts) for speaker, parts in pieces.items()}


def _speaker_vectors(backend: Any, model: Any, turns: Sequence[SpeakerTurn], audio: Any, cancel: CancelToken) -> dict[str, Any]:
    by_speaker: dict[str, list[SpeakerTurn]] = {}
    for turn in turns:
        by_speaker.setdefault(turn.speaker, []).append(turn)
    vectors: dict[str, Any] = {}
    missing = []
    for speaker, own in by_speaker.items():
        if all(t.embedding is not None for t in own):
            # Weighted by duration: a long turn says more about a voice than a cough.
            vectors[speaker] = sum(np.asarray(t.embedding, dtype=np.float64) * t.duration for t in own)
        else:
            missing.append(speaker)
    if missing:
        clips = speaker_clips([t for t in turns if t.speaker in missing], audio.samples(SAMPLE_RATE))
        for speaker, clip in clips.items():
            cancel.raise_if_cancelled()
            vectors[speaker] = backend.embed(model, clip, cancel)
    return vectors


def find_turns(
    backend: Any, model: Any, audio: Any, options: DiarizationOptions, known: Sequence[KnownSpeaker],
    cancel: CancelToken,
) -> list[SpeakerTurn]:
    """Diarize ``audio`` and label the turns (blocking: run in a worker thread)."""
    cancel.raise_if_cancelled()
    turns = clean_turns(backend.diarize(model, audio, options, cancel), getattr(audio, "duration", None))
    most = options.num_speakers or options.max_speakers
    if most:
        turns = cap_speakers(turns, most)
    names: dict[str, str] = {}
    if known and turns:
        references = {}
        for speaker in known:
            cancel.raise_if_cancelled()
            references[speaker.name] = backend.embed(model, speaker.samples, cancel)
        names = match_known(_speaker_vectors(backend, model, turns, audio, cancel), references)
    cancel.raise_if_cancelled()
    return relabel(turns, names)


# --- running inside a held slot -------------------------------------------------------


async def turns_in_slot(run: Any, diarizer: Any, audio: Any, options: DiarizationOptions,
                        known: Sequence[KnownSpeaker]) -> list[SpeakerTurn]:
    """Diarize within another inference's hold (a transcription): same slot, same cancel token.

    The diarizer's model comes from the model cache like any other and stays
    pinned while it works.
    """
    cache = run.request.app[model_cache_key]
    # On the device whose slot the transcription holds, beside its ASR model.
    loader = functools.partial(load_on, diarizer.backend, run.device)
    device = None if run.device is None else run.device.name
    async with cache.use(("diarization", diarizer.card.id), "diarization", loader, device=device) as model:
        return await run.in_thread(find_turns, diarizer.backend, model, audio, options, known, run.cancel)


# --- what clients send ------------------------------------------------------------------


def check_speaker_counts(options: DiarizationOptions, most_supported: int) -> None:
    """400 naming the field for counts the diarizer cannot honour or that contradict each other."""
    for name in ("num_speakers", "min_speakers", "max_speakers"):
        value = getattr(options, name)
        if value is not None and value > most_supported:
            raise Malformed(
                f"{name}={value} is more speakers than this diarizer tells apart (at most {most_supported}).",
                param=name, code="unsupported_value",
            )
    if options.min_speakers is not None and options.max_speakers is not None \
            and options.min_speakers > options.max_speakers:
        raise Malformed("min_speakers is larger than max_speakers.", param="min_speakers")
    if options.num_speakers is not None:
        for name in ("min_speakers", "max_speakers"):
            value = getattr(options, name)
            if value is not None and ((name == "min_speakers" and value > options.num_speakers)
                                      or (name == "max_speakers" and value < options.num_speakers)):
                raise Malformed(f"{name} contradicts num_speakers.", param=name)


def check_known_names(names: Sequence[str], references: Sequence[str]) -> None:
    """The cheap checks on ``known_speaker_names[]`` / ``known_speaker_references[]``, before any decode."""
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise Malformed(
            f"At most {MAX_KNOWN_SPEAKERS} known speakers per request, got {len(names)}.",
            param="known_speaker_names",
        )
    if names and not references:
        raise Malformed(
            "known_speaker_names needs one reference clip per name in known_speaker_references "
            "(short audio as data URLs).", param="known_speaker_references",
        )
    if references and not names:
        raise Malformed("known_speaker_references needs a name for each clip in known_speaker_names.",
                        param="known_speaker_names")
    if len(names) != len(references):
        raise Malformed(
            f"{len(names)} known_speaker_names but {len(references)} known_speaker_references; send one clip per name.",
            param="known_speaker_references",
        )
    seen = set()
    for name in names:
        # Names end up inside WebVTT voice tags and RTTM columns.
        if len(name) > MAX_NAME_CHARS or any(c in name for c in "<>&") or any(c.isspace() and c != " " for c in name):
            raise Malformed(
                f"Speaker name {name[:MAX_NAME_CHARS]!r} must be at most {MAX_NAME_CHARS} characters, without <, > or &.",
                param="known_speaker_names",
            )
        if name.lower() in seen:
            raise Malformed(f"Speaker name {name!r} is given twice.", param="known_speaker_names")
        seen.add(name.lower())


SPEAKER_FIELDS = (
    Field("num_speakers", "int", minimum=1, maximum=64),
    Field("min_speakers", "int", minimum=1, maximum=64),
    Field("max_speakers", "int", minimum=1, maximum=64),
    Field("known_speaker_names", "list", default=[]),
    Field("known_speaker_references", "list", default=[], strip=True),
)
# A reference is a few seconds of audio; a data URL larger than this is not one.
MAX_REFERENCE_BYTES = 4 * 1024 * 1024
# ``read_form``'s ``long_text_fields`` for forms with SPEAKER_FIELDS: a reference as a
# base64 data URL (4/3 of its bytes, plus the URL's head) may be that long.
SPEAKER_TEXT_LIMITS = {"known_speaker_references": MAX_REFERENCE_BYTES * 4 // 3 + 1024}


def speaker_options(form: Form) -> DiarizationOptions:
    """``num_speakers`` / ``min_speakers`` / ``max_speakers`` of a form read with :data:`SPEAKER_FIELDS`."""
    return DiarizationOptions(
        num_speakers=form["num_speakers"], min_speakers=form["min_speakers"], max_speakers=form["max_speakers"],
    )


def read_known_speakers(form: Form, directory: Path) -> list[KnownSpeaker]:
    """The known speakers of a form read with :data:`SPEAKER_FIELDS` (blocking: decodes audio)."""
    names, references = form["known_speaker_names"], form["known_speaker_references"]
    check_known_names(names, references)
    return [
        KnownSpeaker(name, decode_reference(reference, index, directory, MAX_REFERENCE_BYTES))
        for index, (name, reference) in enumerate(zip(names, references))
    ]


def decode_reference(data_url: str, index: int, directory: Path, max_bytes: int) -> np.ndarray:
    """One ``known_speaker_references[]`` entry (a data URL) as 16 kHz mono samples (blocking)."""
    from .audio import DecodedAudio  # PyAV: only needed once someone sends references

    param = "known_speaker_references"
    match = _DATA_URL.match(data_url)
    if match is None or not match.group("b64"):
        raise Malformed(f"Reference {index} is not a base64 data URL (data:audio/wav;base64,...).", param=param)
    payload = data_url[match.end():]
    if len(payload) * 3 // 4 > max_bytes:
        raise Malformed(f"Reference {index} is larger than {max_bytes // 1024} KiB.", param=param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"Reference {index} is not valid base64.", param=param) from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        spooled = tempfile.NamedTemporaryFile(dir=directory, prefix="reference-", suffix=".audio")
    except OSError as exc:
        raise Network(f"Cannot spool a speaker reference in {directory} ({exc.strerror}); check AISTACK_UPLOAD_DIR.") from exc
    with spooled:
        spooled.write(raw)
        spooled.flush()
        try:
            audio = DecodedAudio.open(spooled.name)
            samples = audio.samples(SAMPLE_RATE)
        except Malformed as exc:
            raise Malformed(f"Reference {index}: {exc.message}", param=param) from None
    seconds = samples.size / SAMPLE_RATE
    if not MIN_REFERENCE_S <= seconds <= MAX_REFERENCE_S:
        raise Malformed(
            f"Reference {index} lasts {seconds:.1f} s; use a clip of {MIN_REFERENCE_S:g}-{MAX_REFERENCE_S:g} s.",
            param=param,
        )
    return samples


# --- answers ----------------------------------------------------------------------------


def turn_json(turn: SpeakerTurn) -> dict[str, Any]:
    return {"speaker": turn.speaker, "start": round(turn.start, 3), "end": round(turn.end, 3)}


def to_rttm(turns: Sequence[SpeakerTurn], recording: str = "audio") -> str:
    """The NIST RTTM text: one ``SPEAKER`` line per turn (names' spaces become underscores)."""
    lines = [
        f"SPEAKER {recording} 1 {turn.start:.3f} {turn.duration:.3f} <NA> <NA> {turn.speaker.replace(' ', '_')} <NA> <NA>"
        for turn in turns
    ]
    return "".join(line + "\n" for line in lines)


def diarized_segment_json(spoken: SpeakerSegment) -> dict[str, Any]:
    """OpenAI's ``transcript.text.segment`` (a diarized_json segment, and the streamed event)."""
    segment = spoken.segment
    return {
        "type": "transcript.text.segment",
        "id": f"seg_{segment.id}",
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text.strip(),
        "speaker": spoken.speaker,
    }


def voice_tagged(spoken: Sequence[SpeakerSegment]) -> list[Segment]:
    """Segments whose text carries a WebVTT voice tag (``<v A>...``), for srt and vtt."""
    return [attrs.evolve(s.segment, text=f"<v {s.speaker}>{s.segment.text.strip()}") for s in spoken]
