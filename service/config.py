"""One configuration: embedded defaults (each area's dataclasses), a YAML file, environment variables
`INCAR_<SECTION>__<KEY>` and CLI `--set section.key=value`, in that order.

The sources are merged into one mapping (later sources win, key by key), then each section is validated by
pydantic against its area's dataclass (types checked and coerced: "3" -> 3, "yes" -> True; unknown keys and
non-finite numbers refused), then each dataclass's own `validate()` runs for the rules types cannot say.
Values in the environment and in `--set` are YAML (`[a, b]` is a list, `{k: v}` a mapping). A mapping
setting (e.g. `power.budgets.power_watts`) given in part keeps its other default entries.

An invalid value stops the start with a message that starts with the dotted key, e.g.
`runtime.backend: expected one of cpu, qnn-htp, qnn-emulator, got 'gpu'`.

Adding a section: import its dataclass here and add it to `SECTIONS`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from service.actions.config import ActionsConfig
from service.cameras.config import CamerasConfig
from service.mqtt.config import MqttConfig
from service.perception.cascade import PerceptionConfig
from service.power.config import PowerConfig
from service.runtime.config import RuntimeConfig
from service.security.config import SecurityConfig
from service.transport import TransportConfig
from skills.config import SkillsConfig

ENV_PREFIX = "INCAR_"


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the dotted key."""


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"     # loopback unless configured otherwise
    data_dir: str = "data"
    max_receive_message_bytes: int = 8 * 1024 * 1024  # a raw 768x768 BGR frame is 1.7 MiB
    shutdown_grace_seconds: float = 5.0
    log_level: str = "info"
    log_format: str = "json"                   # "json" or "console"

    def validate(self) -> None:
        for key in ("listen", "metrics_listen"):
            host, _, port = getattr(self, key).rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"{key}: expected host:port, got {getattr(self, key)!r}")
        if self.max_receive_message_bytes < 2 * 1024 * 1024:
            raise ValueError("max_receive_message_bytes: must be at least 2 MiB (raw 768x768 frames)")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level: expected debug|info|warning|error, got {self.log_level!r}")
        if self.log_format not in ("json", "console"):
            raise ValueError(f"log_format: expected json|console, got {self.log_format!r}")


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "runtime": RuntimeConfig,
    "cameras": CamerasConfig,
    "perception": PerceptionConfig,
    "skills": SkillsConfig,
    "power": PowerConfig,
    "security": SecurityConfig,
    "actions": ActionsConfig,
    "transport": TransportConfig,
    "mqtt": MqttConfig,
}

# Lax coercion from YAML / environment strings, but no unknown keys, no NaN/inf, numbers accepted as strings.
_PYDANTIC = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


class Config(types.SimpleNamespace):
    """Sections as attributes: `config.server.listen`, `config.cameras`, ..."""


def load_config(path: str | Path | None = None, *, env: dict[str, str] | None = None,
                overrides: list[str] = ()) -> Config:
    env = os.environ if env is None else env
    raw = _read_yaml(path) if path else {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            _set_dotted(raw, key[len(ENV_PREFIX):].lower().replace("__", "."), _parse(value))
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set_dotted(raw, dotted.strip(), _parse(value))
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section (known: {', '.join(sorted(SECTIONS))})")
    return Config(**{name: build(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()})


def build(cls: type, values: Any, where: str):
    """One section's dataclass from a mapping: merged over the defaults, validated, then its validate()s."""
    if isinstance(values, cls):
        return values
    if isinstance(values, dict):
        values = _over_defaults(cls(), values)
    try:
        obj = _validator(cls).model_validate({"value": values}).value
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], cls, where)) from None
    _run_validate(obj, where)
    return obj


def _read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections")
    return raw


def _parse(value: str) -> Any:
    return yaml.safe_load(value) if value else value


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


@functools.cache
def _validator(cls: type) -> type[pydantic.BaseModel]:
    return pydantic.create_model(f"{cls.__name__}Settings", __config__=_PYDANTIC, value=(cls, ...))


def _over_defaults(default: Any, values: dict) -> dict:
    """Mapping settings given in part keep their other default entries (nested sections fill their own)."""
    out = dict(values)
    for key, value in values.items():
        current = getattr(default, key, None)
        if isinstance(value, dict) and isinstance(current, dict):
            out[key] = {**_plain(current), **value}
        elif isinstance(value, dict) and dataclasses.is_dataclass(current):
            out[key] = _over_defaults(current, value)
    return out


def _plain(mapping: dict) -> dict:
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in mapping.items()}


def _run_validate(obj: Any, where: str) -> None:
    """Each dataclass's validate(), innermost first, its message prefixed with where it sits."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _run_validate(getattr(obj, f.name), f"{where}.{f.name}")
        validate = getattr(obj, "validate", None)
        if validate and _takes_no_arguments(validate):   # one that takes arguments is its parent's to call
            try:
                validate()
            except ValueError as exc:
                raise ConfigError(f"{where}.{exc}") from None
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _run_validate(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _run_validate(item, f"{where}.{key}")


def _takes_no_arguments(fn) -> bool:
    params = inspect.signature(fn).parameters.values()
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _describe(error: dict, cls: type, where: str) -> str:
    loc = error["loc"][1:]   # past the wrapper model's "value"
    # A union or a dataclass's own constructor adds a step naming the type: not a key.
    keys = [part for part in loc if isinstance(part, int) or not part[:1].isupper() and "[" not in part]
    dotted = where + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)
    if error["type"] == "unexpected_keyword_argument":
        known = _known_keys(cls, keys[:-1])
        return f"{dotted}: unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if error["type"] == "missing_keyword_argument":
        return f"{dotted}: required"
    return f"{dotted}: {error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}"


def _known_keys(cls: Any, keys: list) -> list[str]:
    """The field names of the dataclass found at `keys` inside `cls` (for 'unknown key' messages)."""
    inside_container = False
    for key in keys:
        if inside_container:             # a list index or a mapping key: the element type is already `cls`
            inside_container = False
            continue
        cls = typing.get_type_hints(cls).get(key) if dataclasses.is_dataclass(cls) else None
        if typing.get_origin(cls) in (typing.Union, types.UnionType):
            cls = next((a for a in typing.get_args(cls) if a is not type(None)), None)
        if typing.get_origin(cls) in (list, tuple, dict):
            cls, inside_container = (typing.get_args(cls) or (None,))[-1], True
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (embedded defaults apply to what it leaves out)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting (repeatable); environment: INCAR_SECTION__KEY=VALUE")


def config_from_args(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, overrides=args.set)
    except ConfigError as exc:
        print(f"incar: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
