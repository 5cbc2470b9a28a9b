"""A Mosquitto child process on a loopback port: for `make run` (mqtt.local_broker) and for the tests.

It keeps its persistence file in its own folder, so a stop and a start (the tests' broker outage) keep
the queued messages of persistent sessions, as a real broker restart would.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = ROOT / "deploy" / "install-debian-packages.sh"     # what `make setup` runs


class BrokerError(RuntimeError):
    """Mosquitto is missing or did not start; the message says what to do."""


def mosquitto_binary(install: bool = False) -> str:
    """The mosquitto executable (Debian puts it in /usr/sbin, often not on PATH); installs it when asked."""
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else "")
    if not found and install:
        result = subprocess.run(["sh", str(INSTALL_SCRIPT), "mosquitto"], capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"cannot install mosquitto: {result.stderr.strip() or result.stdout.strip()}")
        return mosquitto_binary(install=False)
    if not found:
        raise BrokerError(f"mosquitto is not installed (sh {INSTALL_SCRIPT} mosquitto installs it from Debian's "
                          "packages)")
    return found


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def password_entry(binary: str, folder: Path, username: str, password: str) -> Path:
    """A Mosquitto password file with one user, written by mosquitto_passwd (hashed as the broker expects)."""
    passwd = Path(binary).with_name("mosquitto_passwd")
    tool = str(passwd) if passwd.is_file() else (shutil.which("mosquitto_passwd") or "")
    if not tool:
        raise BrokerError("mosquitto_passwd is missing (it comes with the mosquitto package)")
    path = folder / "passwords"
    subprocess.run([tool, "-c", "-b", str(path), username, password], check=True, capture_output=True)
    path.chmod(0o600)
    return path


class LocalBroker:
    def __init__(self, folder: Path, port: int, *, host: str = "127.0.0.1", password_file: Path | None = None,
                 tls: tuple[Path, Path, Path] | None = None, install: bool = True):
        """`tls`: (ca, server certificate, server key); the listener then speaks TLS only."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        self.binary = mosquitto_binary(install=install)
        self.config = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        # The child runs as whoever runs us: started as root, Mosquitto would otherwise drop to its own user and
        # could not read our (private) temporary folders.
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}", f"listener {port} {host}",
                 "allow_anonymous false" if password_file else "allow_anonymous true",
                 "persistence true", f"persistence_location {self.folder}/", "autosave_interval 1",
                 f"log_dest file {self.log}", "log_type error", "log_type warning", "log_type notice"]
        if password_file:
            lines.append(f"password_file {password_file}")
        if tls:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> LocalBroker:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: "
                                  f"{self.proc.stderr.read().decode(errors='replace')[-2000:]} {self._log_tail()}")
            if listening(self.host, self.port):
                return self
            time.sleep(0.05)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout}s: {self._log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence file and closes every connection."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
