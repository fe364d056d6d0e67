"""Run the shipped nginx configuration (docker/cluster/nginx.conf) on loopback, for tests and benchmarks.

Only the gateway addresses, the listen port and the log directory change;
each ``server`` line keeps its shipped parameters, so what runs here is
what users run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "docker" / "cluster"


class NginxMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise NginxMissing("nginx is not installed: apt-get install -y nginx (.ci/run installs it when absent)")
    return found


def wait_port(port: int, process: subprocess.Popen, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s} s")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def nginx_site(node_addresses: list[str], port: int, log_dir: Path) -> str:
    """The shipped configuration with this test's gateway addresses, port and log directory.

    Only the addresses change: each server line keeps its shipped parameters
    (max_fails and all), so the test runs what users run.
    """
    shipped = (CLUSTER_DIR / "nginx.conf").read_text()
    site, replaced = re.subn(r"server gateway-(\d+):11500", lambda m: f"server {node_addresses[int(m[1])]}", shipped)
    assert replaced == len(node_addresses), "the shipped upstream block changed; update this test's substitution"
    return site.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("/var/log/nginx/", f"{log_dir}/")


def start_nginx(workdir: Path, node_addresses: list[str]) -> tuple[subprocess.Popen, int, Path]:
    prefix = workdir / "nginx"
    for sub in ("logs", "temp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    (prefix / "aistack.conf").write_text(nginx_site(node_addresses, port, prefix / "logs"))
    temp = prefix / "temp"
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
{"user root;" if os.geteuid() == 0 else ""}
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include aistack.conf;
}}
""")
    process = subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, process, "nginx", 15)
    return process, port, prefix / "logs" / "aistack-access.log"


