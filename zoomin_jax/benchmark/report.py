"""The benchmark's results as JSON and as one Markdown table: a column per model, then each later
model's difference from the first, every value with its 95% bootstrap interval."""
from __future__ import annotations

from zoomin_jax.benchmark.stats import Interval


def _cell(interval: Interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{interval.value:{sign}.3f} ({interval.low:{sign}.3f}, {interval.high:{sign}.3f})"


def markdown(results: dict) -> str:
    labels = list(results["models"])
    header = ["task", "metric", "n", *labels, *(f"{label} − {labels[0]}" for label in labels[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, task in results["tasks"].items():
        if task["status"] != "ok":
            continue
        for metric, entry in task["metrics"].items():
            own = [_cell(Interval(entry["models"][label]["value"], *entry["models"][label]["ci95"])) for label in labels]
            diffs = [_cell(Interval(entry["diff"][label]["value"], *entry["diff"][label]["ci95"]), signed=True)
                     for label in labels[1:]]
            lines.append("| " + " | ".join([name, metric, str(entry["n"]), *own, *diffs]) + " |")
    skipped = [f"- {name}: {task['reason']}" for name, task in results["tasks"].items() if task["status"] != "ok"]
    note = (f"\nValues with 95% bootstrap intervals ({results['bootstrap']} resamples of each metric's units; "
            f"differences paired on the same resamples).")
    return "\n".join(lines) + note + ("\n\nSkipped:\n" + "\n".join(skipped) if skipped else "") + "\n"
