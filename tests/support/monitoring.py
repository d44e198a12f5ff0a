"""deploy/monitoring as the tests read it: the dashboard's queries and the alert rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def dashboard_queries() -> list[str]:
    """Every query of the dashboard, with Grafana's rate interval made concrete."""
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [
        target["expr"].replace("$__rate_interval", "1m")
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]
