"""Prometheus metrics of the actions out: what was asked, repeated, escalated, answered and left unanswered."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from service.telemetry.metrics import LATENCY_BUCKETS, PREFIX

REQUESTED = Counter(f"{PREFIX}actions_requested_total", "Vehicle actions requested", ["kind", "priority"])
REPEATED = Counter(f"{PREFIX}actions_repeated_total",
                   "Safety actions delivered again because the gateway did not acknowledge them in time", ["kind"])
ESCALATED = Counter(f"{PREFIX}actions_escalated_total", "Escalation steps of unacknowledged safety actions",
                    ["kind", "level"])
ACKNOWLEDGED = Counter(f"{PREFIX}actions_acknowledged_total", "Acknowledgements from the gateway", ["kind", "result"])
EXPIRED = Counter(f"{PREFIX}actions_expired_total", "Actions that expired without an acknowledgement",
                  ["kind", "priority"])
CANCELLED = Counter(f"{PREFIX}actions_cancelled_total", "Actions cancelled by their requester", ["kind"])
PENDING = Gauge(f"{PREFIX}actions_pending", "Actions waiting for an acknowledgement", ["priority"])
OVERDUE = Gauge(f"{PREFIX}actions_unacknowledged_overdue",
                "Safety actions past their first acknowledgement deadline and still unanswered")
ACK_SECONDS = Histogram(f"{PREFIX}action_acknowledge_seconds", "From the request to the gateway's acknowledgement",
                        ["kind"], buckets=LATENCY_BUCKETS)
