"""What a comparison becomes: lm-eval-style Markdown tables, JSON rows, one file pair per
consecutive checkpoints, and the ``compare`` command that prints them."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .compare import Comparison, compare, publish
from .config import positive_int
from .errors import UserError
from .paired_stats import CONFIDENCE, DEFAULT_ITERATIONS
from .results_file import checkpoint_section


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return "N/A"
    return f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return "N/A"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def _markdown(header: list[str], rows: Iterable[list[str]], right: set[int]) -> str:
    """A pipe table like lm-eval's ``make_table`` (numbers right-aligned)."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells):
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"

    rule = "|" + "|".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def _shots(results: Mapping[str, Any], tasks: Iterable[str]) -> str:
    """The compared tasks' shots: one number when they agree, else per task."""
    n_shot = results.get("n-shot") or {}
    shots = {task: n_shot.get(task, "?") for task in sorted(tasks)}
    if len(set(map(str, shots.values()))) == 1:
        return f"{next(iter(shots.values()))}-shot"
    return "shots " + ", ".join(f"{task} {value}" for task, value in shots.items())


def _limit(results: Mapping[str, Any]) -> str:
    """The evaluation's --limit, from its eval_config (else lm-eval's config)."""
    limit = (results.get("eval_config") or {}).get("limit_requests", (results.get("config") or {}).get("limit"))
    return "no limit" if limit is None else f"limit {limit}"


def render_table(comparison: Comparison) -> str:
    """Markdown: a heading naming A and B (step, shots, limit), the table, and what was left out:
    tasks only one side holds, metrics that could not be compared."""
    tasks = sorted({row.task for row in comparison.rows} or
                   set(comparison.results_a.get("results") or {}) - {*comparison.only_a, *comparison.only_b})

    def described(directory: Path, results: Mapping[str, Any]) -> str:
        step = checkpoint_section(results).get("step")
        settings = ([f"step {step}"] if step is not None else []) + [_shots(results, tasks), _limit(results)]
        return f"`{directory}` ({'; '.join(settings)})"

    header = ["Tasks", "Filter", "Metric", "n", "A", "B", "B−A", f"{CONFIDENCE:.0%} CI", "p", "McNemar p"]
    body = [
        [r.task, r.filter, r.metric, str(r.n), _number(r.a), _number(r.b), _number(r.delta),
         f"[{_number(r.ci_low)}, {_number(r.ci_high)}]", _p(r.p_value), _p(r.mcnemar_p)]
        for r in comparison.rows
    ]
    lines = [
        f"A: {described(comparison.a_dir, comparison.results_a)}  ",
        f"B: {described(comparison.b_dir, comparison.results_b)}  ",
        f"paired bootstrap over documents: {comparison.iterations:,} iterations, seed {comparison.seed}",
        "",
        _markdown(header, body, right={3, 4, 5, 6, 8, 9}) if body else "(no metric could be compared)",
    ]
    dropped = [f"- {task}: only in {side}" for side, only in (("A", comparison.only_a), ("B", comparison.only_b))
               for task in only]
    if comparison.skipped or dropped:
        lines += ["", "Not compared:", *dropped, *(f"- {why}" for why in comparison.skipped)]
    return "\n".join(lines) + "\n"


def write_json(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Write the rows as a JSON list of {task, metric, filter, n, a, b, delta, ci_low, ci_high,
    p_value[, mcnemar_p]}."""
    path = Path(path)
    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(comparison.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def write_consecutive_comparisons(results_dirs_by_step: Mapping[int, Path], out_dir: Path, *,
                                  iterations: int = DEFAULT_ITERATIONS, seed: int = 0,
                                  strict: bool = True) -> list[Path]:
    """Compare each checkpoint with the previous one: ``compare_step_<a>_vs_<b>.md`` and ``.json``.

    ``results_dirs_by_step``: {step: results dir}; pairs are consecutive in step order.  With
    ``strict=False`` a pair that cannot be compared (no samples, different documents) is skipped
    with a warning instead of raising.  Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = sorted(results_dirs_by_step)
    written = []
    for step_a, step_b in itertools.pairwise(steps):
        try:
            comparison = compare(results_dirs_by_step[step_a], results_dirs_by_step[step_b], iterations, seed)
        except UserError as error:
            if strict:
                raise
            warnings.warn(f"not comparing step {step_a} with step {step_b}: {error}", stacklevel=2)
            continue
        stem = out_dir / f"compare_step_{step_a}_vs_{step_b}"
        markdown = stem.with_suffix(".md")
        markdown.write_text(render_table(comparison), encoding="utf-8")
        written += [markdown, write_json(comparison, stem.with_suffix(".json"))]
    return written


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def run_command(args) -> None:
    """``mlflow-lmeval compare``: print the table; optionally write JSON and publish."""
    comparison = compare(args.a, args.b, iterations=args.iterations, seed=args.seed)
    print(render_table(comparison), end="")
    if args.json:
        print(f"wrote {write_json(comparison, args.json)}")
    if args.publish:
        run_id = publish(comparison, getattr(args, "tracking_uri", None))
        print(f"logged {len(comparison.rows)} comparison(s) to MLflow run {run_id}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an ``add_subparsers()`` object; returns the new parser."""
    parser = subparsers.add_parser(
        "compare", help="paired significance of B - A per task and metric (needs --log_samples results)",
        description="Compare two results directories document by document: B - A with a 95% paired-bootstrap "
                    "CI, a p-value, and McNemar's test for 0/1 metrics.")
    parser.add_argument("a", help="baseline results directory (results.json + samples_<task>.jsonl)")
    parser.add_argument("b", help="results directory to compare against A")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    parser.add_argument("--iterations", type=positive_int, default=DEFAULT_ITERATIONS,
                        help=f"bootstrap iterations (default: {DEFAULT_ITERATIONS})")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--publish", action="store_true",
                        help="log the deltas, CIs and p-values onto B's MLflow evaluation run")
    parser.add_argument("--tracking_uri", help="for --publish (default: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db)")
    parser.set_defaults(func=run_command)
    return parser
