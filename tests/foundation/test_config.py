"""The configuration loader: defaults -> YAML -> INCAR_SECTION__KEY -> --set, each later source winning key by
key; pydantic coerces and refuses, and every message starts with the dotted key."""
from __future__ import annotations

import pytest

from service.config import SECTIONS, ConfigError, load_config
from service.runtime.config import RuntimeConfig


def test_sources_apply_in_order_key_by_key(tmp_path):
    yaml_file = tmp_path / "incar.yaml"
    yaml_file.write_text("runtime:\n  threads: 2\n  variant: float\nserver:\n  log_level: debug\n")
    env = {"INCAR_RUNTIME__THREADS": "3", "INCAR_SERVER__LOG_FORMAT": "console", "OTHER": "x"}
    config = load_config(yaml_file, env=env, overrides=["runtime.threads=4"])
    assert config.runtime.threads == 4                  # --set beats the environment and the file
    assert config.runtime.variant == "float"            # the file's other keys stay
    assert config.server.log_format == "console"        # the environment beats the defaults
    assert config.server.log_level == "debug"
    assert config.runtime.bundle == RuntimeConfig().bundle   # what nobody set is the embedded default
    assert set(vars(config)) == set(SECTIONS)


def test_values_are_coerced_from_strings_to_the_declared_types():
    config = load_config(env={"INCAR_CAMERAS__MAX_FRAME_AGE_SECONDS": "2.5", "INCAR_SECURITY__ROLE_FROM_OU": "no"},
                         overrides=["runtime.scheduler.queue_limits.chat=3", "runtime.bundle=1234"])
    assert config.cameras.max_frame_age_seconds == 2.5
    assert config.security.role_from_ou is False
    assert config.runtime.bundle == "1234"     # a number where a string is declared stays text
    # a mapping given in part keeps its other default entries
    assert config.runtime.scheduler.queue_limits["chat"] == 3
    assert config.runtime.scheduler.queue_limits["critical"] == RuntimeConfig().scheduler.queue_limits["critical"]


@pytest.mark.parametrize("override, message", [
    ("runtime.backend=gpu", r"^runtime\.backend: expected one of cpu, qnn-htp, qnn-emulator, got 'gpu'$"),
    ("runtime.threads=many", r"^runtime\.threads: input should be a valid integer.*got 'many'$"),
    ("runtime.threads=2.5", r"^runtime\.threads: .*fractional part, got 2\.5$"),
    ("server.shutdown_grace_seconds=.inf", r"^server\.shutdown_grace_seconds: input should be a finite number"),
    ("runtime.engine.temperature=1", r"^runtime\.engine\.temperature: unknown key \(known: .*system_prompt"),
    ("cameras.cameras=[{id: a, role: trunk}]", r"^cameras\.cameras\[0\]\.role: expected one of cabin, exterior"),
    ("cameras.cameras=[{id: a, colour: red}]", r"^cameras\.cameras\[0\]\.colour: unknown key \(known: .*role"),
    ("security.role_from_ou=perhaps", r"^security\.role_from_ou: input should be a valid boolean"),
    ("server=3", r"^server: input should be a dictionary"),
    ("gpu.count=1", r"^gpu: unknown section \(known: actions, cameras"),
])
def test_bad_values_name_their_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=[override])


def test_bad_sources_say_which(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", env={})
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml", env={})
    with pytest.raises(ConfigError, match=r"--set 'runtime\.threads': expected section\.key=value"):
        load_config(env={}, overrides=["runtime.threads"])
    with pytest.raises(ConfigError, match=r"^runtime\.backend: expected one of"):
        load_config(env={"INCAR_RUNTIME__BACKEND": "tpu"})
