"""The CPU decoder's thread-pool spin policy: bounded in-run spinning by default, off or re-bounded from the
environment, never for other sessions; a bad bound is refused naming the variable."""
from __future__ import annotations

import pytest

from service.runtime.providers import SPIN_US, BackendError, session_options, spin_us_from_env


def _entries(so) -> dict[str, str]:
    keys = ("session.intra_op.allow_spinning", "session.intra_op.spin_duration_us", "session.force_spinning_stop")
    out = {}
    for key in keys:
        try:
            out[key] = so.get_session_config_entry(key)
        except Exception:             # absent entry
            pass
    return out


def test_bounded_spin_sets_duration_and_stops_after_each_run():
    entries = _entries(session_options(2, 35))
    assert entries == {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": "35",
                       "session.force_spinning_stop": "1"}
    assert _entries(session_options(2, True))["session.intra_op.spin_duration_us"] == str(SPIN_US)


def test_no_spin_for_other_sessions():
    for off in (False, 0):
        entries = _entries(session_options(2, off))
        assert entries.get("session.intra_op.allow_spinning") == "0"
        assert "session.intra_op.spin_duration_us" not in entries


@pytest.mark.parametrize(("env", "expected"), [({}, SPIN_US), ({"INCAR_CPU_SPIN": "0"}, 0),
                                               ({"INCAR_CPU_SPIN": "0", "INCAR_CPU_SPIN_US": "50"}, 0),
                                               ({"INCAR_CPU_SPIN_US": "50"}, 50), ({"INCAR_CPU_SPIN_US": "0"}, 0)])
def test_spin_bound_from_environment(monkeypatch, env, expected):
    monkeypatch.delenv("INCAR_CPU_SPIN", raising=False)
    monkeypatch.delenv("INCAR_CPU_SPIN_US", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert spin_us_from_env() == expected


def test_bad_spin_bound_is_refused(monkeypatch):
    monkeypatch.setenv("INCAR_CPU_SPIN_US", "twenty")
    with pytest.raises(BackendError, match="INCAR_CPU_SPIN_US"):
        spin_us_from_env()
