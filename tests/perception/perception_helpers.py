"""Helpers shared by the perception tests ."""
from __future__ import annotations

from service.perception.calibration import load_photo as load_image  # noqa: F401  (the tests' photo loader)
from service.perception.types import box_iou as iou  # noqa: F401  (one IoU for the service and its tests)


