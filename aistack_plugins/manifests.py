"""The built-in plugins' manifests: what each serves, how to install it, what it reads.

This module imports nothing but ``aistack_core``, so it loads on every
installation, including one without a plugin's extra: the gateway can then
answer ``model=parakeet`` with "install it with: pip install
'aistack[parakeet]'" instead of "unknown model".  Each plugin module reads its
settings through the ``PluginSetting`` objects declared here, so a default
documented here is the default in use.  Entry points: ``aistack.manifests``
in setup.cfg, one per plugin, under the plugin's own entry-point name.
"""

from __future__ import annotations

from aistack_core import PluginManifest, PluginSetting


def _extra(name: str) -> str:
    return f"pip install 'aistack[{name}]'"


# --- faster-whisper ------------------------------------------------------------------

# Every size faster-whisper can serve, with its short synonyms; faster_whisper.SIZE_RANKS
# ranks the same sizes (a test keeps the two lists equal).
WHISPER_SIZES = (
    "tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
    "large-v1", "large-v2", "large-v3", "large-v3-turbo",
    "distil-small.en", "distil-medium.en", "distil-large-v2", "distil-large-v3", "distil-large-v3.5",
)
WHISPER_SYNONYMS = ("large", "turbo")

WHISPER_DEFAULT = PluginSetting(
    "AISTACK_WHISPER_DEFAULT", "str", None, "the model OpenAI's whisper-1 maps to (default: the largest installed)"
)
WHISPER_DIR = PluginSetting(
    "AISTACK_WHISPER_DIR", "path", None,
    "extra CTranslate2 Whisper models, one folder per size (small, large-v3, ...)",
)
WHISPER_BATCHED_ABOVE_S = PluginSetting(
    "AISTACK_WHISPER_BATCHED_ABOVE_S", "float", 15.0,
    "audio longer than this is cut at pauses (Silero VAD) and decoded with faster-whisper's batched pipeline",
)

FASTER_WHISPER = PluginManifest(
    name="faster_whisper",
    summary="Whisper speech-to-text through faster-whisper (CTranslate2)",
    install_hint=_extra("whisper"),
    models={"asr": (
        "whisper-1",
        *(f"whisper-{size}" for size in (*WHISPER_SIZES, *WHISPER_SYNONYMS)),
        *WHISPER_SIZES, *WHISPER_SYNONYMS,
    )},
    settings=(WHISPER_DEFAULT, WHISPER_DIR, WHISPER_BATCHED_ABOVE_S),
)

# --- Parakeet ------------------------------------------------------------------------

PARAKEET_MODEL = PluginSetting(
    "AISTACK_PARAKEET_MODEL", "str", None, "a local .nemo file (or hub id) for Parakeet instead of the default"
)
PARAKEET_LOCAL_ATTENTION_ABOVE_S = PluginSetting(
    "AISTACK_PARAKEET_LOCAL_ATTENTION_ABOVE_S", "float", 300.0,
    "longer audio switches Parakeet to local attention (memory grows linearly)",
)

PARAKEET = PluginManifest(
    name="parakeet",
    summary="NVIDIA Parakeet TDT 0.6B v3 speech-to-text through NeMo (English + 24 European languages)",
    install_hint=_extra("parakeet"),
    models={"asr": ("nvidia/parakeet-tdt-0.6b-v3", "parakeet")},
    settings=(PARAKEET_MODEL, PARAKEET_LOCAL_ATTENTION_ABOVE_S),
)

# --- SenseVoice ----------------------------------------------------------------------

SENSEVOICE_MODEL = PluginSetting(
    "AISTACK_SENSEVOICE_MODEL", "str", None, "a local FunASR folder (or hub id) for SenseVoice"
)
SENSEVOICE_VAD_MODEL = PluginSetting(
    "AISTACK_SENSEVOICE_VAD_MODEL", "str", None, "a local FunASR folder (or hub id) for SenseVoice's fsmn-vad"
)

SENSEVOICE = PluginManifest(
    name="sensevoice",
    summary="SenseVoice Small speech-to-text through FunASR (Chinese, Cantonese, English, Japanese, Korean)",
    install_hint=_extra("sensevoice"),
    models={"asr": ("iic/SenseVoiceSmall", "sensevoice")},
    settings=(SENSEVOICE_MODEL, SENSEVOICE_VAD_MODEL),
)

# --- Piper ---------------------------------------------------------------------------

PIPER_VOICES_DIR = PluginSetting(
    "AISTACK_PIPER_VOICES_DIR", "path", None, "more Piper voices (*.onnx + *.onnx.json), each its own model id"
)
PIPER_THREADS = PluginSetting(
    "AISTACK_PIPER_THREADS", "int", None, "ONNX threads per Piper voice (default: the usable cores, at most 4)"
)

PIPER = PluginManifest(
    name="piper",
    summary="Piper text-to-speech in process on the CPU",
    install_hint=_extra("piper"),
    models={"tts": ("piper-en_US-joe-medium", "piper", "piper-joe")},
    settings=(PIPER_VOICES_DIR, PIPER_THREADS),
)

# --- upstreams (no extra: they need only aiohttp) ---------------------------------------

QWEN3_TTS_URL = PluginSetting("AISTACK_QWEN3_TTS_URL", "str", "http://127.0.0.1:17860", "the Qwen3-TTS (vLLM-Omni) container")
QWEN3_TTS_CONNECT_TIMEOUT_S = PluginSetting(
    "AISTACK_QWEN3_TTS_CONNECT_TIMEOUT_S", "float", 5.0, "seconds to connect to the TTS upstream"
)
QWEN3_TTS_READ_TIMEOUT_S = PluginSetting(
    "AISTACK_QWEN3_TTS_READ_TIMEOUT_S", "float", 600.0,
    "seconds to wait for the TTS upstream (its first request after a start compiles for minutes)",
)

QWEN3_TTS_DEVICES = PluginSetting(
    "AISTACK_QWEN3_TTS_DEVICES", "str", None,
    "the gateway devices its work runs on (cuda:0, all, none; default all when the URL is on this machine)",
)

QWEN3_TTS = PluginManifest(
    name="qwen3_tts",
    summary="Qwen3-TTS in vLLM-Omni's container, reached over HTTP",
    settings=(QWEN3_TTS_URL, QWEN3_TTS_CONNECT_TIMEOUT_S, QWEN3_TTS_READ_TIMEOUT_S, QWEN3_TTS_DEVICES),
)

OLLAMA_URL = PluginSetting("AISTACK_OLLAMA_URL", "str", "http://127.0.0.1:11434", "the Ollama daemon")
OLLAMA_CONNECT_TIMEOUT_S = PluginSetting("AISTACK_OLLAMA_CONNECT_TIMEOUT_S", "float", 5.0, "seconds to connect to Ollama")
OLLAMA_READ_TIMEOUT_S = PluginSetting(
    "AISTACK_OLLAMA_READ_TIMEOUT_S", "float", 600.0, "seconds to wait for Ollama (a read timeout answers 504)"
)

OLLAMA_DEVICES = PluginSetting(
    "AISTACK_OLLAMA_DEVICES", "str", None,
    "the gateway devices Ollama's work runs on (cuda:0,cuda:1, all, none; default all when the URL is on this machine)",
)

OLLAMA = PluginManifest(
    name="ollama",
    summary="Chat and embeddings through Ollama's OpenAI-compatible API",
    settings=(OLLAMA_URL, OLLAMA_CONNECT_TIMEOUT_S, OLLAMA_READ_TIMEOUT_S, OLLAMA_DEVICES),
)

OPENAI_UPSTREAMS = PluginSetting(
    "AISTACK_OPENAI_UPSTREAMS", "str", None,
    "OpenAI-compatible servers as name=url pairs, comma-separated (a bare URL adds a replica); per server, "
    "AISTACK_OPENAI_UPSTREAM_<NAME>_API_KEY and AISTACK_OPENAI_UPSTREAM_<NAME>_LOCAL (on/off)",
)
OPENAI_CONNECT_TIMEOUT_S = PluginSetting(
    "AISTACK_OPENAI_CONNECT_TIMEOUT_S", "float", 5.0, "seconds to connect to an OpenAI-compatible server"
)
OPENAI_READ_TIMEOUT_S = PluginSetting(
    "AISTACK_OPENAI_READ_TIMEOUT_S", "float", 600.0, "seconds to wait for an OpenAI-compatible server"
)

OPENAI_COMPATIBLE = PluginManifest(
    name="openai_compatible",
    summary="Any OpenAI-compatible LLM server (vLLM, llama.cpp, SGLang, LM Studio) as an upstream",
    settings=(OPENAI_UPSTREAMS, OPENAI_CONNECT_TIMEOUT_S, OPENAI_READ_TIMEOUT_S),
)

# --- Sortformer (speaker diarization) -------------------------------------------------

SORTFORMER_MODEL = PluginSetting(
    "AISTACK_SORTFORMER_MODEL", "str", None, "a local .nemo file (or hub id) for Sortformer instead of the default"
)
SORTFORMER_WINDOW_S = PluginSetting(
    "AISTACK_SORTFORMER_WINDOW_S", "float", 90.0, "seconds diarized at a time (at least 10; trained on 90 s sessions)"
)

SORTFORMER = PluginManifest(
    name="sortformer",
    summary="NVIDIA Streaming Sortformer speaker diarization (up to four speakers) through NeMo",
    install_hint=_extra("diarize"),
    models={"diarization": ("nvidia/diar_streaming_sortformer_4spk-v2.1", "sortformer")},
    settings=(SORTFORMER_MODEL, SORTFORMER_WINDOW_S),
)
