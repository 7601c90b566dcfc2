"""Write the word-problem task's problems as a file in a published dataset's layout.

    .venv/bin/python scripts/write_wordproblems.py --format math500 --split eval --out data/wp_math500.jsonl
    .venv/bin/python scripts/write_wordproblems.py --format gsm8k --split eval --out data/wp_gsm8k.parquet
    .venv/bin/python scripts/write_wordproblems.py --format dapo_math --split train --out data/wp_dapo.parquet

The same problems `data: {type: wordproblems}` generates (same num_train / num_eval / seed / max_number
give the same split), in the field layout of MATH-500 (`problem`, `answer`), GSM8K (`question`,
`answer` ending in `#### N`) or DAPO-Math-17k (chat-list `prompt`, `reward_model.ground_truth`):
a way to try the presets, `aepo eval` and file datasets end to end without a hub.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(problems, fmt: str) -> list[dict]:
    if fmt == "math500":
        return [{"problem": p.question, "solution": p.solution, "answer": str(p.answer)} for p in problems]
    if fmt == "gsm8k":
        return [{"question": p.question, "answer": p.solution.rsplit("\n", 1)[0] + f"\n#### {p.answer}"} for p in problems]
    return [{"prompt": [{"role": "user", "content": p.question}], "reward_model": {"ground_truth": str(p.answer), "style": "rule"}}
            for p in problems]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["math500", "gsm8k", "dapo_math"], required=True)
    p.add_argument("--split", choices=["train", "eval"], default="eval")
    p.add_argument("--out", required=True, help=".jsonl or .parquet")
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--max-number", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from services.data.wordproblems import make_splits

    train, held_out = make_splits(args.num_train, args.num_eval, args.seed, args.max_number)
    out_rows = rows(train if args.split == "train" else held_out, args.format)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(out_rows), out)
    elif out.suffix in (".jsonl", ".json"):
        out.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    else:
        raise SystemExit(f"--out {out}: use .jsonl or .parquet")
    print(f"wrote {len(out_rows)} rows ({args.format}, {args.split}) to {out}")


if __name__ == "__main__":
    main()
