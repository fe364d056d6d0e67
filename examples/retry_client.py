"""Transcribe a file, backing off while the gateway's GPU slot is busy.

aistack runs one inference at a time and answers any other with
``503`` + ``Retry-After``.  That is back-pressure, not failure: wait and retry.

    python examples/retry_client.py speech.wav [--url http://127.0.0.1:11500]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import aiohttp


async def transcribe_with_retry(url: str, path: Path, model: str = "auto", attempts: int = 6) -> dict:
    async with aiohttp.ClientSession() as session:
        for attempt in range(1, attempts + 1):
            form = aiohttp.FormData()
            form.add_field("file", path.read_bytes(), filename=path.name)
            form.add_field("model", model)
            form.add_field("response_format", "verbose_json")
            async with session.post(f"{url}/v1/audio/transcriptions", data=form) as response:
                if response.status != 503:
                    body = await response.json()
                    if response.status >= 400:
                        error = body["error"]
                        raise RuntimeError(f"{error['kind']} from {error['provider']}: {error['message']}")
                    return body
                error = (await response.json())["error"]
                retry_after = float(response.headers.get("Retry-After", "5"))
                if "Retry-After" not in response.headers:
                    # A 503 without Retry-After is a backend that is down, not a busy slot.
                    raise RuntimeError(error["message"])
                print(f"attempt {attempt}: busy ({error['message']}); retrying in {retry_after:.0f} s")
                await asyncio.sleep(retry_after)
    raise RuntimeError(f"still busy after {attempts} attempts")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:11500")
    parser.add_argument("--model", default="auto")
    args = parser.parse_args()
    result = asyncio.run(transcribe_with_retry(args.url, args.file, args.model))
    print(result["text"])


if __name__ == "__main__":
    main()
