"""Run the Procfile's services as child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: ask Linux to send ``sig`` to this child when its parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ServiceGroup:
    """Child services sharing one environment; stopped together (SIGTERM, then SIGKILL)."""

    env: dict[str, str]
    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> Service:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        process = subprocess.Popen(
            [sys.executable, *args], env={**self.env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True,
        )
        log.close()
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def wait_healthy(self, service: Service, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{service.name} did not answer {url} within {timeout:.0f}s:\n{service.log_tail()}")

    def check_alive(self) -> None:
        for service in self.services:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every service's main process, then SIGKILL its whole process group after ``timeout``.

        Only the main process gets SIGTERM: a supervisor (dramatiq's) forwards it to its own
        children, which then finish their in-flight work; signalling the group would hit them
        twice and make them give up at once.
        """
        for service in reversed(self.services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in self.services:
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(service.process, signal.SIGKILL)  # stragglers (e.g. worker subprocesses)
            service.process.wait()
        self.services.clear()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
