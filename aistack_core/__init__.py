"""aistack: a local, OpenAI-compatible AI gateway.

Plugins import what they need from here::

    from aistack_core import hookimpl, ModelCard, Segment, Malformed
"""

__version__ = "0.1.0"

from .backends import (  # noqa: E402
    AsrBackend,
    AudioInput,
    CancelToken,
    DiarizationBackend,
    DiarizationOptions,
    DoctorCheck,
    ModelCard,
    Segment,
    SpeakerTurn,
    SpeechOptions,
    Transcription,
    TranscriptionOptions,
    TtsBackend,
    Upstream,
    VadProvider,
    VoiceActivityStream,
    VadSettings,
    Word,
    runs_on_this_machine,
    upstream_urls,
)
from .config import Config  # noqa: E402
from .devices import Device, parse_device_names  # noqa: E402
from .errors import (  # noqa: E402
    AistackError,
    BadGateway,
    Cancelled,
    GatewayTimeout,
    Malformed,
    Network,
    Overflow,
    Unknown,
)
from .hookspecs import hookimpl  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "Config", "Device", "parse_device_names",
    "AsrBackend", "AudioInput", "CancelToken", "DoctorCheck", "ModelCard", "Segment", "SpeechOptions",
    "Transcription", "TranscriptionOptions", "TtsBackend", "Upstream", "VadProvider", "VadSettings",
    "VoiceActivityStream", "Word",
    "runs_on_this_machine", "upstream_urls",
    "DiarizationBackend", "DiarizationOptions", "SpeakerTurn",
    "AistackError", "BadGateway", "Cancelled", "GatewayTimeout", "Malformed", "Network", "Overflow", "Unknown",
]
