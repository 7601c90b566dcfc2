"""The provisioned Grafana dashboard: structure, datasource uid, the questions it must answer."""

from __future__ import annotations

import copy

import yaml
from _deploy_helpers import COMPOSE_FILE, DEPLOY, dashboard, dashboard_panels

PROVISIONING = DEPLOY / "grafana" / "provisioning"


def _datasource() -> dict:
    doc = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = doc["datasources"]
    return ds


def structure_problems(dash: dict, uid: str) -> list[str]:
    problems = []
    if not dash.get("uid") or not dash.get("title"):
        problems.append("dashboard has no uid/title")
    ids = [p.get("id") for p in dashboard_panels(dash)]
    if len(ids) != len(set(ids)):
        problems.append(f"duplicate panel ids: {ids}")
    for panel in dashboard_panels(dash):
        if panel.get("type") == "row":
            continue
        title = panel.get("title")
        if not title:
            problems.append(f"panel {panel.get('id')} has no title")
        if (panel.get("datasource") or {}).get("uid") != uid:
            problems.append(f"panel {title!r}: datasource uid {panel.get('datasource')} != {uid!r}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"panel {title!r}: duplicate refIds {refs}")
        for t in targets:
            if not (t.get("expr") or "").strip():
                problems.append(f"panel {title!r} target {t.get('refId')}: empty expr")
            if "datasource" in t and t["datasource"].get("uid") != uid:
                problems.append(f"panel {title!r} target {t.get('refId')}: datasource uid {t['datasource']}")
        grid = panel.get("gridPos") or {}
        if not (grid.get("w", 0) > 0 and grid.get("h", 0) > 0 and grid.get("x", 0) + grid.get("w", 0) <= 24):
            problems.append(f"panel {title!r}: bad gridPos {grid}")
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query" and (var.get("datasource") or {}).get("uid") != uid:
            problems.append(f"variable {var['name']!r}: datasource {var.get('datasource')}")
    return problems


def test_datasource_provisioning():
    ds = _datasource()
    assert ds["type"] == "prometheus"
    assert ds["uid"] == "aepo-prometheus"
    assert ds["url"] == "http://prometheus:9090"  # the compose service name


def test_dashboard_structure():
    assert structure_problems(dashboard(), _datasource()["uid"]) == []


def test_structure_check_can_fail():
    dash = copy.deepcopy(dashboard())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    panels[0]["datasource"] = {"type": "prometheus", "uid": "someone-elses"}
    panels[1]["targets"] = []
    problems = structure_problems(dash, _datasource()["uid"])
    assert len(problems) == 2, problems


def test_run_id_variable_filters_every_training_panel():
    dash = dashboard()
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "run_id"]
    assert var["includeAll"] and var["multi"]
    for panel in dashboard_panels(dash):
        for t in panel.get("targets", []):
            expr = t["expr"]
            training = any(name in expr for name in ("aepo_policy", "aepo_entropy", "aepo_step", "aepo_eval", "aepo_phase"))
            if training:
                assert 'run_id=~"$run_id"' in expr, (panel["title"], expr)


def test_dashboard_answers_the_issue_questions():
    panels = {p["title"]: p for p in dashboard_panels() if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}

    def panel_with(*needles: str) -> str:
        hits = [t for t, e in exprs.items() if all(n in e for n in needles)]
        assert hits, f"no panel queries all of {needles}"
        return hits[0]

    # entropy vs target, temperature on a second axis
    title = panel_with("aepo_policy_entropy", "aepo_entropy_target", "aepo_regularizer_temperature")
    overrides = panels[title]["fieldConfig"]["overrides"]
    assert any(
        {"id": "custom.axisPlacement", "value": "right"} in o["properties"] for o in overrides
    ), "temperature is not on a second axis"
    assert any(p["type"] == "state-timeline" and "aepo_regularizer_temperature" in exprs[t] for t, p in panels.items())
    panel_with("aepo_reward_mean")
    panel_with("aepo_accuracy")
    panel_with("aepo_regularizer_selected", "aepo_regularizer_max_selected")
    panel_with("aepo_rollout_tokens_per_second", "aepo_learner_tokens_per_second")
    panel_with("aepo_weight_sync_seconds")
    panel_with("aepo_response_length_mean", "aepo_truncation_rate")
    panel_with("aepo_phase_seconds")
    # the signal the controller holds (controller.entropy_source) beside the exact mean and the target
    panel_with("aepo_entropy_controlled", 'aepo_policy_entropy{run_id=~"$run_id",source="exact"}', "aepo_entropy_target")
    panel_with("aepo_token_entropy")
    panel_with("aepo_token_entropy_share")
    panel_with("aepo_token_entropy_by_position")
    panel_with("aepo_regularizer_weight")
    panel_with("aepo_eval_avg_at_k", "aepo_eval_pass_at_k")
    panel_with("histogram_quantile", "aepo_reward_verify_seconds_bucket")
    panel_with("aepo_reward_items_total", "outcome")


def test_dashboard_provisioning_points_at_the_mounted_folder():
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "aepo.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
