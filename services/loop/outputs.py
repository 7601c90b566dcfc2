"""A run's output folder: metrics.jsonl (one row per step), summary.json, entropy.png.

Rows are appended and flushed to disk every step, so a crash loses at most the step in flight;
on resume the rows after the checkpoint's step are dropped, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from services.loop import durable


# what a run writes into its output directory: a fresh run refuses to start over any of them
# (services/loop/trainer.py), and --overwrite deletes exactly these, nothing else. The loggers'
# folders (tensorboard/, wandb/) are not among them: each writer adds files of its own there.
RUN_FILES = frozenset({"metrics.jsonl", "eval.jsonl", "samples.jsonl", "events.jsonl", "summary.json", "entropy.png",
                       "checkpoints", "policy"})


class RunDirNotEmpty(FileExistsError):
    """A fresh run would mix its logs with an earlier run's."""


def claim_output_dir(output_dir: Path, overwrite: bool) -> None:
    """A fresh run starts in a directory without an earlier run's files, or (`overwrite`) deletes them."""
    found = sorted(p.name for p in Path(output_dir).iterdir() if p.name in RUN_FILES)
    if found and not overwrite:
        raise RunDirNotEmpty(
            f"{output_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
            "start over with --overwrite (deletes those files), or choose another --output-dir")
    for name in found:
        target = Path(output_dir) / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


# every field of a metrics row that measures time or speed: two runs of the same config on the
# same seeds agree on everything else, bit for bit (the resume test and the chaos run compare so)
TIMING_FIELDS = frozenset({"time", "step_seconds", "step_overhead", "rollout_tokens_per_s", "learner_tokens_per_s",
                           "weight_sync_seconds"})


def comparable(row: dict) -> dict:
    """`row` without its timing fields."""
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


class MetricsLog:
    """Append-only JSONL of step rows, durable per row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything before it is intact
        return out

    def truncate_after(self, step: int) -> None:
        """Keep rows with row['step'] <= step (used when resuming from a checkpoint at `step`)."""
        kept = [r for r in self.rows() if r["step"] <= step]
        durable.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def last_step(self) -> int | None:
        """The step of the last intact row (None when there is none)."""
        rows = self.rows()
        return rows[-1]["step"] if rows else None

    def append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def tracking_error(rows: list[dict], *, second_half: bool = True) -> float | None:
    """Mean |H − H*| (row["entropy_controlled"] vs row["entropy_target"]) over the rows given, or over the
    second half of them when `second_half` (the default: the settled part of a run, the number the
    run summary and the experiment report both call the tracking error).

    Rows without an entropy or without a target are skipped before the halving, so a step whose
    entropy was not measured neither counts nor shifts the half; None when no row has both.
    """
    # the signal the controller steers (`entropy_controlled`: the mean unless controller.entropy_source
    # says otherwise); rows written before it existed carry only the mean
    pts = [(r.get("entropy_controlled", r.get("entropy")), r.get("entropy_target")) for r in rows]
    pts = [(h, t) for h, t in pts if h is not None and t is not None]
    if second_half:
        pts = pts[len(pts) // 2 :]
    return sum(abs(h - t) for h, t in pts) / len(pts) if pts else None


def summarize(rows: list[dict], extra: dict | None = None) -> dict:
    """summary.json: the run's headline numbers."""
    if not rows:
        return {"steps": 0, **(extra or {})}
    first, last = rows[0], rows[-1]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    summary = {
        "algorithm": last.get("algorithm"),
        "steps": last["step"] + 1,
        "entropy_first": first.get("entropy"),
        "entropy_last": last.get("entropy"),
        "entropy_target_last": last.get("entropy_target"),
        "mean_abs_entropy_error_second_half": tracking_error(rows, second_half=True),
        "reward_mean_last10": _mean(r.get("reward_mean") for r in rows[-10:]),
        "step_seconds_mean": _mean(r.get("step_seconds") for r in rows),
        "entropy_every_10": {str(r["step"]): round(r["entropy"], 4) for r in rows if r["step"] % 10 == 0 and r.get("entropy") is not None},
    }
    if evals:
        summary["eval_first"] = {k: v for k, v in evals[0].items() if k.startswith("eval_")} | {"step": evals[0]["step"]}
        summary["eval_last"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_")} | {"step": evals[-1]["step"]}
    summary.update(extra or {})
    return summary


def _mean(values: Iterable) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def write_json(path: str | Path, obj: dict) -> None:
    """Atomic and durable (services/loop/durable.py)."""
    durable.write_json(path, obj)


def plot_entropy(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """entropy.png: entropy vs target over steps for each run (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_t) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, rows in runs.items():
        steps = [r["step"] for r in rows if r.get("entropy") is not None]
        line, = ax.plot(steps, [r["entropy"] for r in rows if r.get("entropy") is not None], label=f"{name} entropy")
        tgt = [(r["step"], r["entropy_target"]) for r in rows if r.get("entropy_target") is not None]
        if tgt:
            ax.plot(*zip(*tgt), linestyle="--", color=line.get_color(), alpha=0.7, label=f"{name} target H*")
        temps = [(r["step"], r["reg_temperature"]) for r in rows if r.get("reg_temperature") is not None]
        if temps:
            ax_t.step(*zip(*temps), where="post", color=line.get_color(), label=f"{name} T_reg")
    ax.set_ylabel("token entropy at T=1 (nats)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax_t.set_ylabel("T_reg")
    ax_t.set_xlabel("step")
    ax_t.grid(alpha=0.3)
    if ax_t.get_legend_handles_labels()[0]:
        ax_t.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
