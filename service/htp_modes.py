"""The QNN HTP performance modes (onnxruntime-qnn's `htp_performance_mode`), most power first.

The runtime sets one on its QNN sessions and the power governor chooses among them; the list lives here, below
both, so that neither imports the other.
"""
from __future__ import annotations

HTP_MODES = ("burst", "sustained_high_performance", "high_performance", "balanced", "low_balanced",
             "high_power_saver", "power_saver", "low_power_saver", "extreme_power_saver")
# What a session may be given: a governed mode, or "default" (the QNN EP's own choice; the governor never picks it).
SESSION_MODES = (*HTP_MODES, "default")
