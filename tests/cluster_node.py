"""One gateway of the test cluster: ``aistack serve`` with a test ASR backend whose timing the test sets.

    python -m tests.cluster_node        (settings from AISTACK_* as for ``aistack serve``)

Entry points cannot add a test plugin without reinstalling the package, so
this launcher builds the plugin set itself and then serves exactly as
``aistack serve`` does (``create_app`` + ``web.run_app``, no handler
cancellation).  Plugins: the slow test ASR (``AISTACK_TEST_ASR_STEPS``
segments, one every ``AISTACK_TEST_ASR_STEP_S`` seconds) and the real
qwen3_tts plugin (``AISTACK_QWEN3_TTS_URL``) for the WebSocket relay.
"""

from __future__ import annotations

import os

from aiohttp import web

import aistack_plugins.qwen3_tts
from aistack_core.cli import configure_logging
from aistack_core.app import create_app
from aistack_core.config import Config
from aistack_core.plugins import load_plugins

from .helpers import BackendPlugin, SlowAsr


def main() -> None:
    config = Config.from_env()
    configure_logging(config.log_format)
    plugins = load_plugins(load_entrypoints=False)
    asr = SlowAsr(
        "slow-asr",
        steps=int(os.environ.get("AISTACK_TEST_ASR_STEPS", "5")),
        step_s=float(os.environ.get("AISTACK_TEST_ASR_STEP_S", "0.2")),
    )
    plugins.register(BackendPlugin(asr), name="slow_asr")
    plugins.register(aistack_plugins.qwen3_tts, name="qwen3_tts")
    app = create_app(config, plugins=plugins)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
