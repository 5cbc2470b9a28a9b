"""Lint-level checks of the root Dockerfile (no Docker engine here to build it)."""
from __future__ import annotations

import re

from tests.deploy.deploy_files import ROOT


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies kept with their RUN."""
    text = (ROOT / "Dockerfile").read_text()
    out, lines = [], iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            body = []
            for more in lines:
                if more.strip() == heredoc.group(1):
                    break
                body.append(more)
            line += "\n" + "\n".join(body)
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_multi_stage_slim_base():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert any(re.search(r"python:3\.11-slim", args) for word, args in instructions() if word == "ARG")
    assert any(word == "COPY" and args.startswith("--from=build") for word, args in final_stage())


def test_runs_as_a_non_root_user():
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(word == "RUN" and "useradd" in args and user in args for word, args in final_stage())


def test_healthcheck_through_grpc_health():
    checks = [args for word, args in final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert re.search(r'CMD \["incar", "health"', checks[0])


def test_bundle_built_at_image_build_time_not_downloaded():
    runs = [args for word, args in instructions() if word == "RUN"]
    assert any("incar model build --default --out /opt/incar/models" in r for r in runs)
    text = (ROOT / "Dockerfile").read_text().lower()
    for fetch in ("curl ", "wget ", "huggingface", "hf_hub", "git lfs", "git clone", "http://", "https://"):
        assert fetch not in text, f"the image must not fetch models ({fetch.strip()!r})"
    bundle = [args for word, args in final_stage() if word == "ENV" and "INCAR_RUNTIME__BUNDLE" in args]
    assert bundle and "/opt/incar/models/" in bundle[0]


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "build", "data"} <= ignored


def test_perception_build_photos_reach_the_image():
    """`incar perception build` runs in the image: the photos it calibrates on are copied in and not ignored."""
    from service.perception.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, IMAGES_DIR
    folder = IMAGES_DIR.relative_to(ROOT).as_posix()
    assert not folder.startswith("tests/")
    copies = [args.split() for word, args in instructions() if word == "COPY" and "--from" not in args]
    assert any(src.rstrip("/") == folder for *sources, _ in copies for src in sources), f"{folder} is not copied"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    top = folder.split("/")[0]
    if top in ignored:   # an ignored parent needs a re-include for the folder (or a parent of it)
        assert any(line.startswith("!") and folder.startswith(line[1:].rstrip("/")) for line in ignored)
    for name in CALIBRATION_PHOTOS + HELD_OUT_PHOTOS:
        assert (IMAGES_DIR / name).is_file()
