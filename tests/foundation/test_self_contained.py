"""A clone must test itself: no test, benchmark or service file reads the `shared/` folder beside the clone."""
from __future__ import annotations

import re

from tests.conftest import PHOTOS, ROOT

OUTSIDE = re.compile(r"""ROOT\.parent|parents\[2\]\s*/\s*["']shared|\.\./shared/images|"""
                     r"""["']shared["']\s*/\s*["']images""")


def test_nothing_reads_beside_the_clone():
    offenders = []
    for area in ("tests", "service", "skills", "bench"):
        for path in (ROOT / area).rglob("*.py"):
            if path == __file__ or path.name == "test_self_contained.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "reads outside the clone:\n" + "\n".join(offenders)


def test_every_photo_has_its_source():
    readme = (PHOTOS / "README.md").read_text()
    photos = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert photos, f"no photos in {PHOTOS}"
    assert [p for p in photos if p not in readme] == []
