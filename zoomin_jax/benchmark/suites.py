"""Benchmark tasks and suites: what data a task reads, where it lies under the data root, and where a
user gets it.

A task is zero-shot classification (`zeroshot`: a MedMNIST npz, class folders, a TFDS dataset or a CSV
of path,label), image<->text retrieval (`retrieval`: JSONL of image and caption, or WebDataset tar
shards) or Panel2Patch retrieval at figure, panel and region level (`panel2patch`: annotated records).
A suite is a list of tasks: a built-in one (SUITES) or a JSON file {"tasks": [{...}, ...]} whose
entries are Task fields; an entry named like a built-in task starts from it (its prompts, layout) and
overrides what it sets.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from zoomin_jax import zeroshot
from zoomin_jax.errors import UserError

FORMATS = {"zeroshot": ("npz", "folder", "tfds", "csv"), "retrieval": ("jsonl", "wds"), "panel2patch": ("records",)}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                       # a key of FORMATS
    format: str                     # one of FORMATS[kind]
    path: str                       # under the data root (or absolute): file, folder, glob or TFDS data_dir
    get: str = ""                   # where a user gets the data and how to lay it out (printed when missing)
    split: str = "test"             # npz and TFDS splits
    dataset: str = ""               # the TFDS dataset name
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    multilabel: bool = False
    image: str = "{image}"          # JSONL: the image path (relative to the JSONL's folder), a format of the row
    caption: str = "{caption}"      # JSONL: the caption, a format of the row
    limit: int = 0                  # the first `limit` examples only (0: all)

    def location(self, data_root: Path) -> Path:
        return data_root / self.path


def _medmnist(name: str) -> Task:
    prompts = zeroshot.TASKS[name]
    return Task(name=name, kind="zeroshot", format="npz", path=f"medmnist/{name}.npz",
                classnames=prompts.classnames, templates=prompts.templates, multilabel=prompts.multilabel,
                get=f"MedMNIST (CC BY 4.0, https://medmnist.com): `pip install medmnist && python -m medmnist "
                    f"download` writes {name}.npz (28 px; {name}_224.npz for 224 px: set path); put it at "
                    f"DATA_ROOT/medmnist/{name}.npz")


_HISTOLOGY = ("an H&E stained histology image of {}.", "a histopathology patch showing {}.",
              "a medical image of {}.", "{}")

BUILTIN_TASKS = {task.name: task for task in [
    *(_medmnist(name) for name in zeroshot.TASKS),
    Task(name="pcam", kind="zeroshot", format="tfds", dataset="patch_camelyon", path="tfds",
         classnames=("normal lymph node tissue", "metastatic breast cancer in a lymph node"), templates=_HISTOLOGY,
         get="PatchCamelyon (CC0) through TFDS: `tfds build patch_camelyon --file_format=array_record "
             "--data_dir DATA_ROOT/tfds`"),
    Task(name="nct_crc_he", kind="zeroshot", format="folder", path="nct-crc-he/CRC-VAL-HE-7K",
         classnames=("adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                     "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
         templates=_HISTOLOGY,
         get="NCT-CRC-HE (Kather et al., CC BY 4.0): https://zenodo.org/records/1214456 CRC-VAL-HE-7K.zip, "
             "unzipped as DATA_ROOT/nct-crc-he/CRC-VAL-HE-7K/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/*.tif"),
    Task(name="lc25000", kind="zeroshot", format="folder", path="lc25000",
         classnames=("colon adenocarcinoma", "benign colon tissue", "lung adenocarcinoma", "benign lung tissue",
                     "lung squamous cell carcinoma"), templates=_HISTOLOGY,
         get="LC25000 (Borkowski et al.): https://github.com/tampapath/lung_colon_image_set, its five class "
             "folders as DATA_ROOT/lc25000/{colon_aca,colon_n,lung_aca,lung_n,lung_scc}/*.jpeg"),
    Task(name="roco_test", kind="retrieval", format="jsonl", path="roco/test.jsonl",
         get="ROCO (https://github.com/razorx89/roco-dataset): its radiology test images and captions as "
             "DATA_ROOT/roco/test.jsonl, one {\"image\": \"images/NAME.jpg\", \"caption\": ...} a line"),
    Task(name="medicat", kind="retrieval", format="jsonl", path="medicat/sample.jsonl",
         image="{pdf_hash}_{fig_uri}", caption="{s2_caption}",
         get="MedICaT (https://github.com/allenai/medicat, by request): its JSONL as DATA_ROOT/medicat/"
             "sample.jsonl with the figures PDFHASH_FIGURI.png beside it"),
    Task(name="pmc_oa_test", kind="retrieval", format="jsonl", path="pmc_oa/test.jsonl", image="images/{image}",
         get="PMC-OA (https://huggingface.co/datasets/axiong/pmc_oa): test.jsonl and images/ as DATA_ROOT/pmc_oa/"),
    Task(name="panel2patch_heldout", kind="panel2patch", format="records", path="panel2patch/records-*.array_record",
         get="held-out figures annotated by `python -m annotate run` (not trained on), as "
             "DATA_ROOT/panel2patch/records-*.array_record"),
]}

SUITES = {
    # The public biomedical benchmarks of the BMC-CLIP / BIOMEDICA line of work that can be laid out
    # from public downloads, and our own three-level retrieval.
    "biomedical": tuple(BUILTIN_TASKS),
    "medmnist": tuple(zeroshot.TASKS),
}


def _task(entry: dict, where: str) -> Task:
    if not isinstance(entry, dict) or "name" not in entry:
        raise UserError(f"{where}: each task must be a JSON object with a 'name'; got {entry!r:.80}")
    fields = {field.name for field in dataclasses.fields(Task)}
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise UserError(f"{where}: task {entry['name']!r} has unknown key {unknown[0]!r}; keys are {', '.join(sorted(fields))}")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in entry.items()}
    base = BUILTIN_TASKS.get(entry["name"])
    try:
        task = dataclasses.replace(base, **values) if base else Task(**values)
    except TypeError as err:
        raise UserError(f"{where}: task {entry['name']!r} is missing a field ({err}); give kind, format and path") from None
    if task.kind not in FORMATS or task.format not in FORMATS[task.kind]:
        raise UserError(f"{where}: task {task.name!r} has kind {task.kind!r} and format {task.format!r}; "
                        f"use one of {json.dumps(FORMATS)}")
    if task.kind == "zeroshot" and not (task.classnames and task.templates):
        raise UserError(f"{where}: zero-shot task {task.name!r} needs classnames and templates")
    return task


def load_suite(name_or_path: str) -> tuple[str, list[Task]]:
    """(the suite's name, its tasks): a key of SUITES or a JSON file."""
    if name_or_path in SUITES:
        return name_or_path, [BUILTIN_TASKS[name] for name in SUITES[name_or_path]]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"--suite {name_or_path}: not a built-in suite ({', '.join(SUITES)}) nor a JSON file")
    try:
        entries = json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a suite: it must be a JSON object with a list 'tasks' ({err})") from None
    tasks = [_task(entry, str(path)) for entry in entries]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: task names must be unique; {sorted({n for n in names if names.count(n) > 1})[0]!r} repeats")
    return path.stem, tasks
