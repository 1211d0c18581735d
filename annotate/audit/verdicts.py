"""The verdict file DIR/verdicts.jsonl: one line per figure a reviewer finished, with every run's answer
to every aspect, the reviewer's name, a note and the UTC time:

    {"reviewer": "ana", "figure": "PMC1_fig2", "time": "2026-12-02T10:04:05.123Z", "note": "",
     "answers": {"heuristic": {"panels": "correct", "labels": "wrong", ...}, "qwen72b": {...}}}

A line is appended whole under an exclusive lock and fsynced before the page is told it is saved, so
two reviewers, two servers on one folder, or a crash lose no finished line. A reviewer who judges a
figure again appends a new line; the last one counts.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
from pathlib import Path

from annotate.audit import ANSWERS, ASPECTS

VERDICTS_FILE = "verdicts.jsonl"


class VerdictError(ValueError):
    """A verdict that does not fit the sample; the message is one sentence saying what is wrong."""


def check(verdict, sample: dict) -> dict:
    """The verdict if it fits the sample (its figure, its runs, every aspect answered), else VerdictError."""
    if not isinstance(verdict, dict):
        raise VerdictError(f"it is a JSON {type(verdict).__name__}, not an object")
    reviewer, figure, note = verdict.get("reviewer"), verdict.get("figure"), verdict.get("note", "")
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise VerdictError("it names no reviewer")
    if not isinstance(note, str):
        raise VerdictError("its note is not text")
    ids = {entry["id"] for entry in sample["figures"]}
    if not isinstance(figure, str) or figure not in ids:
        raise VerdictError(f"figure {figure!r} is not in this audit's sample")
    answers, runs = verdict.get("answers"), [run["name"] for run in sample["runs"]]
    if not isinstance(answers, dict) or sorted(answers) != sorted(runs):
        raise VerdictError(f"its answers for figure {figure!r} name the runs "
                           f"{sorted(answers) if isinstance(answers, dict) else answers!r}, not this audit's {runs}")
    for run, per_aspect in answers.items():
        if not isinstance(per_aspect, dict) or sorted(per_aspect) != sorted(ASPECTS) or \
                any(per_aspect[aspect] not in ANSWERS for aspect in ASPECTS):
            raise VerdictError(f"its answers for run {run!r} of figure {figure!r} are {per_aspect!r}, not one of "
                               f"{list(ANSWERS)} for each of {list(ASPECTS)}")
    return {"reviewer": reviewer.strip(), "figure": figure, "note": note,
            "answers": {run: {aspect: answers[run][aspect] for aspect in ASPECTS} for run in runs}}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def append(directory: str | Path, verdict: dict, sample: dict) -> dict:
    """Checks the verdict, stamps it with the time and appends it as one line; returns the line's object."""
    line = check(verdict, sample) | {"time": utc_now()}
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(Path(directory) / VERDICTS_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # O_APPEND alone keeps small writes whole on a local disk; the lock also covers long notes,
        # network file systems and the check of the last byte below.
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A line a crash cut short stays a line of its own (named by the report), not the start of this one.
            data = b"\n" + data
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    return line


def read(directory: str | Path, sample: dict) -> tuple[list[dict], list[str]]:
    """Every verdict of the file in order, and for each line that cannot be one a sentence naming it."""
    path = Path(directory) / VERDICTS_FILE
    if not path.exists():
        return [], []
    verdicts, problems = [], []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8").strip())
                time = item.get("time") if isinstance(item, dict) else None
                if not isinstance(time, str):
                    raise VerdictError("it has no time")
                verdicts.append(check(item, sample) | {"time": time, "line": number})
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(f"{path} line {number} is not JSON ({err}): skipped, fix or delete it")
            except VerdictError as err:
                problems.append(f"{path} line {number} is skipped: {err}; fix or delete it")
    return verdicts, problems


def finished(verdicts: list[dict], reviewer: str) -> set[str]:
    return {verdict["figure"] for verdict in verdicts if verdict["reviewer"] == reviewer.strip()}
