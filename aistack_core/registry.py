"""What the plugins registered, and how a request's ``model`` finds its backend."""

from __future__ import annotations

import logging
from typing import Any, Callable

import attrs

from .backends import AsrBackend, DiarizationBackend, ModelCard, TtsBackend, Upstream, VadProvider, backend_unavailable
from .config import Config
from .errors import Malformed, Network
from .languages import language_code
from .plugins import PluginSet

log = logging.getLogger("aistack.registry")

AUTO_ALIAS = "auto"
# OpenAI's diarizing transcription model: here the best installed speech-to-text
# backend (as ``auto`` picks it) plus the best installed diarizer.
DIARIZE_ALIAS = "gpt-4o-transcribe-diarize"
DIARIZE_EXTRA = "diarize"
# OpenAI's newer speech-to-text ids: here they mean ``auto`` (the best local
# backend for the language).
OPENAI_AUTO_ASR_IDS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe")

# Model ids from the public contract that belong to optional extras.  The core
# knows them only as data, so a request for one whose plugin is missing gets an
# actionable 503 ("install aistack[parakeet]") instead of "unknown model".
_WHISPER_SIZES = (
    "tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
    "large", "large-v1", "large-v2", "large-v3", "large-v3-turbo", "turbo", "distil-large-v3",
)
KNOWN_MODEL_EXTRAS: dict[str, tuple[str, str]] = {
    # model id -> (capability, extra)
    "parakeet": ("asr", "parakeet"),
    "nvidia/parakeet-tdt-0.6b-v3": ("asr", "parakeet"),
    "sensevoice": ("asr", "sensevoice"),
    "iic/sensevoicesmall": ("asr", "sensevoice"),
    "whisper-1": ("asr", "whisper"),
    **{f"whisper-{size}": ("asr", "whisper") for size in _WHISPER_SIZES},
    **{size: ("asr", "whisper") for size in _WHISPER_SIZES},
}
OPENAI_TTS_IDS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's speech-to-text ids that GET /v1/models lists as routing aliases
# (whisper-1 is claimed by the backend that stands for it).
OPENAI_ASR_IDS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


@attrs.frozen
class Registered:
    backend: Any
    plugin: str

    @property
    def card(self) -> ModelCard:
        return self.backend.card


def normalize_language(language: str | None, *, strict: bool = False) -> str | None:
    """``"en-US"``, ``"English"`` → ``"en"``; empty or ``auto`` → None.

    ``strict`` refuses an unknown value with a 400 listing the accepted forms
    (the table is :mod:`aistack_core.languages`); otherwise it passes through
    as its primary subtag.
    """
    return language_code(language, strict=strict)


def is_auto(model: str | None) -> bool:
    """Whether ``model`` asks for the ``auto`` routing (empty, ``auto`` or an OpenAI id meaning it)."""
    name = (model or "").strip().lower()
    return name in ("", AUTO_ALIAS, *OPENAI_AUTO_ASR_IDS)


@attrs.define
class Registry:
    asr: dict[str, Registered] = attrs.field(factory=dict)
    tts: dict[str, Registered] = attrs.field(factory=dict)
    upstreams: dict[str, Registered] = attrs.field(factory=dict)
    diarization: dict[str, Registered] = attrs.field(factory=dict)
    vad: dict[str, Registered] = attrs.field(factory=dict)  # voice activity detectors, by name
    _names: dict[tuple[str, str], str] = attrs.field(factory=dict)  # (capability, lowercase id/alias) -> id
    tts_default: str | None = None
    plugins: PluginSet | None = None

    # --- building -------------------------------------------------------------

    @classmethod
    def from_plugins(cls, plugins: PluginSet, config: Config) -> "Registry":
        registry = cls(plugins=plugins)
        hooks = (
            ("register_asr_backends", registry.add_asr),
            ("register_tts_backends", registry.add_tts),
            ("register_upstreams", registry.add_upstream),
            ("register_diarization_backends", registry.add_diarization),
            ("register_vad", registry.add_vad),
        )
        for hook_name, add in hooks:
            caller = getattr(plugins.manager.hook, hook_name)
            for impl in caller.get_hookimpls():
                registry._call_one(plugins, impl, add, config)
        registry.tts_default = registry._pick_tts_default(config)
        return registry

    def _call_one(self, plugins: PluginSet, impl, add: Callable[[Any, str], None], config: Config) -> None:
        record = plugins.record_for(impl.plugin_name)
        arguments = {"register": lambda obj: add(obj, impl.plugin_name), "config": config}
        try:
            impl.function(**{name: arguments[name] for name in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - one plugin's bug must not stop the others
            record.status = "skipped"
            record.error = f"{impl.function.__name__} failed: {type(exc).__name__}: {exc}"
            log.warning("plugin %s: %s", impl.plugin_name, record.error)

    def _claim(self, capability: str, names: tuple[str, ...], owner_id: str, plugin: str) -> None:
        for name in names:
            key = (capability, name.lower())
            if key in self._names:
                holder_id = self._names[key]
                holder = self._holder_plugin(capability, holder_id)
                raise ValueError(
                    f"{capability} model id {name!r} from plugin {plugin!r} is already registered "
                    f"by plugin {holder!r}"
                )
        for name in names:
            self._names[(capability, name.lower())] = owner_id

    def _holder_plugin(self, capability: str, model_id: str) -> str:
        entry = self._table(capability).get(model_id)
        return entry.plugin if entry else "?"

    def _add(self, table: dict[str, Registered], capability: str, backend: Any, plugin: str) -> None:
        card = backend.card
        self._claim(capability, (card.id, *card.aliases), card.id, plugin)
        table[card.id] = Registered(backend, plugin)
        if self.plugins is not None:
            self.plugins.record_for(plugin).registered.append(f"{capability}:{card.id}")

    def add_asr(self, backend: AsrBackend, plugin: str) -> None:
        if not isinstance(backend, AsrBackend):
            raise TypeError(f"plugin {plugin!r} registered {backend!r}, which is not an AsrBackend")
        self._add(self.asr, "asr", backend, plugin)

    def add_tts(self, backend: TtsBackend, plugin: str) -> None:
        if not isinstance(backend, TtsBackend):
            raise TypeError(f"plugin {plugin!r} registered {backend!r}, which is not a TtsBackend")
        self._add(self.tts, "tts", backend, plugin)

    def add_diarization(self, backend: DiarizationBackend, plugin: str) -> None:
        if not isinstance(backend, DiarizationBackend):
            raise TypeError(f"plugin {plugin!r} registered {backend!r}, which is not a DiarizationBackend")
        self._add(self.diarization, "diarization", backend, plugin)

    def _table(self, capability: str) -> dict[str, Registered]:
        return {"asr": self.asr, "tts": self.tts, "diarization": self.diarization}.get(capability, self.upstreams)

    def add_upstream(self, upstream: Upstream, plugin: str) -> None:
        if upstream.name in self.upstreams:
            raise ValueError(
                f"upstream {upstream.name!r} from plugin {plugin!r} is already registered by plugin "
                f"{self.upstreams[upstream.name].plugin!r}"
            )
        self.upstreams[upstream.name] = Registered(upstream, plugin)
        if self.plugins is not None:
            self.plugins.record_for(plugin).registered.append(f"upstream:{upstream.name}")

    def add_vad(self, provider: VadProvider, plugin: str) -> None:
        if not isinstance(provider, VadProvider):
            raise TypeError(f"plugin {plugin!r} registered {provider!r}, which is not a VadProvider")
        if provider.name in self.vad:
            raise ValueError(
                f"voice activity detector {provider.name!r} from plugin {plugin!r} is already registered by "
                f"plugin {self.vad[provider.name].plugin!r}"
            )
        self.vad[provider.name] = Registered(provider, plugin)
        if self.plugins is not None:
            self.plugins.record_for(plugin).registered.append(f"vad:{provider.name}")

    def vad_provider(self) -> VadProvider | None:
        """The detector server-side turn detection uses: the first registered, else None."""
        for entry in self.vad.values():
            return entry.backend
        return None

    def _pick_tts_default(self, config: Config) -> str | None:
        if config.tts_default:
            found = self._names.get(("tts", config.tts_default.lower()))
            if found:
                return found
            log.warning("AISTACK_TTS_DEFAULT=%s names no installed TTS model", config.tts_default)
        if not self.tts:
            return None
        return min(self.tts.values(), key=lambda r: (r.card.auto_priority, r.card.id)).card.id

    # --- resolving --------------------------------------------------------------

    def _not_installed(self, capability: str, model: str) -> Exception | None:
        known = KNOWN_MODEL_EXTRAS.get(model.lower())
        if not known or known[0] != capability:
            return None
        extra = known[1]
        reason = ""
        if self.plugins is not None:
            plugin_names = {"whisper": "faster_whisper"}
            record = self.plugins.records.get(plugin_names.get(extra, extra))
            if record is not None and record.status != "loaded":
                reason = f" (plugin {record.name} is {record.status}: {record.error})"
            elif record is not None:
                # Permanent until the operator installs something: a 400, so clients do not retry.
                return Malformed(
                    f"Model {model!r} is not installed: its plugin {record.name} is loaded but has no copy of "
                    f"this model. Use one listed by GET /v1/models, or allow downloads with "
                    f"AISTACK_ALLOW_DOWNLOADS=on (pip install 'aistack[{extra}]' provides the backend).",
                    param="model", code="model_not_installed",
                )
        return Malformed(
            f"Model {model!r} needs the {extra} backend, which is not installed{reason}. "
            f"Install it with: pip install 'aistack[{extra}]'",
            param="model", code="model_not_installed",
        )

    def _available(self, capability: str) -> str:
        ids = sorted(self._table(capability))
        if capability == "asr" and ids:
            ids.insert(0, AUTO_ALIAS)
        return ", ".join(ids) or "none installed"

    def find(self, capability: str, model: str) -> Registered | None:
        model_id = self._names.get((capability, model.lower()))
        if model_id is None:
            return None
        return self._table(capability)[model_id]

    def find_any(self, model: str) -> Registered | None:
        """The in-process entry of any capability that ``model`` names (for "wrong capability" errors)."""
        for capability in ("asr", "tts"):
            found = self.find(capability, model)
            if found is not None:
                return found
        return None

    def resolve_asr(self, model: str | None, language: str | None) -> Registered:
        model = (model or "").strip()
        if (is_auto(model) or model.lower() == DIARIZE_ALIAS) and self.find("asr", model) is None:
            return self.pick_auto(language)
        found = self.find("asr", model)
        if found is not None:
            return found
        missing = self._not_installed("asr", model)
        if missing is not None:
            raise missing
        raise Malformed(
            f"Unknown speech-to-text model {model!r}. Available: {self._available('asr')}.",
            param="model", code="model_not_found",
        )

    def pick_auto(self, language: str | None) -> Registered:
        """The ``auto`` alias: the preferred backend for the language, else the best that can do it."""
        if not self.asr:
            raise Network(
                "No speech-to-text backend is installed. Install one with: pip install 'aistack[whisper]'",
                code="no_backend",
            )
        lang = normalize_language(language)
        ranked = sorted(self.asr.values(), key=lambda r: (r.card.auto_priority, r.card.id))
        # Skip backends that cannot serve now; if none can, the best one's own error explains why.
        pool = [r for r in ranked if backend_unavailable(r.backend) is None] or ranked[:1]
        if lang:
            preferred = [r for r in pool if lang in r.card.auto_languages]
            if preferred:
                return preferred[0]
            capable = [r for r in pool if r.card.languages is None or lang in r.card.languages]
            if capable:
                return capable[0]
        return pool[0]

    def serving(self, capability: str) -> list[Registered]:
        """In-process backends that can serve now (blocking file checks: call from a thread)."""
        table = self._table(capability)
        return [entry for entry in table.values() if backend_unavailable(entry.backend) is None]

    def auto_card(self, pool: list[Registered]) -> dict | None:
        if not pool:
            return None
        return {
            "id": AUTO_ALIAS,
            "object": "model",
            "created": 0,
            "owned_by": "aistack",
            "capabilities": ["asr"],
            "supports_streaming": all(r.card.supports_streaming for r in pool),
            "is_routing_alias": True,
        }

    def resolve_diarization(self, model: str | None = None) -> Registered:
        """The diarizer ``model`` names, or the best installed one (blocking file checks: call from a thread)."""
        name = (model or "").strip()
        if name and name.lower() != DIARIZE_ALIAS:
            found = self.find("diarization", name)
            if found is None:
                raise Malformed(
                    f"Unknown diarization model {name!r}. Available: {self._available('diarization')}.",
                    param="diarization_model", code="model_not_found",
                )
            return found
        if not self.diarization:
            raise Malformed(
                "Speaker diarization needs a diarization backend, and none is installed. "
                f"Install one with: pip install 'aistack[{DIARIZE_EXTRA}]'",
                param="response_format", code="diarization_not_installed",
            )
        ranked = sorted(self.diarization.values(), key=lambda r: (r.card.auto_priority, r.card.id))
        pool = [r for r in ranked if backend_unavailable(r.backend) is None] or ranked[:1]
        return pool[0]

    def diarize_alias_card(self, asr_pool: list[Registered], diarizer_pool: list[Registered]) -> dict | None:
        """The ``gpt-4o-transcribe-diarize`` entry of /v1/models, while both halves can serve."""
        if not asr_pool or not diarizer_pool:
            return None
        return {
            "id": DIARIZE_ALIAS,
            "object": "model",
            "created": 0,
            "owned_by": "aistack",
            "capabilities": ["asr", "diarization"],
            "supports_streaming": True,
            "is_routing_alias": True,
        }

    def resolve_tts(self, model: str | None) -> Registered | None:
        """The in-process TTS backend for ``model``, or None when the upstream should serve it."""
        name = (model or "").strip()
        if name.lower() in OPENAI_TTS_IDS:
            return self.tts.get(self.tts_default) if self.tts_default else None
        return self.find("tts", name) if name else None

    def upstream_for(self, capability: str) -> Registered | None:
        """The first upstream of ``capability`` (the one that serves when model ids do not choose)."""
        entries = self.upstreams_for(capability)
        return entries[0] if entries else None

    def upstreams_for(self, capability: str) -> list[Registered]:
        """Every upstream of ``capability``, in pluggy's order (upstreams.py routes a model among them)."""
        return [entry for entry in self.upstreams.values() if entry.backend.capability == capability]
