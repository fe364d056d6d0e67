"""The gateway's AISTACK_* settings, in one attrs object built from the environment.

``Config.from_env()`` reads ``os.environ`` (or a given mapping); CLI flags
and tests override fields with ``attrs.evolve``.  Only settings of the
gateway itself are fields here.  A plugin reads its own variables from the
same environment snapshot through the typed helpers (``config.env_str``,
``env_bool``, ``env_int``, ``env_float``, ``env_path``) and declares them in
its manifest, so the core knows no backend's settings and plugins need no
global state.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping

import attrs

from .devices import Device, parse_devices

# The one set of on/off words, for settings (parse_flag) and request fields (forms.parse_bool).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_flag(value: str | None, default: bool) -> bool:
    """The one on/off rule: 1/true/yes/on and 0/false/no/off, any case; blank is ``default``."""
    if value is None or value.strip() == "":
        return default
    lowered = value.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"expected on/off, got {value!r}")


def _csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _mapping(value: str | None) -> dict[str, str]:
    """Parse ``alloy=joe,echo=amy`` into a dict."""
    result: dict[str, str] = {}
    for part in (value or "").split(","):
        if "=" in part:
            key, _, target = part.partition("=")
            result[key.strip()] = target.strip()
    return result


def _devices(value: "str | tuple[Device, ...] | list[Device] | None") -> tuple[Device, ...] | None:
    """AISTACK_DEVICES as given (a string) or already parsed; None means auto."""
    if value is None:
        return None
    if isinstance(value, str):
        parsed = parse_devices(value)
        return None if parsed is None else tuple(parsed)
    return tuple(value)


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "aistack"


def _positive_finite(setting: str):
    def check(_instance, _attribute, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{setting}: expected a positive number, got {value!r}")

    return check


@attrs.frozen
class Config:
    host: str = "127.0.0.1"
    port: int = 11500
    log_format: str = "text"
    # Plugins
    load_plugins: tuple[str, ...] | None = None  # None = all; () = none
    # Devices (one slot each) and the model cache
    devices: tuple[Device, ...] | None = attrs.field(default=None, converter=_devices)  # None: auto
    slot_wait_s: float = 0.0
    model_keep_alive_s: float = 300.0
    min_free_ram_mb: int = 512
    min_free_vram_mb: int = 1024
    preload: tuple[str, ...] = ()  # model ids loaded at start-up (AISTACK_PRELOAD)
    # Speech-to-text
    max_upload_mb: int = 1024
    # Longer uploads are refused (413) from the container's length before any decoding.
    max_audio_min: float = attrs.field(default=240.0, validator=_positive_finite("AISTACK_MAX_AUDIO_MIN"))
    upload_dir: Path = attrs.field(factory=lambda: Path(tempfile.gettempdir()), converter=Path)
    # May backends fetch weights they do not have?  One policy for every plugin.
    allow_downloads: bool = False
    # Text-to-speech
    tts_default: str | None = None
    tts_voice_map: dict[str, str] = attrs.field(factory=dict)
    tts_cache_dir: Path = attrs.field(factory=lambda: _default_state_dir() / "tts-cache", converter=Path)
    tts_cache_ttl_min: float = 1440.0
    tts_cache_max_mb: int = 512
    # Upstreams
    probe_timeout_s: float = 0.5
    probe_cache_s: float = 2.0
    # Observability and access
    obs_metrics: bool = True
    obs_access_log: bool = True
    obs_payload: bool = False
    obs_log_dir: Path = attrs.field(factory=lambda: _default_state_dir() / "logs", converter=Path)
    obs_payload_dir: Path = attrs.field(factory=lambda: _default_state_dir() / "payloads", converter=Path)
    obs_payload_max_mb: int = 512
    obs_payload_max_age_h: float = 72.0
    obs_payload_request_cap_kb: int = 4096
    obs_metrics_window_min: float = 60.0
    cors_allow_origins: tuple[str, ...] = ()
    # WebSocket sessions: ping interval, and how long one may go without a message either way
    ws_heartbeat_s: float = 20.0
    ws_idle_timeout_s: float = 300.0
    # Live transcription (/v1/realtime): sessions at once, audio an utterance may
    # wait for a busy slot, how often a growing utterance is decoded for deltas
    realtime_max_sessions: int = 8
    realtime_max_buffer_s: float = 30.0
    realtime_partial_s: float = 1.0
    api_key: str | None = attrs.field(default=None, repr=False)
    # The whole environment snapshot, for plugins' own settings (read through env_*).
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)

    # --- typed access to plugins' own settings ------------------------------------
    # Each returns ``default`` when the variable is unset or blank, and raises
    # ValueError naming the variable when its value cannot be used: raised in a
    # plugin's register hook, that marks the plugin skipped with this message.

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def env_str(self, name: str, default: str | None = None) -> str | None:
        value = self._raw(name)
        return default if value is None else value

    def env_bool(self, name: str, default: bool | None = False) -> bool | None:
        """On/off by ``parse_flag``; ``default=None`` tells "unset" apart from "off"."""
        try:
            return parse_flag(self.env.get(name), default)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def env_int(self, name: str, default: int | None = None) -> int | None:
        value = self._raw(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: expected a whole number, got {value!r}") from None

    def env_float(self, name: str, default: float | None = None) -> float | None:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        return number

    def env_path(self, name: str, default: Path | None = None) -> Path | None:
        value = self._raw(name)
        return default if value is None else Path(value).expanduser()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Config":
        env = dict(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            value = env.get("AISTACK_" + name)
            return value if value is None or value.strip() != "" else None

        kwargs: dict = {"env": env}
        simple = {
            "HOST": ("host", str),
            "PORT": ("port", int),
            "LOG_FORMAT": ("log_format", str),
            "SLOT_WAIT_S": ("slot_wait_s", float),
            "MODEL_KEEP_ALIVE_SEC": ("model_keep_alive_s", float),
            "MIN_FREE_RAM_MB": ("min_free_ram_mb", int),
            "MIN_FREE_VRAM_MB": ("min_free_vram_mb", int),
            "DEVICES": ("devices", _devices),
            "MAX_UPLOAD_MB": ("max_upload_mb", int),
            "MAX_AUDIO_MIN": ("max_audio_min", float),
            "UPLOAD_DIR": ("upload_dir", Path),
            "TTS_DEFAULT": ("tts_default", str),
            "TTS_CACHE_DIR": ("tts_cache_dir", Path),
            "TTS_CACHE_TTL_MIN": ("tts_cache_ttl_min", float),
            "TTS_CACHE_MAX_MB": ("tts_cache_max_mb", int),
            "PROBE_TIMEOUT_S": ("probe_timeout_s", float),
            "PROBE_CACHE_S": ("probe_cache_s", float),
            "OBS_LOG_DIR": ("obs_log_dir", Path),
            "OBS_PAYLOAD_DIR": ("obs_payload_dir", Path),
            "OBS_PAYLOAD_MAX_MB": ("obs_payload_max_mb", int),
            "OBS_PAYLOAD_MAX_AGE_H": ("obs_payload_max_age_h", float),
            "OBS_PAYLOAD_REQUEST_CAP_KB": ("obs_payload_request_cap_kb", int),
            "OBS_METRICS_WINDOW_MIN": ("obs_metrics_window_min", float),
            "API_KEY": ("api_key", str),
            "WS_HEARTBEAT_S": ("ws_heartbeat_s", float),
            "WS_IDLE_TIMEOUT_S": ("ws_idle_timeout_s", float),
            "REALTIME_MAX_SESSIONS": ("realtime_max_sessions", int),
            "REALTIME_MAX_BUFFER_S": ("realtime_max_buffer_s", float),
            "REALTIME_PARTIAL_S": ("realtime_partial_s", float),
        }
        for var, (field, convert) in simple.items():
            value = get(var)
            if value is not None:
                try:
                    kwargs[field] = convert(value)
                except ValueError as exc:
                    raise ValueError(f"AISTACK_{var}: {exc}") from None
        for var, field, default in (
            ("ALLOW_DOWNLOADS", "allow_downloads", False),
            ("OBS_METRICS", "obs_metrics", True),
            ("OBS_ACCESS_LOG", "obs_access_log", True),
            ("OBS_PAYLOAD", "obs_payload", False),
        ):
            try:
                kwargs[field] = parse_flag(env.get("AISTACK_" + var), default)
            except ValueError as exc:
                raise ValueError(f"AISTACK_{var}: {exc}") from None
        # An empty AISTACK_LOAD_PLUGINS means "load none", so read it raw.
        if "AISTACK_LOAD_PLUGINS" in env:
            kwargs["load_plugins"] = _csv(env["AISTACK_LOAD_PLUGINS"])
        kwargs["tts_voice_map"] = _mapping(get("TTS_VOICE_MAP"))
        kwargs["cors_allow_origins"] = _csv(get("CORS_ALLOW_ORIGINS")) or ()
        kwargs["preload"] = _csv(get("PRELOAD")) or ()
        return cls(**kwargs)
