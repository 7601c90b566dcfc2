"""promtool on the Prometheus config, the alert rules and their unit tests; rule hygiene."""

from __future__ import annotations

import shutil

import pytest
import yaml
from _deploy_helpers import PROM_DIR, RULES_FILE, alert_rules, promtool, run, show

RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
ALERTS = {
    "AepoEntropyCollapse",
    "AepoEntropyCollapseNoTarget",
    "AepoEntropyExplosion",
    "AepoRewardFailureRateHigh",
    "AepoRewardServerDown",
    "AepoNoTrainingProgress",
}


def test_promtool_check_config():
    proc = run([promtool(), "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert proc.returncode == 0, show(proc)
    assert "1 rule files found" in proc.stdout + proc.stderr, show(proc)  # rule_files resolved


def test_promtool_check_rules():
    proc = run([promtool(), "check", "rules", str(RULES_FILE)])
    assert proc.returncode == 0, show(proc)
    assert f"{len(ALERTS)} rules found" in proc.stdout, show(proc)


def test_promtool_test_rules():
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests/"
    proc = run([promtool(), "test", "rules", *map(str, RULE_TESTS)])
    assert proc.returncode == 0, show(proc)


def test_every_alert_has_a_unit_test_that_fires_and_one_that_stays_quiet():
    fired, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert ALERTS <= fired, f"no firing test for {ALERTS - fired}"
    assert ALERTS <= quiet, f"no quiet test for {ALERTS - quiet}"


def test_promtool_unit_tests_can_fail(tmp_path):
    """A wrong expectation makes `promtool test rules` fail (the suite is not vacuous)."""
    shutil.copytree(PROM_DIR / "rules", tmp_path / "rules")
    (tmp_path / "tests").mkdir()
    text = (PROM_DIR / "tests" / "aepo-alerts.test.yml").read_text()
    mutated = text.replace("exp_labels: {severity: critical, run_id: p1,", "exp_labels: {severity: critical, run_id: p2,")
    assert mutated != text
    (tmp_path / "tests" / "mutated.yml").write_text(mutated)
    proc = run([promtool(), "test", "rules", str(tmp_path / "tests" / "mutated.yml")])
    assert proc.returncode != 0, show(proc)
    assert "AepoNoTrainingProgress" in proc.stdout + proc.stderr


def test_rules_have_severity_and_runbook_annotations():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']}: no {key}"
        assert rule.get("for"), f"{rule['alert']}: fires on a single evaluation"


def test_scrape_config_targets():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"ray", "aepo-driver", "aepo-reward"}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["aepo-driver"]["static_configs"][0]["targets"] == ["ray-head:9400"]
    assert jobs["aepo-driver"]["scrape_interval"] == "5s"
    assert jobs["aepo-reward"]["static_configs"][0]["targets"] == ["reward-server:8000"]
    assert jobs["aepo-reward"]["metrics_path"] == "/metrics"
    # the alert rules select these job names
    rules_text = RULES_FILE.read_text()
    assert 'job="aepo-driver"' in rules_text and 'job="aepo-reward"' in rules_text


@pytest.mark.parametrize("broken", ["scrape_intervall: 5s", "rule_files: rules/*.yml"])
def test_promtool_rejects_a_broken_config(tmp_path, broken):
    text = (PROM_DIR / "prometheus.yml").read_text()
    if broken.startswith("rule_files"):
        # a rules file with a PromQL syntax error
        (tmp_path / "rules").mkdir()
        (tmp_path / "rules" / "bad.yml").write_text(
            "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: sum(rate(aepo_step[5m])\n"
        )
    else:
        text = text.replace("  scrape_interval: 15s", f"  {broken}", 1)
    (tmp_path / "prometheus.yml").write_text(text)
    proc = run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode != 0, show(proc)
