"""The experiment report: tables, figures and claim verdicts computed from the runs' own files.

Everything here reads what the runs wrote (metrics.jsonl, eval.jsonl, summary.json); no number
is typed in. The modules split along what each part needs, so a change to one of them (a new
statistic, a restyled figure, a stricter verdict, a new section) stays in one place:

* `runs` loads a run's files and computes the per-run and per-seed numbers (accuracy, pass@k,
  overshoot, settling step, tail means, mean ± spread, grouping, the best sweep target) and holds
  the definitions the report prints; it needs neither matplotlib nor markdown, which is why the
  runner can import it to resolve the `targets: best` groups before any report exists. The
  tracking error is the run summary's own (services/loop/outputs.py), so both give one number.
* `figures` draws every figure (matplotlib, imported only when a figure is drawn).
* `claims` turns the numbers into the claim verdicts (claim, verdict, numbers) and holds the
  thresholds behind them.
* `write` holds `write_report`: one function per report section, each returning its markdown
  lines and verdicts after drawing its figures, and write_report only puts them in order.

Import from the specific module: this file deliberately re-exports nothing.
"""
