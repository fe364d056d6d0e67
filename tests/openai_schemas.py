"""The few components of OpenAI's published API reference our answers must satisfy.

Written from the reference (components CreateTranscriptionResponseJson and
VerboseJson, TranscriptionSegment, TranscriptionWord, TranscriptTextDeltaEvent
and DoneEvent, TranscriptTextUsageDuration, CreateTranslationResponseJson and
VerboseJson, ErrorResponse / Error, ListModelsResponse, Model) as JSON Schema.
Only what OpenAI *requires* is constrained: extra properties are allowed,
because our contract adds fields (kind, provider, language on events, ...);
removals are not.
"""

from __future__ import annotations

from typing import Any

import jsonschema

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
STRING = {"type": "string"}
NULLABLE_STRING = {"type": ["string", "null"]}

USAGE_DURATION = {
    "type": "object",
    "required": ["type", "seconds"],
    "properties": {"type": {"const": "duration"}, "seconds": {"type": "number", "minimum": 0}},
}

LOGPROB = {
    "type": "object",
    "properties": {
        "token": STRING,
        "logprob": {"type": "number", "maximum": 0},
        "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
    },
}

TRANSCRIPTION_WORD = {
    "type": "object",
    "required": ["word", "start", "end"],
    "properties": {"word": STRING, "start": NUMBER, "end": NUMBER},
}

# Every field OpenAI lists for a segment is required there.
TRANSCRIPTION_SEGMENT = {
    "type": "object",
    "required": [
        "id", "seek", "start", "end", "text", "tokens",
        "temperature", "avg_logprob", "compression_ratio", "no_speech_prob",
    ],
    "properties": {
        "id": INTEGER, "seek": INTEGER, "start": NUMBER, "end": NUMBER, "text": STRING,
        "tokens": {"type": "array", "items": INTEGER},
        "temperature": NUMBER, "avg_logprob": NUMBER, "compression_ratio": NUMBER,
        "no_speech_prob": {"type": "number", "minimum": 0, "maximum": 1},
    },
}

# What a backend without Whisper's decoder scores can truthfully send: the
# segment's identity, place and text (scores, when present, must be numbers).
SEGMENT_WITHOUT_SCORES = {
    **TRANSCRIPTION_SEGMENT,
    "required": ["id", "seek", "start", "end", "text", "tokens"],
}

TRANSCRIPTION_JSON = {
    "type": "object",
    "required": ["text"],
    "properties": {
        "text": STRING,
        "logprobs": {"type": "array", "items": LOGPROB},
        "usage": USAGE_DURATION,
    },
}


def verbose_json(segment_schema: dict = TRANSCRIPTION_SEGMENT) -> dict:
    return {
        "type": "object",
        "required": ["language", "duration", "text"],
        "properties": {
            "language": STRING,
            "duration": NUMBER,
            "text": STRING,
            "words": {"type": "array", "items": TRANSCRIPTION_WORD},
            "segments": {"type": "array", "items": segment_schema},
            "usage": USAGE_DURATION,
        },
    }


TRANSCRIPTION_VERBOSE_JSON = verbose_json()

TRANSLATION_JSON = {"type": "object", "required": ["text"], "properties": {"text": STRING}}

TRANSLATION_VERBOSE_JSON = {
    "type": "object",
    "required": ["language", "duration", "text"],
    "properties": {
        "language": STRING, "duration": NUMBER, "text": STRING,
        "segments": {"type": "array", "items": TRANSCRIPTION_SEGMENT},
    },
}

TEXT_DELTA_EVENT = {
    "type": "object",
    "required": ["type", "delta"],
    "properties": {
        "type": {"const": "transcript.text.delta"},
        "delta": STRING,
        "logprobs": {"type": "array", "items": LOGPROB},
    },
}

TEXT_DONE_EVENT = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"const": "transcript.text.done"},
        "text": STRING,
        "logprobs": {"type": "array", "items": LOGPROB},
        "usage": USAGE_DURATION,
    },
}

ERROR_RESPONSE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "param", "type"],
            "properties": {"code": NULLABLE_STRING, "message": STRING, "param": NULLABLE_STRING, "type": STRING},
        },
    },
}

MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING},
}

LIST_MODELS_RESPONSE = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL}},
}


def validate(document: Any, schema: dict) -> None:
    """Raise ``jsonschema.ValidationError`` naming the first violation."""
    jsonschema.Draft202012Validator(schema).validate(document)
