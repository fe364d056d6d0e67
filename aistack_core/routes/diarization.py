"""``POST /v1/audio/diarization``: who spoke when, without the words.

read the form (the file spools to disk) → resolve the diarizer → check the
speaker counts and decode any known speakers' references → probe the audio
→ diarize inside the inference context (slot, cancel, cached model) →
answer with the turns as a JSON list, or as RTTM text.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..context import config_key, registry_key
from ..forms import Field, defer_continue, read_form, upload_policy
from ..inference import inference
from ..media.audio import DecodedAudio
from ..media.diarize import (
    SPEAKER_FIELDS, SPEAKER_TEXT_LIMITS, check_known_names, check_speaker_counts, find_turns, read_known_speakers,
    speaker_options, to_rttm, turn_json,
)
from ..observe.record import request_info

FIELDS = (
    Field("model", "str", default=""),
    Field("response_format", "enum", default="json", choices=("json", "rttm")),
    *SPEAKER_FIELDS,
)


async def post_diarization(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[config_key]
    info = request_info(request)
    info.capability = "diarization"
    form = await read_form(
        request, FIELDS,
        uploads=upload_policy(config),
        file_fields=("file",),
        long_text_fields=SPEAKER_TEXT_LIMITS,
    )
    try:
        upload = form.require_file("file")
        info.requested_model = form["model"] or None
        info.response_format = form["response_format"]
        check_known_names(form["known_speaker_names"], form["known_speaker_references"])
        entry = await asyncio.to_thread(app[registry_key].resolve_diarization, form["model"])
        options = speaker_options(form)
        check_speaker_counts(options, entry.backend.max_speakers)
        known = await asyncio.to_thread(read_known_speakers, form, config.upload_dir)
        audio = await asyncio.to_thread(DecodedAudio.open, upload.path, config.max_audio_min * 60)
        info.audio_sec = round(audio.duration, 3)
        async with inference(request, "diarization", entry) as run:
            run.audio_seconds = audio.duration
            turns = await run.in_thread(find_turns, entry.backend, run.model, audio, options, known, run.cancel)
    finally:
        form.discard()
    if form["response_format"] == "rttm":
        response = web.Response(text=to_rttm(turns), content_type="text/plain")
    else:
        response = web.json_response([turn_json(turn) for turn in turns])
    response.headers["X-Aistack-Model"] = entry.card.id
    return response


def setup(app: web.Application) -> None:
    app.router.add_route("POST", "/v1/audio/diarization", post_diarization, expect_handler=defer_continue)
