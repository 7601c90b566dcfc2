"""A real Prometheus server scrapes a short CPU run; its series match the run's metrics.jsonl.

Prometheus samples the driver's exporter every second, so it sees most steps, not all: for every
scrape it took, the step it saw (`aepo_step`) must carry exactly that step's entropy, target and
regularizer temperature from metrics.jsonl, and it must have seen several distinct steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import defaultdict

import pytest
from services.backends.network import free_port
from testlib import wait_for_http

pytestmark = pytest.mark.slow



def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture()
def prometheus(tmp_path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed: run `bash scripts/setup.sh --test` (it installs it with apt-get)")
    target, web = free_port(), free_port()
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: aepo-driver\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    proc = subprocess.Popen(
        [exe, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web}"
    try:
        wait_for_http(f"{base}/-/ready", proc, "prometheus", timeout_s=30)
        yield base, target
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _series(base: str, query: str, start: float, end: float) -> dict[float, float]:
    q = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": "1s"})
    res = _get(f"{base}/api/v1/query_range?{q}")["data"]["result"]
    assert len(res) == 1, (query, res)
    return {float(t): float(v) for t, v in res[0]["values"]}


def test_prometheus_scrapes_the_entropy_target_and_temperature_of_each_step(ray_local, prometheus, tmp_path):
    from services.config import TrainConfig
    from services.data.datasets import load_items
    from services.loop.trainer import Trainer
    from services.loop.metrics import RunMetrics
    from services.model.tiny import resolve_model_path
    from services.backends.ray_cluster import System

    base, port = prometheus
    cfg = TrainConfig.model_validate({
        "run_name": "prom",
        "algorithm": {"type": "aepo", "target": {"type": "piecewise", "boundaries": [4], "values": [5.0, 0.01]},
                      "prompt_share": 1.0},
        "data": {"type": "countdown", "num_train": 64, "num_eval": 2},
        "rollout": {"group_size": 4, "max_tokens": 16, "cpus_per_actor": 0.5},
        "learner": {"num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 32},
        "controller": {"name": "prom-controller"},
        "trainer": {"steps": 10, "prompts_per_step": 8, "eval_every": 0, "save_every": 0,
                    "output_dir": str(tmp_path / "run"), "log_samples": 0},
    })
    model = resolve_model_path(cfg.model, cache_dir=tmp_path / "cache")
    train, held_out = load_items(cfg.data)
    t0 = time.time()
    with System(cfg, model) as system:
        metrics = RunMetrics("prom", port)
        try:
            trainer = Trainer(cfg, system.components(metrics), train, held_out[:0], tmp_path / "run", progress=False)
            trainer.fit()
            time.sleep(2.5)  # let the last step be scraped
        finally:
            metrics.close()
    t1 = time.time()
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    step = _series(base, 'aepo_step{run_id="prom"}', t0, t1)
    entropy = _series(base, 'aepo_policy_entropy{run_id="prom",source="exact"}', t0, t1)
    target = _series(base, 'aepo_entropy_target{run_id="prom"}', t0, t1)
    temp = _series(base, 'aepo_regularizer_temperature{run_id="prom"}', t0, t1)
    content = _series(base, 'aepo_token_entropy{run_id="prom",kind="content"}', t0, t1)
    seen = defaultdict(set)
    for ts, s in step.items():
        # the four series come from one scrape, so share its timestamp; each must be that step's row
        row = rows[int(s)]
        assert entropy[ts] == pytest.approx(row["entropy"], rel=1e-9)
        assert target[ts] == pytest.approx(row["entropy_target"], rel=1e-9)
        assert temp[ts] == row["reg_temperature"]
        assert content[ts] == pytest.approx(row["token_entropy"]["content"], rel=1e-9)
        seen[int(s)].add(ts)
    assert len(seen) >= 3, f"prometheus saw steps {sorted(seen)} of {sorted(rows)}"
    assert max(seen) == max(rows)  # the last step's values are the ones left standing
    # the temperature flip (targets 5.0 then 0.01) shows up in Prometheus too
    assert {temp[ts] for ts in step} <= {1.2, 0.8}
