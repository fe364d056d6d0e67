"""An honest, tiny aistack backend: it finds speech by energy and says so.

It cannot recognise words; each segment's text is ``[speech]`` and the
segment times are where the audio's short-time energy rose above the noise
floor.  That makes it a useful voice-activity detector behind the same
OpenAI-shaped endpoint, and a complete example of a third-party plugin:

* the module is named in ``setup.cfg`` under the ``aistack`` entry-point group;
* it implements one hook, ``register_asr_backends``, and registers an object
  with a ``card``, a blocking ``load()`` and a blocking ``transcribe()``;
* it checks the cancel token between segments and raises aistack's typed
  errors rather than building HTTP responses;
* it declares the plugin API it was written for and carries its manifest in
  the module itself (``AISTACK_MANIFEST``), the simple choice for a plugin
  whose only dependency is numpy; see examples/aistack-tiny-tts for a
  manifest in a module of its own, read even when the plugin cannot import.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from aistack_core import CancelToken, ModelCard, PluginManifest, Segment, Transcription, hookimpl

AISTACK_PLUGIN_API = 1
AISTACK_MANIFEST = PluginManifest(
    name="energy_asr",
    summary="Reports where speech is, by signal energy (not what was said)",
    install_hint="pip install ./examples/aistack-energy-asr",
    models={"asr": ("energy-vad",)},
)

FRAME_S = 0.02
MIN_SPEECH_S = 0.2
MIN_GAP_S = 0.3


class EnergyAsr:
    card = ModelCard(
        id="energy-vad",
        capabilities=("asr",),
        owned_by="aistack-examples",
        provider="EnergyVAD",
        supports_streaming=True,
        auto_priority=1000,  # never preferred by `auto` while a real model is installed
    )

    def load(self) -> float:
        # Nothing to load; the "model" is the threshold ratio above the noise floor.
        return 4.0

    def transcribe(self, model: float, audio, options, cancel: CancelToken) -> Transcription:
        samples = audio.samples(16000)
        return Transcription(language=options.language or "und", duration=audio.duration,
                             segments=self._segments(samples, model, cancel))

    def _segments(self, samples: np.ndarray, ratio: float, cancel: CancelToken) -> Iterator[Segment]:
        frame = int(16000 * FRAME_S)
        count = len(samples) // frame
        if count == 0:
            return
        energy = np.sqrt(np.mean(samples[: count * frame].reshape(count, frame) ** 2, axis=1))
        floor = max(float(np.percentile(energy, 10)), 1e-4)
        active = energy > floor * ratio
        spans: list[list[float]] = []
        for index in np.flatnonzero(active):
            start = index * FRAME_S
            if spans and start - spans[-1][1] <= MIN_GAP_S:
                spans[-1][1] = start + FRAME_S
            else:
                spans.append([start, start + FRAME_S])
        kept = [span for span in spans if span[1] - span[0] >= MIN_SPEECH_S]
        for number, (start, end) in enumerate(kept):
            cancel.raise_if_cancelled()
            yield Segment(id=number, start=round(start, 2), end=round(end, 2), text="[speech]")


@hookimpl
def register_asr_backends(register, config):
    register(EnergyAsr())
