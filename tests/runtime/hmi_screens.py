"""HMI-like screens drawn with OpenCV: a speed gauge, labelled readings, a warning banner, a menu bar."""
from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_DUPLEX
RED, AMBER = (0, 0, 200), (0, 150, 230)


def hmi_screen(*, speed=88, readings=(("RANGE", "312 km"), ("BATTERY", "64 %")), warning="LOW TYRE PRESSURE",
               banner=RED, menu=("MEDIA", "NAV", "PHONE", "SETTINGS"), size=(800, 480)) -> np.ndarray:
    w, h = size
    img = np.full((h, w, 3), (30, 25, 20), np.uint8)
    centre = (w // 4, int(h * 0.42))
    cv2.circle(img, centre, 130, (200, 200, 200), 4)
    for a in np.linspace(np.pi * 0.75, np.pi * 2.25, 9):   # the gauge's ticks
        p1 = (int(centre[0] + 115 * np.cos(a)), int(centre[1] + 115 * np.sin(a)))
        p2 = (int(centre[0] + 130 * np.cos(a)), int(centre[1] + 130 * np.sin(a)))
        cv2.line(img, p1, p2, (200, 200, 200), 3)
    cv2.putText(img, str(speed), (centre[0] - 60, centre[1] + 15), FONT, 2.2, (255, 255, 255), 4)
    cv2.putText(img, "km/h", (centre[0] - 35, centre[1] + 60), FONT, 0.9, (220, 220, 220), 2)
    for i, (label, value) in enumerate(readings):
        y = 120 + i * 115
        cv2.putText(img, label, (int(w * 0.59), y), FONT, 1.0, (200, 200, 200), 2)
        cv2.putText(img, value, (int(w * 0.59), y + 55), FONT, 1.5, (255, 255, 255), 3)
    if warning:
        cv2.rectangle(img, (0, int(h * 0.71)), (w, int(h * 0.81)), banner, -1)
        cv2.putText(img, warning, (int(w * 0.25), int(h * 0.78)), FONT, 1.0, (255, 255, 255), 2)
    for i, item in enumerate(menu):
        x = 20 + i * (w - 20) // max(len(menu), 1)
        cv2.rectangle(img, (x, h - 65), (x + (w - 20) // len(menu) - 15, h - 10), (90, 70, 50), -1)
        cv2.putText(img, item, (x + 20, h - 28), FONT, 0.9, (255, 255, 255), 2)
    return img
