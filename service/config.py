"""One configuration: embedded defaults (the dataclasses below and each area's own), a YAML file,
environment variables `INCAR_<SECTION>__<KEY>` and CLI `--set section.key=value`, in that order.

An invalid value stops the start with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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


# Sections owned by other packages, imported when the config is built ("module:Class").
SECTIONS: dict[str, Any] = {
    "server": ServerConfig,
}
OPTIONAL_SECTIONS: dict[str, str] = {
    "runtime": "service.runtime.config:RuntimeConfig",
    "cameras": "service.cameras.config:CamerasConfig",
    "perception": "service.perception.cascade:PerceptionConfig",
    "skills": "skills.config:SkillsConfig",
    "power": "service.power.config:PowerConfig",
    "security": "service.security.config:SecurityConfig",
    "actions": "service.actions.config:ActionsConfig",
}


def section_types() -> dict[str, type]:
    out = dict(SECTIONS)
    for name, ref in OPTIONAL_SECTIONS.items():
        module_name, _, cls_name = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that area is not part of this build
            raise
        out[name] = getattr(module, cls_name)
    return out


class Config(types.SimpleNamespace):
    """Sections as attributes: `config.server.listen`, `config.cameras`, ..."""

    def as_dict(self) -> dict:
        return {k: dataclasses.asdict(v) for k, v in vars(self).items()}


def load_config(path: str | Path | None = None, *, env: dict[str, str] | None = None,
                overrides: list[str] = ()) -> Config:
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections")
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_dotted(raw, dotted, yaml.safe_load(value) if value else value)
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set_dotted(raw, dotted.strip(), yaml.safe_load(value) if value else value)

    sections = section_types()
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section (known: {', '.join(sorted(sections))})")
    config = Config()
    for name, cls in sections.items():
        setattr(config, name, build(cls, raw.get(name) or {}, name))
    return config


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def build(cls: type, values: Any, where: str):
    """A dataclass from a mapping, with types checked and coerced; then its validate()."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(names))})")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        default = defaults[key]
        if isinstance(value, dict) and default.default_factory is not dataclasses.MISSING:
            base = default.default_factory()
            if isinstance(base, dict):  # a mapping setting: override some entries, keep the other defaults
                value = {**base, **value}
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if validate:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    return obj


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value
