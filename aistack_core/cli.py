"""``aistack serve``, ``aistack plugins`` and ``aistack doctor``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys

import attrs
from aiohttp import web

from . import __version__
from .config import Config
from .observe.record import current_request_id, iso_utc
from .plugins import load_plugins
from .registry import Registry
from .runner import GatewayRunner
from .security import warn_if_exposed

log = logging.getLogger("aistack")

# How long a connection may take to deliver a request's headers (and stay idle between requests).
HEADER_TIMEOUT_S = 30.0


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every log record so formatters can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


LOG_FORMATS = ("text", "json")


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Root logging for ``aistack serve``: text or one JSON object per line."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _serve(args: argparse.Namespace) -> int:
    config = Config.from_env()
    overrides = {name: value for name in ("host", "port", "log_format") if (value := getattr(args, name)) is not None}
    config = attrs.evolve(config, **overrides)
    configure_logging(config.log_format)
    from .app import create_app  # imported late so `aistack plugins` stays light

    plugins = load_plugins(load_entrypoints=True, allow=config.load_plugins)
    app = create_app(config, plugins=plugins)
    for record in plugins.records.values():
        # Skipped plugins were logged once, by the loader or the registry, when they failed.
        if record.status == "loaded":
            log.info("plugin %s loaded: %s", record.name, ", ".join(record.registered) or "nothing registered")
        elif record.status == "disabled":
            log.info("plugin %s disabled: %s", record.name, record.error)
    warn_if_exposed(config)
    try:
        asyncio.run(_run_server(app, config))
    except CannotListen as exc:
        print(f"aistack: {exc}", file=sys.stderr)
        return 1
    # Everything we own is closed by now.  What is left is the interpreter's
    # teardown, where the backend libraries' atexit hooks and threads (torch,
    # NeMo) take seconds; a service manager waiting on SIGTERM should not.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class CannotListen(Exception):
    """The address could not be bound; the message says what to change."""


def _bind_problem(exc: OSError, host: str, port: int) -> str:
    choose_port = "choose another with --port N or AISTACK_PORT=N"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another aistack, or another server); {choose_port}"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port} of {host} (ports below 1024 need privileges); {choose_port}"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"cannot listen on {host!r}: it is not an address of this machine; set --host or AISTACK_HOST"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host/--port (AISTACK_HOST/AISTACK_PORT)"


async def _run_server(app: web.Application, config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down running every cleanup_ctx.

    The site is started before anything says "listening", so a taken port is
    reported as such (:class:`CannotListen`) instead of after a false start.
    """
    # aiohttp closes a connection that has not delivered a whole request within
    # keepalive_timeout of opening (or of its last answer): the header-read
    # timeout for half-open and slow-header connections.
    header_timeout_s = config.env_float("AISTACK_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S)
    runner = GatewayRunner(app, access_log=None, keepalive_timeout=header_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen(_bind_problem(exc, config.host, config.port)) from None
        host, port = runner.addresses[0][:2]  # the bound port, which differs from the asked one for port 0
        log.info("aistack %s listening on http://%s:%d (admin page: /admin)", __version__, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("aistack shutting down")
    finally:
        await runner.cleanup()


def _plugins(args: argparse.Namespace) -> int:
    config = Config.from_env()
    logging.basicConfig(level=logging.ERROR)
    # Some backend libraries print notices on import; keep stdout for our own output.
    with contextlib.redirect_stdout(sys.stderr):
        plugins = load_plugins(load_entrypoints=True, allow=config.load_plugins)
        Registry.from_plugins(plugins, config)  # fills in what each plugin registers
    listing = plugins.listing()
    if args.json:
        json.dump(listing, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [("NAME", "STATUS", "DISTRIBUTION", "REGISTERED / ERROR")]
    for item in listing:
        dist = f"{item['distribution'] or '-'} {item['version'] or ''}".strip()
        detail = item["error"] if item["status"] != "loaded" else ", ".join(item["registered"]) or "-"
        if item["status"] == "skipped" and item["install_hint"]:
            detail += f" (install: {item['install_hint']})"
        rows.append((item["name"], item["status"], dist, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    config = Config.from_env()
    logging.basicConfig(level=logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # import-time notices of backend libraries
        plugins = load_plugins(load_entrypoints=True, allow=config.load_plugins)
        checks = doctor.run_checks(config, plugins)
    text, status = doctor.report(checks)
    if args.json:
        json.dump({"ok": status == 0, "checks": [check.to_json() for check in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"aistack {__version__} doctor\n\n" + text)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aistack", description="Local OpenAI-compatible AI gateway.")
    parser.add_argument("--version", action="version", version=f"aistack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="bind address (AISTACK_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (AISTACK_PORT, default 11500)")
    serve.add_argument("--log-format", choices=("text", "json"), help="log line format (AISTACK_LOG_FORMAT)")
    serve.set_defaults(run=_serve)
    plugins = commands.add_parser("plugins", help="list plugins: loaded, skipped (and why), disabled")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=_plugins)
    doctor = commands.add_parser("doctor", help="check the set-up: extras, GPU, upstreams, directories, disk, memory")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:  # a bad AISTACK_* value
        print(f"aistack: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
