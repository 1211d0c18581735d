"""`audit report`: what the verdicts say about each run, as DIR/report/report.md and report.json, and the
figures judged wrong as a gallery (DIR/report/wrong/index.html).

Rules, also written at the top of the report: the share correct is correct / (correct + wrong), "unsure"
answers counted apart and left out of the denominator (an unsure answer says nothing about the run);
intervals are 95% Wilson score intervals. A reviewer's last line for a figure replaces their earlier
ones. Each figure counts once in the shares and the differences: with the verdict of its first
reviewer (whose first line for it comes first in the file); a second reviewer's verdicts only measure
agreement (Cohen's kappa over the three answers, the figure's first two reviewers as the two raters).
The difference of two runs is paired on the figures where both got correct or wrong for that aspect,
with Newcombe's method 10 interval.
"""
from __future__ import annotations

import html
import itertools
import json
import shutil
from pathlib import Path

from annotate.audit import ANSWERS, ASPECTS, verdicts
from annotate.audit.sample import RUNS_DIR, load_sample
from annotate.audit.stats import cohen_kappa, newcombe_paired, wilson
from annotate.gallery import overlay, safe_name
from zoomin_jax import records

REPORT_DIR = "report"
STRATA = ("panels", "kind", "source")
RULES = ("Share correct = correct / (correct + wrong); 'unsure' answers are counted apart and left out of the "
         "denominator. Intervals: 95% Wilson score intervals. A reviewer's last line for a figure replaces their "
         "earlier ones. Each figure counts once, with its first reviewer's verdict; other reviewers' verdicts only "
         "measure agreement (Cohen's kappa over correct/wrong/unsure, the figure's first two reviewers as the two "
         "raters). Differences between two runs are paired on the figures where both runs got correct or wrong "
         "for that aspect; interval: Newcombe's method 10 (1998, hybrid score, no continuity correction).")


def share(answers: list[str]) -> dict:
    counts = {answer: answers.count(answer) for answer in ANSWERS}
    judged = counts["correct"] + counts["wrong"]
    interval = wilson(counts["correct"], judged)
    return counts | {"share": counts["correct"] / judged if judged else None,
                     "ci95": list(interval) if interval else None}


def reviewers_of(lines: list[dict]) -> dict[str, dict[str, dict]]:
    """figure -> {reviewer: their last verdict}, reviewers in the order of their first line for it."""
    by_figure: dict[str, dict[str, dict]] = {}
    for verdict in lines:
        # Assigning to a key already there keeps its place: a reviewer stays where their first line put them.
        by_figure.setdefault(verdict["figure"], {})[verdict["reviewer"]] = verdict
    return by_figure


def summarise(sample: dict, lines: list[dict]) -> dict:
    runs = [run["name"] for run in sample["runs"]]
    strata = {entry["id"]: entry["stratum"] for entry in sample["figures"]}
    by_figure = reviewers_of(lines)
    primary = {figure: next(iter(judged.values())) for figure, judged in by_figure.items()}
    shares = {run: {aspect: share([v["answers"][run][aspect] for v in primary.values()]) for aspect in ASPECTS}
              for run in runs}
    by_stratum = {
        run: {aspect: {dimension: {value: share([v["answers"][run][aspect] for figure, v in primary.items()
                                                  if strata[figure][dimension] == value])
                                   for value in sorted({strata[figure][dimension] for figure in primary})}
                       for dimension in STRATA} for aspect in ASPECTS} for run in runs}
    differences = []
    for first, second in itertools.combinations(runs, 2):
        for aspect in ASPECTS:
            table = {"both": 0, "first_only": 0, "second_only": 0, "neither": 0}
            for verdict in primary.values():
                a, b = verdict["answers"][first][aspect], verdict["answers"][second][aspect]
                if "unsure" in (a, b):
                    continue
                key = {(True, True): "both", (True, False): "first_only", (False, True): "second_only",
                       (False, False): "neither"}[(a == "correct", b == "correct")]
                table[key] += 1
            result = newcombe_paired(**table)
            differences.append({"first": first, "second": second, "aspect": aspect, "figures": sum(table.values()),
                                **table, "difference": result[0] if result else None,
                                "ci95": list(result[1]) if result else None})
    twice = {figure: list(judged.values())[:2] for figure, judged in by_figure.items() if len(judged) > 1}
    agreement = {}
    for run in runs:
        agreement[run] = {}
        for aspect in ASPECTS:
            pairs = [(one["answers"][run][aspect], two["answers"][run][aspect]) for one, two in twice.values()]
            agreement[run][aspect] = {"figures": len(pairs),
                                      "agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None,
                                      "kappa": cohen_kappa(pairs)}
    wrong = [{"figure": figure, "reviewer": verdict["reviewer"], "note": verdict["note"], "time": verdict["time"],
              "wrong": {run: [aspect for aspect in ASPECTS if verdict["answers"][run][aspect] == "wrong"]
                        for run in runs}}
             for figure, judged in by_figure.items() for verdict in judged.values()
             if any(answer == "wrong" for answers in verdict["answers"].values() for answer in answers.values())]
    return {"rules": RULES, "runs": runs, "sample": {"n": sample["n"], "seed": sample["seed"],
                                                     "population": sample["population"]},
            "verdict_lines": len(lines), "reviewers": sorted({v["reviewer"] for v in lines}),
            "figures_judged": len(primary), "figures_judged_twice": len(twice),
            "shares": shares, "by_stratum": by_stratum, "differences": differences, "agreement": agreement,
            "judged_wrong": wrong}


def _number(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(bounds) -> str:
    return "—" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _share_row(cells: list[str], result: dict) -> str:
    return "| " + " | ".join(cells + [str(result["correct"]), str(result["wrong"]), str(result["unsure"]),
                                      _number(result["share"]), _interval(result["ci95"])]) + " |"


def markdown(summary: dict, directory: Path, skipped: list[str]) -> str:
    s = summary
    out = [f"# Audit report: {directory}", "",
           f"Sample: {s['sample']['n']} of the {s['sample']['population']} figures all runs hold (seed "
           f"{s['sample']['seed']}); runs {', '.join(s['runs'])}. Verdicts: {s['verdict_lines']} lines from "
           f"{len(s['reviewers'])} reviewer(s) ({', '.join(s['reviewers']) or 'none'}); {s['figures_judged']} "
           f"figures judged, {s['figures_judged_twice']} of them twice.", "", s["rules"], "",
           "## Share correct per run and aspect", "",
           "| run | aspect | correct | wrong | unsure | share | 95% CI |", "|---|---|---|---|---|---|---|"]
    out += [_share_row([run, aspect], s["shares"][run][aspect]) for run in s["runs"] for aspect in ASPECTS]
    out += ["", "## By stratum", "",
            "| run | aspect | stratum | correct | wrong | unsure | share | 95% CI |",
            "|---|---|---|---|---|---|---|---|"]
    out += [_share_row([run, aspect, f"{dimension} = {value}"], result)
            for run in s["runs"] for aspect in ASPECTS
            for dimension, values in s["by_stratum"][run][aspect].items() for value, result in values.items()]
    out += ["", "## Paired differences (first run minus second)", "",
            "| first | second | aspect | figures | both correct | first only | second only | neither | difference "
            "| 95% CI |", "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {d['first']} | {d['second']} | {d['aspect']} | {d['figures']} | {d['both']} | {d['first_only']} | "
            f"{d['second_only']} | {d['neither']} | {_number(d['difference'])} | {_interval(d['ci95'])} |"
            for d in s["differences"]]
    if not s["differences"]:
        out += ["", "One run: nothing to compare."]
    out += ["", "## Agreement between reviewers", "",
            f"{s['figures_judged_twice']} figure(s) judged by two reviewers or more.", "",
            "| run | aspect | figures | observed agreement | Cohen's kappa |", "|---|---|---|---|---|"]
    out += [f"| {run} | {aspect} | {a['figures']} | {_number(a['agreement'])} | {_number(a['kappa'])} |"
            for run in s["runs"] for aspect, a in s["agreement"][run].items()]
    out += ["", "## Figures judged wrong", "",
            f"{len({w['figure'] for w in s['judged_wrong']})} figure(s), in [wrong/index.html](wrong/index.html)."]
    out += ["", "## Skipped verdict lines", ""] + ([f"- {problem}" for problem in skipped] or ["None."])
    return "\n".join(out) + "\n"


def wrong_gallery(directory: Path, summary: dict, out: Path) -> Path:
    """One overlay per run of each figure some reviewer judged wrong, with what was wrong and the notes."""
    shutil.rmtree(out, ignore_errors=True)  # a figure judged right since the last report leaves no picture behind
    out.mkdir(parents=True)
    wanted = {w["figure"] for w in summary["judged_wrong"]}
    images = {}
    for run in summary["runs"]:
        for record in records.iter_records(sorted((directory / RUNS_DIR / run).glob("records-*.array_record"))):
            if record["figure_id"] in wanted:
                name = f"{run}-{safe_name(record['figure_id'])}"
                overlay(record).save(out / name)
                images[(run, record["figure_id"])] = (name, record["caption"])
    sections = []
    for figure in sorted(wanted):
        verdicts_of = [w for w in summary["judged_wrong"] if w["figure"] == figure]
        said = "".join(f"<li>{html.escape(w['reviewer'])} ({html.escape(w['time'])}): "
                       + "; ".join(f"{html.escape(run)}: {html.escape(', '.join(aspects))}"
                                   for run, aspects in w["wrong"].items() if aspects)
                       + (f" — <i>{html.escape(w['note'])}</i>" if w["note"] else "") + "</li>" for w in verdicts_of)
        columns = "".join(f"<figure><img src=\"{html.escape(images[(run, figure)][0])}\"><figcaption>"
                          f"{html.escape(run)}</figcaption></figure>" for run in summary["runs"])
        caption = images[(summary["runs"][0], figure)][1]
        sections.append(f"<section><h2>{html.escape(figure)}</h2><div class=\"runs\">{columns}</div>"
                        f"<p>{html.escape(caption)}</p><ul>{said}</ul></section>")
    page = ("<!doctype html><meta charset=\"utf-8\"><title>Figures judged wrong</title><style>"
            ".runs{display:flex;gap:1em} figure{flex:1;margin:0} img{max-width:100%} "
            "section{border-bottom:1px solid #ccc}</style>"
            f"<h1>Figures judged wrong ({len(wanted)})</h1>" + "".join(sections))
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def write_report(directory: str | Path) -> tuple[Path, list[str]]:
    """The report files; returns the Markdown's path and the verdict lines that were skipped."""
    directory = Path(directory)
    sample = load_sample(directory)
    lines, skipped = verdicts.read(directory, sample)
    summary = summarise(sample, lines) | {"skipped_lines": skipped}
    out = directory / REPORT_DIR
    wrong_gallery(directory, summary, out / "wrong")
    (out / "report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(summary, directory, skipped), encoding="utf-8")
    return out / "report.md", skipped
