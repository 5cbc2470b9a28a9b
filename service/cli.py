"""The `incar` command: serve, sim, events, health, and the build tools (model, perception)."""
from __future__ import annotations

import argparse
import importlib
import sys

from service import __version__
from service.telemetry.logging import configure_logging

# Sub-commands whose parsing belongs to their own package: `incar model ...` runs service.modelbuild.cli.main(argv).
DELEGATED = {
    "model": ("service.modelbuild.cli", "build, inspect and validate model bundles"),
    "perception": ("service.perception.cli", "convert and check the perception models"),
    "certs": ("service.security.devca", "make a development CA and per-role certificates"),
}

LOCAL = {
    "serve": ("service.server", "run the gRPC service"),
    "sim": ("service.sim", "camera simulator + HMI demo against a server (or start one with --with-server)"),
    "events": ("service.clients", "tail the event stream"),
    "health": ("service.clients", "query gRPC health"),
    "ask": ("service.cli_ask", "ask the Assistant a question; the answer streams, then its timings"),
    "chat": ("service.cli_ask", "an interactive session with the Assistant"),
    "greeter": ("service.cli_skills", "enrol, list and forget drivers"),
    "carfinder": ("service.cli_skills", "where the car is parked, parking history"),
    "sentinel": ("service.cli_skills", "arm, disarm, status, clips (list and download)"),
    "safety": ("service.cli_skills", "active safety alerts, acknowledge"),
    "hmi": ("service.hmi_web.gateway", "serve the web HMI: camera tiles, timeline, alerts, Ask (loopback)"),
    "config": ("service.cli_config", "show the effective configuration (each key's meaning); make a profile key"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**LOCAL, **DELEGATED}
    if argv[:1] in (["--version"], ["-V"]):
        print(f"incar {__version__}")
        return 0
    # Until a command configures its own logging (serve does), log lines go to stderr: stdout is the command's
    # output, and `--json` output must stay parseable.
    configure_logging("warning", "console")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="incar", description="In-car assistant service")
        parser.add_argument("--version", "-V", action="store_true", help="print the version and exit")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in commands.items():
            sub.add_parser(name, help=help_text)
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    module_name = commands[argv[0]][0]
    module = importlib.import_module(module_name)
    entry = getattr(module, f"{argv[0]}_main", None) or module.main
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
