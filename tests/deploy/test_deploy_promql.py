"""Dashboards and alert rules use only metric names that our exporters publish."""

from __future__ import annotations

import pytest
from _deploy_helpers import (
    alert_rules,
    dashboard_expressions,
    metric_names,
    substitute_grafana,
    unknown_names,
)

from services.loop.metrics import exported_names

KNOWN = exported_names()


def _rule_expressions() -> list[tuple[str, str]]:
    return [(rule.get("alert") or rule.get("record"), rule["expr"]) for rule in alert_rules()]


def test_alert_rule_metric_names_are_exported():
    exprs = _rule_expressions()
    assert len(exprs) >= 6
    bad = {where: unknown_names(expr, KNOWN) for where, expr in exprs}
    assert not {k: v for k, v in bad.items() if v}, f"names not in services.loop.metrics.exported_names(): {bad}"


def test_dashboard_metric_names_are_exported():
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    bad = {}
    for where, expr in exprs:
        try:
            names = unknown_names(substitute_grafana(expr), KNOWN)
        except ValueError as e:
            pytest.fail(f"{where}: PromQL does not parse: {expr!r}: {e}")
        if names:
            bad[where] = names
    assert not bad, f"names not in services.loop.metrics.exported_names(): {bad}"


def test_every_catalogue_metric_is_on_the_dashboard():
    """The dashboard shows every training metric the driver exports (none silently dropped)."""
    used = set().union(*(metric_names(substitute_grafana(e)) for _, e in dashboard_expressions()))
    from services.loop.metrics import CATALOGUE, REWARD_SERVER_METRICS

    wanted = {m.name for m in CATALOGUE} | set(REWARD_SERVER_METRICS) - {"aepo_reward_verify_seconds"}
    assert wanted - used == set()
    assert "aepo_reward_verify_seconds_bucket" in used


# --- the checker itself can fail --------------------------------------------------------------


def test_checker_catches_a_made_up_name():
    expr = 'sum by (run_id) (rate(aepo_stpes_total{run_id=~"x"}[5m])) / aepo_step'
    assert metric_names(expr) == {"aepo_stpes_total", "aepo_step"}
    assert unknown_names(expr, KNOWN) == {"aepo_stpes_total"}


def test_checker_sees_names_inside_functions_subqueries_and_offsets():
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(aepo_reward_verify_seconds_bucket[5m])))"
        " and max_over_time(aepo_made_up[30m:1m]) and aepo_step offset 30m"
        " unless on (run_id) label_replace(aepo_other_made_up, 'a', '$1', 'b', '(.*)')"
    )
    assert unknown_names(expr, KNOWN) == {"aepo_made_up", "aepo_other_made_up"}


def test_checker_handles_name_matchers():
    assert unknown_names('{__name__="aepo_step", run_id="r"}', KNOWN) == set()
    assert unknown_names('{__name__="aepo_nope"}', KNOWN) == {"aepo_nope"}
    assert unknown_names('{__name__=~"aepo_reward_.*_total"}', KNOWN) == set()
    assert unknown_names('{__name__=~"aepo_nope_.*"}', KNOWN) == {"re:aepo_nope_.*"}


def test_checker_allows_only_the_declared_extras():
    assert unknown_names('up{job="aepo-driver"} == 1', KNOWN) == set()
    assert unknown_names("avg(ray_node_cpu_utilization)", KNOWN) == set()
    assert unknown_names("node_cpu_seconds_total", KNOWN) == {"node_cpu_seconds_total"}


def test_checker_rejects_unparsable_promql():
    with pytest.raises(ValueError):
        metric_names("sum(rate(aepo_step[5m])")


def test_grafana_macros_are_substituted_before_parsing():
    expr = 'rate(aepo_steps_total{run_id=~"$run_id"}[$__rate_interval])'
    assert metric_names(substitute_grafana(expr)) == {"aepo_steps_total"}
