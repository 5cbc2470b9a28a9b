"""Readers for deploy/: the compose file, Prometheus config and rules, Grafana provisioning and dashboard,
and the metric names they use."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

METRIC = re.compile(r"\bincar_[a-z0-9_]+\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def load_yaml(relpath: str):
    return yaml.safe_load((DEPLOY / relpath).read_text())


def compose() -> dict:
    return load_yaml("docker-compose.yml")


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))}


def dashboard_exprs() -> list[str]:
    out = []
    for board in dashboards().values():
        for panel in board["panels"]:
            out += [t["expr"] for t in panel.get("targets", [])]
    return out


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml("prometheus/alerts.yml")["groups"] for rule in group["rules"]]


def metric_names(exprs) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def deploy_metric_names() -> set[str]:
    return metric_names(dashboard_exprs() + [r["expr"] for r in alert_rules()])


def metric_defining_modules() -> list[str]:
    """Modules under service/ and skills/ that create a prometheus_client metric named incar_*."""
    modules = []
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "skills").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", ""))
                    in ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).startswith("incar_")):
                modules.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
                break
    return modules


def exported_names(families) -> set[str]:
    """Every name a PromQL query may use for these families (counters `_total`, histogram series, ...)."""
    names = set()
    for family in families:
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in SUFFIXES)
    return names
