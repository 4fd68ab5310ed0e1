"""Start `optimize serve` as its own process and wait until it answers: for load tests, benchmarks and tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import RuntimeFailure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    """Poll GET /health until it answers 200; fail early, with the server's output, if it exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise RuntimeFailure(f"the server exited with {proc.returncode}:\n{output}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeFailure(f"no server answered at {url} within {timeout:.0f}s")


@contextlib.contextmanager
def serve_process(artifact: Path | str, *args: str, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`optimize serve ARTIFACT ARGS` on 127.0.0.1; yields (base url, process) and stops it (SIGTERM) after."""
    port = port or free_port()
    optimize = Path(sys.executable).parent / "optimize"
    command = [str(optimize)] if optimize.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.Popen(
        command + ["serve", str(artifact), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
