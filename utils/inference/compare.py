"""One table of the sample-quality scores of several runs, refused when they were measured in different spaces:

    python -m utils.inference.compare runs/a runs/b runs/c/eval.json [--metric quality|recon_quality]

Each argument is a run folder (its eval.json) or an eval.json written with ``evaluate.py --out``. The scores of
``--metrics quality`` and ``recon_quality`` are distances in one feature network's space (utils/evaluation/
features.py); numbers of two networks are not on one scale, so a table that would set them side by side is
refused in one line, naming both networks. Loads no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.errors import CliParser, UserError, guarded_main

QUALITY = ("quality", "recon_quality")
# (column, how a score entry prints in it)
COLUMNS = (("FD", lambda q: f"{q['fd']:.4g}"),
           ("KID", lambda q: f"{q['kid_mean']:.4g} ± {q['kid_sd']:.2g}"),
           ("precision", lambda q: f"{q['precision']:.3f}"),
           ("recall", lambda q: f"{q['recall']:.3f}"),
           ("density", lambda q: f"{q['density']:.3f}"),
           ("coverage", lambda q: f"{q['coverage']:.3f}"),
           ("two-sample accuracy", lambda q: f"{q['c2st_accuracy']:.3f}"))


def read_scores(path: str | Path, metric: str = "quality") -> dict:
    """The ``metric`` entry of a run's eval.json (or of the JSON file given); one line when there is none."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file} does not exist: give a run folder evaluated with evaluate.py --metrics {metric}, "
                        f"or the JSON file its --out wrote") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not an eval.json ({e}): give the file evaluate.py wrote") from None
    if not isinstance(results, dict) or not isinstance(results.get(metric), dict):
        raise UserError(f"{file} has no {metric} scores: run python evaluate.py --exp_dir RUN --metrics {metric} "
                        f"first")
    return results[metric]


def same_space(entries: list[tuple[str, dict]]) -> str:
    """The one feature network all entries were measured in; a one-line refusal when there are two."""
    first_label, first = entries[0]
    for label, entry in entries[1:]:
        if entry["features"] != first["features"]:
            raise UserError(f"{first_label} was measured in {first['features']} and {label} in {entry['features']}: "
                            f"scores of two feature networks are not on one scale; evaluate both with the same "
                            f"--features FILE")
    return first["features"]


def quality_table(entries: list[tuple[str, dict]], first_column: str = "run") -> str:
    """A markdown table, one row per (label, scores) entry, after a line naming the shared feature network."""
    if not entries:
        raise UserError("nothing to compare: give at least one run folder or eval.json")
    space = same_space(entries)
    rows = [f"| {first_column} | {' | '.join(c for c, _ in COLUMNS)} |", "| --- " * (len(COLUMNS) + 1) + "|"]
    rows += [f"| {label} | {' | '.join(cell(q) for _, cell in COLUMNS)} |" for label, q in entries]
    return f"in the features of {space}:\n\n" + "\n".join(rows)


def label(path: str, scores: dict) -> str:
    """A run's row name: its folder (or file), and the sampler its samples came from."""
    p = Path(path)
    name = p.parent.name if p.name == "eval.json" else p.name
    return f"{name} ({scores['sampler']})" if "sampler" in scores else name


def main(argv: list[str] | None = None) -> None:
    p = CliParser(prog="utils.inference.compare", description="One table of several runs' sample-quality scores, "
                  "refused when they come from different feature networks.")
    p.add_argument("runs", nargs="+", help="run folders or eval.json files")
    p.add_argument("--metric", choices=QUALITY, default="quality", help="samples (quality) or reconstructions")
    args = p.parse_args(argv)
    scores = [read_scores(r, args.metric) for r in args.runs]
    print(quality_table([(label(r, s), s) for r, s in zip(args.runs, scores, strict=True)]))


if __name__ == "__main__":
    guarded_main(main)
