"""aistack: a local, OpenAI-compatible AI gateway.

Plugins import what they need from here, and only from here::

    from aistack_core import hookimpl, ModelCard, Segment, Malformed

Every name in ``__all__`` is part of the plugin API (``PLUGIN_API_VERSION``)
and documented in docs/plugins.md.
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
from .helpers import (  # noqa: E402
    is_out_of_memory, normalize_language, torch_free_memory_mb, torch_gpu_check, torch_gpus,
)
from .hookspecs import hookimpl  # noqa: E402
from .manifest import PLUGIN_API_VERSION, PluginManifest, PluginSetting  # noqa: E402
from .media.segments import clamp_words, sentence_groups, sentence_segments, split_sentences  # noqa: E402

# Names whose module needs the audio libraries (numpy, PyAV): imported on first
# use, so ``import aistack_core`` works on an installation without them.
_AUDIO_NAMES = {"time_stretch": "media.audio", "quiet_windows": "media.audio"}


def __getattr__(name: str):
    module = _AUDIO_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'aistack_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "__version__", "PLUGIN_API_VERSION", "hookimpl", "Config", "Device", "parse_device_names",
    "PluginManifest", "PluginSetting",
    "AsrBackend", "AudioInput", "CancelToken", "DoctorCheck", "ModelCard", "Segment", "SpeechOptions",
    "Transcription", "TranscriptionOptions", "TtsBackend", "Upstream", "VadProvider", "VadSettings",
    "VoiceActivityStream", "Word",
    "runs_on_this_machine", "upstream_urls",
    "DiarizationBackend", "DiarizationOptions", "SpeakerTurn",
    "AistackError", "BadGateway", "Cancelled", "GatewayTimeout", "Malformed", "Network", "Overflow", "Unknown",
    "normalize_language", "is_out_of_memory", "torch_gpus", "torch_free_memory_mb", "torch_gpu_check", "sentence_groups", "sentence_segments", "split_sentences",
    "clamp_words", "time_stretch", "quiet_windows",
]
