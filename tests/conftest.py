"""Shared fixtures: apps built from real plugins or small test plugins, and test speech."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import attrs  # noqa: E402
import pytest  # noqa: E402

from aistack_core.app import create_app  # noqa: E402
from aistack_core.config import Config  # noqa: E402
from aistack_core.plugins import PluginSet, load_plugins  # noqa: E402

from . import helpers  # noqa: E402


@pytest.fixture
def base_config(tmp_path) -> Config:
    """Settings that keep every test's files inside its own tmp dir."""
    return Config(
        upload_dir=tmp_path / "uploads",
        tts_cache_dir=tmp_path / "tts-cache",
        obs_log_dir=tmp_path / "logs",
        obs_payload_dir=tmp_path / "payloads",
        obs_access_log=False,
    )


@pytest.fixture
def plugin_set() -> PluginSet:
    """An empty plugin manager; tests register the plugins they need."""
    return load_plugins(load_entrypoints=False)


@pytest.fixture
def make_client(aiohttp_client, base_config, plugin_set):
    """``await make_client(plugins={"name": module_or_object}, **config_overrides)``."""

    async def factory(plugins: dict | None = None, **overrides):
        for name, plugin in (plugins or {}).items():
            plugin_set.register(plugin, name=name)
        base_config.upload_dir.mkdir(parents=True, exist_ok=True)
        config = attrs.evolve(base_config, **overrides)
        return await aiohttp_client(create_app(config, plugins=plugin_set))

    return factory


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def sentences_wav(speech_dir):
    """Five synthesized English sentences, each its own WAV: [(text, path)]."""
    return [(text, helpers.synthesize_wav(text, speech_dir / f"s{i}.wav")) for i, text in enumerate(helpers.SENTENCES)]
