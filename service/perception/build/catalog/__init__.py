"""Every perception model the build converts: one module per model family, each exporting `SPECS`.

To add a model: write `catalog/<family>.py` with a `SPECS` tuple of `ModelSpec`s (source, kind, static input
shape, calibration inputs from real photos) and add the module to `_FAMILIES` below.
"""
from __future__ import annotations

from service.perception.build.catalog import blazeface, face_checks, movenet, nanodet, ppocr, ssrnet_age
from service.perception.build.spec import ModelSpec

_FAMILIES = (blazeface, nanodet, ppocr, movenet, ssrnet_age, face_checks)


def _collect() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for family in _FAMILIES:
        for spec in family.SPECS:
            if spec.name in specs:
                raise ValueError(f"perception: model {spec.name!r} is declared twice ({family.__name__})")
            specs[spec.name] = spec
    return specs


SPECS = _collect()
