"""Speaker diarization with NVIDIA's Sortformer through NeMo.

Registers ``nvidia/diar_streaming_sortformer_4spk-v2.1`` (alias
``sortformer``): up to four speakers, end to end (no separate voice
activity detection or clustering step), speakers numbered in the order they
first speak.  Any Sortformer ``.nemo`` works — the offline
``diar_sortformer_4spk-v1`` too.

Why Sortformer rather than pyannote.audio: NeMo is already the optional
dependency of the Parakeet plugin, so the ``diarize`` extra adds no new
framework, and its one-model design has no clustering step to tune.  Its
limit is four speakers per recording.

Where the weights come from, in order: ``AISTACK_SORTFORMER_MODEL`` naming a
local ``.nemo`` file; that (or the default) hub id's ``.nemo`` in the local
Hugging Face cache; with ``AISTACK_ALLOW_DOWNLOADS=on``, NeMo's own download.

Streaming Sortformer models (v2 and later) keep a speaker cache and so read
a recording of any length in one pass.  Offline models are trained on
sessions of about 90 s, so longer audio is read in windows of
``AISTACK_SORTFORMER_WINDOW_S`` and each window's speakers are matched to the
ones already heard by the similarity of their encoder states; cancellation
is honoured between windows.  Each turn carries the mean encoder state of
its frames as a speaker vector, which the core uses to recognise known
speakers.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from nemo.collections.asr.models import SortformerEncLabelModel
from nemo.collections.asr.parts.utils.vad_utils import PostProcessingParams, ts_vad_post_processing
from omegaconf import OmegaConf

from aistack_core import (
    AudioInput,
    CancelToken,
    Config,
    DiarizationOptions,
    DoctorCheck,
    ModelCard,
    Network,
    Overflow,
    SpeakerTurn,
    hookimpl,
    is_out_of_memory,
)

from .manifests import SORTFORMER, SORTFORMER_MODEL, SORTFORMER_WINDOW_S
from .nemo_weights import resolve_nemo_weights

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = SORTFORMER

log = logging.getLogger("aistack.plugins.sortformer")

PROVIDER = "Sortformer"
MODEL_ID = "nvidia/diar_streaming_sortformer_4spk-v2.1"
ALIAS = "sortformer"
SAMPLE_RATE = 16000
MODEL_SETTING = SORTFORMER_MODEL.name
WINDOW_SETTING = SORTFORMER_WINDOW_S.name
# Offline Sortformer is trained on 90 s sessions.
DEFAULT_WINDOW_S = SORTFORMER_WINDOW_S.default
# Below this cosine similarity a window's speaker is taken for a new one.
SAME_SPEAKER_SIMILARITY = 0.6
# Sortformer's frame decision: a speaker talks where its sigmoid passes one half.
ACTIVE = 0.5

CARD = ModelCard(
    id=MODEL_ID,
    capabilities=("diarization",),
    owned_by="nvidia",
    provider=PROVIDER,
    aliases=(ALIAS,),
    auto_priority=10,
)


def resolve_weights(config: Config) -> Path | str:
    """A local ``.nemo`` path, or the hub id when NeMo may download it."""
    return resolve_nemo_weights(
        SORTFORMER_MODEL.read(config) or MODEL_ID, setting=MODEL_SETTING, default_id=MODEL_ID,
        what="Sortformer", provider=PROVIDER, allow_downloads=config.allow_downloads,
    )


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class LoadedSortformer:
    """The NeMo model, where it runs, and one lock (a NeMo model is not safe to call from two threads)."""

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = device
        self.streaming = bool(model.cfg.get("streaming_mode", False))
        self.frame_10ms = int(model.cfg.encoder.subsampling_factor)
        self.speaker_slots = int(model.cfg.max_num_of_spks)
        self.postprocessing = OmegaConf.structured(PostProcessingParams())
        self._lock = threading.Lock()

    def _signal(self, samples: np.ndarray):
        signal = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).unsqueeze(0).to(self.device)
        return signal, torch.tensor([signal.shape[1]], device=self.device)

    def _encode(self, samples: np.ndarray):
        signal, length = self._signal(samples)
        features, feature_length = self.model.process_signal(audio_signal=signal, audio_signal_length=length)
        features = features[:, :, : feature_length.max()]
        return features, feature_length

    @torch.no_grad()
    def activity(self, samples: np.ndarray, with_states: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-frame speaker probabilities (frames x speakers) and, when asked, the encoder states."""
        with self._lock:
            features, feature_length = self._encode(samples)
            states = None
            if self.streaming:
                probabilities = self.model.forward_streaming(features, feature_length)
                if with_states:
                    states, _ = self.model.frontend_encoder(features, feature_length)
            else:
                states, state_length = self.model.frontend_encoder(features, feature_length)
                probabilities = self.model.forward_infer(states, state_length)
        probabilities = probabilities[0].float().cpu().numpy()
        if states is not None:
            states = states[0].float().cpu().numpy()[: len(probabilities)]
        return probabilities, states

    @torch.no_grad()
    def embedding(self, samples: np.ndarray) -> np.ndarray:
        with self._lock:
            features, feature_length = self._encode(samples)
            states, _ = self.model.frontend_encoder(features, feature_length)
        return states[0].float().cpu().numpy().mean(axis=0)

    def segments(self, probabilities: np.ndarray) -> list[list[tuple[float, float]]]:
        """Each speaker's (start, end) seconds, by NeMo's own post-processing."""
        found = []
        for speaker in range(probabilities.shape[1]):
            stretches = ts_vad_post_processing(
                torch.from_numpy(probabilities[:, speaker]), cfg_vad_params=self.postprocessing,
                unit_10ms_frame_count=self.frame_10ms,
            )
            found.append([(float(start), float(end)) for start, end in stretches.tolist()])
        return found


@attrs.define
class SortformerBackend:
    config: Config
    card: ModelCard = CARD
    max_speakers: int = 4

    @property
    def window_s(self) -> float:
        return max(10.0, SORTFORMER_WINDOW_S.read(self.config))

    def unavailable(self) -> str | None:
        try:
            resolve_weights(self.config)
        except Network as exc:
            return exc.message
        return None

    def load(self) -> LoadedSortformer:
        source = resolve_weights(self.config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        location = torch.device(device)
        log.info("loading Sortformer from %s on %s", source, device)
        try:
            if isinstance(source, Path):
                model = SortformerEncLabelModel.restore_from(str(source), map_location=location)
            else:
                model = SortformerEncLabelModel.from_pretrained(source, map_location=location)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise Overflow("Not enough GPU memory to load Sortformer.", provider=PROVIDER) from exc
            log.warning("loading Sortformer from %s failed", source, exc_info=True)
            verb = "download" if isinstance(source, str) else "load"
            raise Network(f"Could not {verb} Sortformer from {source}: {type(exc).__name__}: {exc}",
                          provider=PROVIDER) from exc
        model.eval()
        return LoadedSortformer(model, device)

    def diarize(
        self, model: LoadedSortformer, audio: AudioInput, options: DiarizationOptions, cancel: CancelToken
    ) -> list[SpeakerTurn]:
        cancel.raise_if_cancelled()
        samples = np.asarray(audio.samples(SAMPLE_RATE), dtype=np.float32)
        window = len(samples) if model.streaming else int(self.window_s * SAMPLE_RATE)
        # Speakers heard so far, across windows: summed unit vectors of their encoder states.
        known: list[np.ndarray] = []
        turns: list[SpeakerTurn] = []
        for start in range(0, max(1, len(samples)), max(1, window)):
            cancel.raise_if_cancelled()
            piece = samples[start: start + window]
            if piece.size < SAMPLE_RATE // 10:
                break  # a sliver at the end holds no speaker worth naming
            try:
                # A streaming model's states would cost a second full-length encoder pass;
                # the core embeds short clips through ``embed`` instead when it needs vectors.
                probabilities, states = model.activity(piece, with_states=not model.streaming)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise Overflow(
                        f"Sortformer ran out of memory on {piece.size / SAMPLE_RATE:.0f} s of audio; lower "
                        f"{WINDOW_SETTING} or send shorter audio.", provider=PROVIDER,
                    ) from exc
                raise
            turns.extend(self._window_turns(model, probabilities, states, start / SAMPLE_RATE, known))
        return _join_across_windows(turns, 2 * model.frame_10ms / 100)

    def _window_turns(self, model: LoadedSortformer, probabilities: np.ndarray, states: np.ndarray | None,
                      offset: float, known: list[np.ndarray]) -> list[SpeakerTurn]:
        frame_s = model.frame_10ms / 100
        turns = []
        claimed: set[int] = set()
        for local, stretches in enumerate(model.segments(probabilities)):
            if not stretches:
                continue
            vector = None
            if states is not None:
                active = probabilities[:, local] > ACTIVE
                if active.any():
                    vector = _unit(states[active].mean(axis=0).astype(np.float64))
            speaker = self._global_speaker(vector, known, claimed, local)
            for start, end in stretches:
                embedding = None
                if states is not None:
                    frames = states[int(start / frame_s): max(int(start / frame_s) + 1, int(end / frame_s))]
                    if len(frames):
                        embedding = tuple(float(x) for x in frames.mean(axis=0))
                turns.append(SpeakerTurn(start + offset, end + offset, str(speaker), embedding))
        return turns

    @staticmethod
    def _global_speaker(vector: np.ndarray | None, known: list[np.ndarray], claimed: set[int], local: int) -> int:
        """Which speaker heard so far this window's speaker ``local`` is (a new one when none is alike)."""
        if vector is None:
            return local  # no encoder states: a streaming model's single pass, whose numbering is global already
        best, best_similarity = None, SAME_SPEAKER_SIMILARITY
        for index, centroid in enumerate(known):
            if index in claimed or centroid.shape != vector.shape:
                continue
            similarity = float(_unit(centroid) @ vector)
            if similarity >= best_similarity:
                best, best_similarity = index, similarity
        if best is None:
            known.append(vector.copy())
            best = len(known) - 1
        else:
            known[best] = known[best] + vector
        claimed.add(best)
        return best

    def embed(self, model: LoadedSortformer, samples: np.ndarray, cancel: CancelToken) -> tuple[float, ...]:
        cancel.raise_if_cancelled()
        return tuple(float(x) for x in model.embedding(np.asarray(samples, dtype=np.float32)))


def _join_across_windows(turns: list[SpeakerTurn], gap_s: float) -> list[SpeakerTurn]:
    """One turn where a speaker talks on across a window boundary (or a gap of a frame or two)."""
    joined: list[SpeakerTurn] = []
    last_of: dict[str, int] = {}
    for turn in sorted(turns, key=lambda t: (t.start, t.speaker)):
        index = last_of.get(turn.speaker)
        if index is not None and turn.start - joined[index].end <= gap_s:
            before = joined[index]
            embedding = before.embedding
            if before.embedding is not None and turn.embedding is not None:
                total = before.duration + turn.duration or 1.0
                embedding = tuple((a * before.duration + b * turn.duration) / total
                                  for a, b in zip(before.embedding, turn.embedding))
            joined[index] = attrs.evolve(before, end=max(before.end, turn.end), embedding=embedding)
            continue
        last_of[turn.speaker] = len(joined)
        joined.append(turn)
    return joined


@hookimpl
def register_diarization_backends(register, config: Config) -> None:
    register(SortformerBackend(config))


@hookimpl
def doctor_checks(config: Config) -> list[DoctorCheck]:
    """Whether the Sortformer weights are on disk (the GPU check is the same torch's as Parakeet's)."""
    missing = SortformerBackend(config).unavailable()
    if missing:
        return [DoctorCheck("Sortformer weights", "warn", missing,
                            f"huggingface-cli download {MODEL_ID}, or set {MODEL_SETTING} to a .nemo file")]
    return [DoctorCheck("Sortformer weights", "ok", "found on disk")]
