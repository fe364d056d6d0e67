"""The admin page in a real headless browser (the system's Chromium, driven by Playwright).

The gateway runs in the test's event loop with the real faster-whisper and
Piper plugins and the Ollama plugin pointed at its emulator; Playwright's
async API drives Chromium against it.  Each test keeps screenshots of the
states it reaches under its pytest tmp folder (``screens/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import AsyncIterator

import attrs
import numpy as np
import pytest
import pytest_asyncio

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (the test extra)")

import aistack_plugins.faster_whisper  # noqa: E402
import aistack_plugins.ollama  # noqa: E402
import aistack_plugins.piper  # noqa: E402
from aistack_core.routes.admin import find_in_process  # noqa: E402
from aistack_core.app import create_app  # noqa: E402
from aistack_core.context import model_cache_key, slot_key  # noqa: E402
from aistack_core.plugins import PluginRecord  # noqa: E402

from . import helpers  # noqa: E402
from .upstreams import serve  # noqa: E402
from .upstreams.ollama import WORDS, OllamaEmulator  # noqa: E402


def chromium_path() -> str | None:
    for candidate in (os.environ.get("AISTACK_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


CHROMIUM = chromium_path()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install -y chromium)"),
    # One event loop for the module, so one Chromium serves every test (each gets its own context).
    pytest.mark.asyncio(loop_scope="module"),
]

WHISPER_ID = "whisper-tiny.en"
PIPER_ID = "piper-en_US-joe-medium"
SPOKEN = "The garden behind the old school is full of yellow flowers."
MIC_SENTENCE = "My neighbour bakes bread every morning before sunrise."
# Generous: a cold model load on a shared CPU comes first.
SLOW_MS = 60_000


@attrs.define
class Session:
    page: "playwright_api.Page"
    url: str
    app: object
    console_errors: list[str]
    screens: Path
    shots: int = 0

    async def shot(self, name: str) -> Path:
        self.shots += 1
        path = self.screens / f"{self.shots:02d}-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest_asyncio.fixture(loop_scope="module")
async def ollama():
    emulator = OllamaEmulator()
    async with emulator.running():
        yield emulator


BROWSER_ARGS = [
    "--no-sandbox",
    # A microphone for getUserMedia in a headless browser, granted without a prompt.
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> tuple[Path, float]:
    """What Chromium's fake microphone plays, in a loop: speech between one-second silences."""
    pcm, rate = helpers.synthesize_pcm(MIC_SENTENCE)
    silence = np.zeros(rate, dtype=np.int16)
    wav = helpers.write_wav(tmp_path_factory.mktemp("mic") / "mic.wav", np.concatenate([silence, pcm, silence]), rate)
    return wav, (len(pcm) + 2 * rate) / rate


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(microphone_wav):
    async with playwright_api.async_playwright() as driver:
        instance = await driver.chromium.launch(
            executable_path=CHROMIUM, args=[*BROWSER_ARGS, f"--use-file-for-fake-audio-capture={microphone_wav[0]}"],
        )
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
def admin_session(browser, base_config, plugin_set, ollama, tmp_path):
    """``async with admin_session(**config) as s``: the gateway served, a browser page open on /admin."""

    @contextlib.asynccontextmanager
    async def open_session(**overrides) -> AsyncIterator[Session]:
        plugin_set.register(aistack_plugins.faster_whisper, name="faster_whisper")
        plugin_set.register(aistack_plugins.piper, name="piper")
        plugin_set.register(aistack_plugins.ollama, name="ollama")
        # What a plugin whose library is missing looks like in the listing.
        plugin_set.records["broken_backend"] = PluginRecord(
            "broken_backend", "aistack-broken-backend", "0.3", "skipped",
            error="ModuleNotFoundError: No module named 'broken_library'",
        )
        base_config.upload_dir.mkdir(parents=True, exist_ok=True)
        config = attrs.evolve(base_config, env={"AISTACK_OLLAMA_URL": ollama.url}, **overrides)
        app = create_app(config, plugins=plugin_set)
        async with serve(app) as url:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            screens = tmp_path / "screens"
            screens.mkdir()
            try:
                await page.goto(url + "/admin")
                yield Session(page, url, app, errors, screens)
            finally:
                await context.close()

    return open_session


async def model_row(page, model_id: str):
    return page.locator(f'#models-table tr[data-model="{model_id}"]')


# --- the tests --------------------------------------------------------------------


async def test_page_shows_status_plugins_and_models_without_console_errors(admin_session):
    async with admin_session() as s:
        page = s.page
        await page.wait_for_selector(f'#models-table tr[data-model="{WHISPER_ID}"]')
        plugins = page.locator("#plugins-table tbody")
        await page.wait_for_selector('#plugins-table tr[data-plugin="broken_backend"]')
        assert await plugins.locator('tr[data-plugin="faster_whisper"] td').nth(1).inner_text() == "loaded"
        broken = plugins.locator('tr[data-plugin="broken_backend"]')
        assert await broken.locator("td").nth(1).inner_text() == "skipped"
        assert "No module named 'broken_library'" in await broken.inner_text()
        # Every model: the in-process ones (not loaded yet) and those the Ollama upstream lists.
        models = page.locator("#models-table tbody")
        for model_id in (WHISPER_ID, PIPER_ID, "qwen3:4b", "llama3.2:1b"):
            assert await models.locator(f'tr[data-model="{model_id}"]').count() == 1, model_id
        whisper_row = models.locator(f'tr[data-model="{WHISPER_ID}"]')
        assert "not loaded" in await whisper_row.inner_text()
        assert "upstream" in await models.locator('tr[data-model="qwen3:4b"]').inner_text()
        assert (await page.inner_text("#status-version")).startswith("v")
        assert await page.inner_text("#slot-state") == "slot: free"
        assert await page.inner_text("#ready-state") == "ready"
        # The chat box appears because Ollama lists chat models.
        assert await page.locator("#chat-form").is_visible()
        await s.shot("overview")
        assert s.console_errors == []


async def test_uploaded_speech_is_transcribed_on_the_page(admin_session, tmp_path):
    wav = helpers.synthesize_wav(SPOKEN, tmp_path / "garden.wav")
    async with admin_session() as s:
        page = s.page
        await page.wait_for_selector(f'#asr-model option[value="{WHISPER_ID}"]', state="attached")
        await page.set_input_files("#asr-file", str(wav))
        await page.select_option("#asr-model", WHISPER_ID)
        await page.select_option("#asr-format", "verbose_json")
        await page.click("#asr-submit")
        await page.wait_for_selector("#asr-result", state="visible", timeout=SLOW_MS)
        text = await page.inner_text("#asr-text")
        assert helpers.word_error_rate(SPOKEN, text) <= 0.25, text
        segments = page.locator("#asr-segments tbody tr")
        assert await segments.count() >= 1
        assert "garden" in (await segments.first.inner_text()).lower()
        # The traffic section shows the transcription among the last requests and charts it.
        await page.wait_for_selector('#recent-table td:text-is("/v1/audio/transcriptions")', timeout=20_000)
        await page.wait_for_selector('[data-chart="rtf"] svg rect', timeout=20_000)
        await s.shot("transcribed")
        assert s.console_errors == []


async def test_recording_from_the_microphone_is_transcribed(admin_session, microphone_wav):
    _, clip_s = microphone_wav
    async with admin_session() as s:
        page = s.page
        await page.wait_for_selector(f'#asr-model option[value="{WHISPER_ID}"]', state="attached")
        await page.select_option("#asr-model", WHISPER_ID)
        await page.select_option("#asr-format", "json")
        await page.click("#asr-record")
        await page.wait_for_selector("#asr-record.recording")
        await asyncio.sleep(clip_s - 0.5)  # one pass of the clip, stopping inside the trailing silence
        await page.click("#asr-record")
        await page.wait_for_selector('#asr-source:has-text("recording,")')
        await page.click("#asr-submit")
        await page.wait_for_selector("#asr-result", state="visible", timeout=SLOW_MS)
        text = await page.inner_text("#asr-text")
        assert helpers.word_error_rate(MIC_SENTENCE, text) <= 0.3, text
        await s.shot("recorded")
        assert s.console_errors == []


async def test_spoken_sentence_plays_in_the_page(admin_session):
    async with admin_session() as s:
        page = s.page
        await page.wait_for_selector(f'#tts-model option[value="{PIPER_ID}"]', state="attached")
        await page.fill("#tts-text", "Welcome to the admin page of your own speech gateway.")
        await page.select_option("#tts-format", "mp3")
        await page.click("#tts-submit")
        await page.wait_for_selector("#tts-audio", state="visible", timeout=SLOW_MS)
        duration = await page.wait_for_function(
            "() => { const a = document.getElementById('tts-audio');"
            " return a.readyState >= 1 && isFinite(a.duration) && a.duration > 0 ? a.duration : false; }",
            timeout=20_000,
        )
        assert 1.0 < await duration.json_value() < 15.0
        assert await page.locator("#tts-error").is_hidden()
        await s.shot("spoken")
        assert s.console_errors == []


async def test_model_unloads_and_reloads_with_the_buttons(admin_session):
    async with admin_session() as s:
        page = s.page
        cache = s.app[model_cache_key]
        key = find_in_process(s.app, WHISPER_ID).cache_key
        row = await model_row(page, WHISPER_ID)
        await row.locator("button.load").click()
        await page.wait_for_selector(f'#models-table tr[data-model="{WHISPER_ID}"][data-resident="true"]',
                                     timeout=SLOW_MS)
        assert key in cache
        assert "resident" in await row.locator("td.state").inner_text()
        assert (await row.locator("td").nth(5).inner_text()).endswith(" s")  # the load time
        await s.shot("loaded")
        await row.locator("button.unload").click()
        await page.wait_for_selector(f'#models-table tr[data-model="{WHISPER_ID}"][data-resident="false"]')
        assert key not in cache
        assert "not loaded" in await row.locator("td.state").inner_text()
        await s.shot("unloaded")
        await row.locator("button.load").click()
        await page.wait_for_selector(f'#models-table tr[data-model="{WHISPER_ID}"][data-resident="true"]',
                                     timeout=SLOW_MS)
        assert key in cache
        await s.shot("reloaded")
        assert s.console_errors == []


async def test_a_taken_slot_shows_a_readable_busy_message(admin_session, tmp_path):
    wav = helpers.synthesize_wav("Please hold the line for a moment.", tmp_path / "hold.wav")
    async with admin_session() as s:
        page = s.page
        await page.wait_for_selector(f'#asr-model option[value="{WHISPER_ID}"]', state="attached")
        async with s.app[slot_key].acquire_or_busy("asr", "some-model", "held-by-test"):
            await page.wait_for_selector('#slot-state:has-text("held-by-test")', timeout=15_000)
            await page.set_input_files("#asr-file", str(wav))
            await page.select_option("#asr-model", WHISPER_ID)
            await page.click("#asr-submit")
            error = page.locator("#asr-error")
            await error.wait_for(state="visible", timeout=20_000)
            assert await error.locator("strong").inner_text() == "Busy — try again in 5 s"
            message = await error.inner_text()
            assert "held-by-test" in message and "one inference at a time" in message
            assert "GPU" not in message
            await s.shot("busy")
        # The browser reports the 503 it received as a failed resource load; that one is expected.
        assert all("503" in text for text in s.console_errors), s.console_errors


async def test_with_a_key_the_page_asks_for_it_and_refuses_until_it_is_right(admin_session):
    async with admin_session(api_key="open-sesame-42") as s:
        page = s.page
        await page.wait_for_selector("#login", state="visible")
        assert await page.locator("#app").is_hidden()
        # Without the key no data answers, even to a script on the page.
        status = await page.evaluate("fetch('/admin/api/status').then(r => r.status)")
        assert status == 401
        await s.shot("login")
        await page.fill("#login-key", "not-the-key")
        await page.click("#login-submit")
        await page.wait_for_selector('#login-error:has-text("refused")')
        assert await page.locator("#app").is_hidden()
        await s.shot("wrong-key")
        await page.fill("#login-key", "open-sesame-42")
        await page.click("#login-submit")
        await page.wait_for_selector('#plugins-table tr[data-plugin="piper"]')
        assert await page.locator("#login").is_hidden()
        assert await page.locator(f'#models-table tr[data-model="{WHISPER_ID}"]').count() == 1
        await s.shot("signed-in")
        # The refusals show up as failed loads (401) in the console; nothing else may.
        assert all("401" in text for text in s.console_errors), s.console_errors


async def test_chat_with_an_ollama_model(admin_session, ollama):
    async with admin_session() as s:
        page = s.page
        await page.wait_for_selector("#chat-form", state="visible")
        await page.select_option("#chat-model", "llama3.2:1b")
        await page.fill("#chat-input", "Say something about foxes.")
        await page.click("#chat-submit")
        reply = page.locator("#chat-log .assistant")
        await reply.wait_for(timeout=20_000)
        assert await reply.inner_text() == "".join(WORDS[i % len(WORDS)] for i in range(ollama.reply_tokens))
        assert await page.locator("#chat-log .user").inner_text() == "Say something about foxes."
        await s.shot("chat")
        assert s.console_errors == []
