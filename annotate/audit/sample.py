"""`audit sample`: a seeded sample of the figures that every run annotated, stratified, with each run's
records of those figures copied into the audit folder (so the page and the report need nothing else).

Strata: the panel count of the first run (buckets 1, 2, 3-4, 5-8, 9+), the figure's source (the input
file it came from, digits folded so that the shards of one collection are one source), and whether its
caption names several panels (the rule-based split: compound) or not (single). The caption decides
single vs compound, not a run, so that the stratum is the same whatever run is judged. Allocation is
proportional (largest remainders), so the sample's plain share estimates the population's and no
weights are needed; the figures are listed in a seeded random order, so that a review stopped early
still covers the strata in proportion.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from annotate.captions import split_caption
from zoomin_jax import records
from zoomin_jax.errors import UserError

SAMPLE_FILE = "sample.json"
RUNS_DIR = "runs"
_BUCKETS = ((1, "1"), (2, "2"), (4, "3-4"), (8, "5-8"))


def panel_bucket(count: int) -> str:
    for top, name in _BUCKETS:
        if count <= top:
            return name
    return "9+"


def source_name(source: str) -> str:
    """'…/pmc-000123.tar:PMC1_fig2' and '…/manifest.jsonl:17' -> 'pmc-#.tar', 'manifest.jsonl'."""
    path = re.sub(r":[^/]*$", "", source)
    return re.sub(r"\d+", "#", Path(path).name) or "unknown"


def stratum(record: dict) -> dict:
    labelled = [panel for panel in split_caption(record["caption"]) if panel["label"]]
    return {"panels": panel_bucket(len(record["panels"])), "source": source_name(record["source"]),
            "kind": "compound" if len(labelled) > 1 else "single"}


def record_files(directory: str | Path) -> list[Path]:
    """The records files of an `annotate run` folder; UserError when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder: give --records the --out folder of an `annotate run`")
    files = sorted(directory.glob("records-*.array_record"))
    if not files:
        raise UserError(f"{directory} holds no records-*.array_record files: give --records the --out folder "
                        "of an `annotate run` (after `annotate merge` for a fanned-out run)")
    return files


def run_ids(files: list[Path]) -> set[str]:
    """The figure ids of a run, from the shard indexes where they are current (a few bytes a figure),
    else from the records."""
    ids: set[str] = set()
    for path in files:
        try:
            ids.update(records.load_index(path)["ids"])
        except records.RecordError:
            ids.update(record["figure_id"] for record in records.iter_records(path))
    return ids


def parse_runs(specs: list[str]) -> list[tuple[str, Path]]:
    """--records [NAME=]DIR, NAME defaulting to the folder's name; names must differ."""
    runs = []
    for spec in specs:
        name, _, directory = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
            raise UserError(f"run name {name!r} (from --records {spec}) must be letters, digits, '.', '_' or '-': "
                            "name it with --records NAME=DIR")
        runs.append((name, Path(directory)))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise UserError(f"two runs are named alike ({', '.join(names)}): name them with --records NAME=DIR")
    return runs


def allocate(sizes: dict, n: int) -> dict:
    """n split over strata in proportion to their sizes, largest remainders first (ties by name)."""
    total = sum(sizes.values())
    quotas = {key: n * size / total for key, size in sizes.items()}
    counts = {key: int(quota) for key, quota in quotas.items()}
    for key in sorted(sizes, key=lambda k: (counts[k] - quotas[k], k))[:n - sum(counts.values())]:
        counts[key] += 1
    return counts


def draw(strata: dict[str, dict], n: int, seed: int) -> tuple[list[str], list[dict]]:
    """n of the ids (id -> stratum), proportional per stratum, in a seeded random order; and per stratum
    its figures in the population and in the sample."""
    groups: dict[tuple, list[str]] = {}
    for figure_id in sorted(strata):
        groups.setdefault(tuple(sorted(strata[figure_id].items())), []).append(figure_id)
    rng = random.Random(seed)
    chosen, table = [], []
    for key, count in allocate({key: len(ids) for key, ids in groups.items()}, n).items():
        chosen += rng.sample(groups[key], count)
        table.append({"stratum": dict(key), "population": len(groups[key]), "sample": count})
    rng.shuffle(chosen)
    return chosen, table


def make_sample(specs: list[str], n: int, seed: int, out: str | Path) -> Path:
    runs, out = parse_runs(specs), Path(out)
    if (out / SAMPLE_FILE).exists():
        raise UserError(f"{out / SAMPLE_FILE} exists: a new sample would orphan its verdicts; give another --out")
    if n < 1:
        raise UserError(f"--n {n} asks for no figures: give a sample size of 1 or more")
    files = {name: record_files(directory) for name, directory in runs}
    common = set.intersection(*(run_ids(paths) for paths in files.values()))
    if n > len(common):
        holders = "the run holds" if len(runs) == 1 else f"all {len(runs)} runs hold"
        raise UserError(f"a sample of {n} is larger than the {len(common)} figures {holders}: "
                        f"ask for --n {len(common)} or fewer")
    first = runs[0][0]
    strata = {record["figure_id"]: stratum(record) for record in records.iter_records(files[first])
              if record["figure_id"] in common}
    chosen, table = draw(strata, n, seed)
    wanted = set(chosen)
    for name, paths in files.items():
        seen = set()
        with records.RecordWriter(out / RUNS_DIR / name / "records-00000-of-00001.array_record") as writer:
            for record in records.iter_records(paths):
                # A fan-out merged by hand may hold an id twice; the first is the one judged.
                if record["figure_id"] in wanted and record["figure_id"] not in seen:
                    seen.add(record["figure_id"])
                    writer.write(record)
    sample = {"seed": seed, "n": n, "strata_from": first,
              "runs": [{"name": name, "records": str(directory.resolve())} for name, directory in runs],
              "population": len(common), "strata": table,
              "figures": [{"id": figure_id, "stratum": strata[figure_id]} for figure_id in chosen]}
    (out / SAMPLE_FILE).write_text(json.dumps(sample, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out / SAMPLE_FILE


def load_sample(directory: str | Path) -> dict:
    """DIR/sample.json; UserError when DIR is not an audit folder."""
    path = Path(directory) / SAMPLE_FILE
    if not path.is_file():
        raise UserError(f"{directory} has no {SAMPLE_FILE}: make it with `python -m annotate audit sample "
                        f"--records DIR --n N --seed S --out {directory}`")
    return json.loads(path.read_text(encoding="utf-8"))
