"""No text kills a shard: random unicode (lone surrogates, NUL and control characters, raw invalid
UTF-8, RTL, emoji, very long strings) in ids, captions and contexts goes through `annotate run`, and
every input id ends up exactly once across records and failures, also after a kill -9 and a rerun."""
import io
import json
import random
import signal
import subprocess
import sys
import tarfile
import unicodedata

import msgpack
import pytest

from annotate.backends import HeuristicBackend
from annotate.merge import merge
from annotate.run import run_shard
from annotate.synth import synthesize
from annotate.text import clean_text
from conftest import REPO
from zoomin_jax import records

_POOLS = [
    "abcdefghijklmnopqrstuvwxyz ABC 0123456789 .,;:()[]-'\"\\",
    [chr(c) for c in range(0xD800, 0xE000, 97)],  # lone surrogates, high and low
    [chr(c) for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))],  # NUL, C0 and C1 controls, \t \n \r
    "\u05d0\u05d1\u05d2 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u200f\u202e\u202c\u061c",  # RTL text and marks
    ["\U0001F600", "\U0001F9EC", "\U0001F468\u200D\U0001F52C", "\u2764\ufe0f", "\U0001F1FA\U0001F1F8"],
    ["\ufeff", "\ufffe", "\uffff", "\u0301", "\u2028", "\U0010FFFF", "\ufffd", "\u00e9"],
]
# Byte sequences that are not UTF-8: a lone byte, a truncated sequence, an encoded surrogate, past U+10FFFF.
_INVALID_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]
_BAD = "@BAD@"  # where a line's raw invalid bytes go once it is JSON


def odd(c: str) -> bool:
    """What no record may hold: a surrogate, or a control character but tab, newline and return."""
    return 0xD800 <= ord(c) <= 0xDFFF or (unicodedata.category(c) == "Cc" and c not in "\t\n\r")


def expected_id(figure_id: str) -> str:
    """The id a figure is accounted under: its odd characters as JSON writes them, \\uXXXX."""
    return "".join(f"\\u{ord(c):04x}" if odd(c) else c for c in figure_id)


def random_text(rng: random.Random, size: int) -> str:
    pieces = []
    while len(pieces) < size:
        pool = rng.choice(_POOLS)
        pieces += rng.choices(pool, k=rng.randint(1, 8))
    return "".join(pieces[:size])


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A manifest of 20 small synth figures and 4 missing ones with random ids, captions and contexts (a
    quarter of the lines with raw invalid UTF-8 bytes in id and caption; some captions 30k long) and a
    WebDataset tar whose sample names are not UTF-8: (inputs, input id -> whether its caption is odd)."""
    root = tmp_path_factory.mktemp("fuzz")
    data = synthesize(root / "synth", num=24, seed=9)
    rng = random.Random(16)
    lines, captions = [], {}
    for n, line in enumerate(map(json.loads, (data / "manifest.jsonl").read_text().splitlines())):
        bad = rng.choice(_INVALID_UTF8) if n % 4 == 0 else None
        figure_id = f"f{n:02d}-" + random_text(rng, rng.choice([3, 40, 2000])) + (_BAD if bad else "")
        caption = random_text(rng, 30_000 if n % 7 == 0 else rng.randint(0, 300))
        if bad:
            caption = line["caption"] + _BAD + caption
        context = [random_text(rng, rng.randint(0, 80)) for _ in range(rng.randint(0, 3))]
        image = f"synth/{line['image']}" if n < 20 else f"images/missing-{n}.png"  # the last 4 fail at read
        raw = json.dumps({"id": figure_id, "image": image, "caption": caption, "context": context}).encode()
        # As the reader gets them: JSON joins a high and a low surrogate escape into one character.
        figure_id, caption = json.loads(json.dumps([figure_id, caption]))
        if bad:
            raw = raw.replace(_BAD.encode(), bad)
            read_as = bad.decode("utf-8", "surrogateescape")  # what the reader makes of the bytes
            figure_id, caption = figure_id.replace(_BAD, read_as), caption.replace(_BAD, read_as)
        lines.append(raw)
        captions[expected_id(figure_id)] = any(map(odd, caption))
    (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    png = (data / "images" / "synth-9-00000.png").read_bytes()
    with tarfile.open(root / "shard.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for n, name in enumerate([b"t0-\xff\xfe", b"t1-\xd7\x90\xf0\x9f\x98\x80", b"t2-\xed\xa0\x80\x1b"]):
            key = name.decode("utf-8", "surrogateescape")  # as tarfile reads the member names back
            meta = json.dumps({"caption": random_text(rng, 200), "context": [random_text(rng, 50)]}).encode()
            for ext, content in (("png", png), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            captions[expected_id(key)] = any(map(odd, json.loads(meta)["caption"]))
    return [str(root / "manifest.jsonl"), str(root / "shard.tar")], captions


def accounted(out) -> list[str]:
    """The ids of the shard's records and failure lines (each line strict UTF-8 JSON)."""
    got = [r["figure_id"] for r in records.iter_records(sorted(out.glob("records-*.array_record")))]
    for path in out.glob("failures-*.jsonl"):
        got += [json.loads(line)["id"] for line in path.read_bytes().decode("utf-8").splitlines()]
    return got


def test_clean_text_leaves_nothing_odd_changes_only_what_was_and_escapes_reversibly():
    rng = random.Random(6)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 200))
        for escape in (False, True):
            clean, problems = clean_text(text, escape)
            assert not any(map(odd, clean)) and bool(problems) == any(map(odd, text))
            assert clean_text(clean, escape) == (clean, ())
            msgpack.packb(clean)  # what raised on a lone surrogate
            assert escape or len(clean) == len(text)  # replaced one for one
        if '"' not in text and "\\" not in text:  # an escaped id reads as the JSON that wrote the original
            assert json.loads(f'"{clean_text(text, escape=True)[0]}"', strict=False) == json.loads(json.dumps(text))


def test_random_unicode_through_annotate_run_accounts_every_id_once(tmp_path, fuzzed):
    inputs, odd_caption = fuzzed
    out = tmp_path / "out"

    summary = run_shard(inputs, out, HeuristicBackend(), batch_size=4, part_size=5)

    got = accounted(out)
    assert len(got) == len(set(got)) == 27 and set(got) == set(odd_caption)
    report = merge(out, inputs)
    assert report["complete"], report["problems"]
    assert summary["figures"] == 23 and summary["failures"] == 4
    noted = 0
    for record in records.iter_records(sorted((out).glob("records-*.array_record"))):
        assert not any(odd(c) for text in strings_in(record) for c in text), record["figure_id"]
        caption_noted = any(w.startswith("caption: text normalised") for w in record["annotation"]["warnings"])
        assert caption_noted == odd_caption[record["figure_id"]], record["figure_id"]
        noted += caption_noted
    assert noted >= 10 and summary["warnings_by_reason"]["caption: text normalised"] == noted
    assert summary["warnings_by_reason"]["figure_id: text normalised"] >= 10


KILLED_RUN = """
import json, os, signal, sys
from annotate.backends import HeuristicBackend
from annotate.run import run_shard

class KilledDuring(HeuristicBackend):
    calls = 0

    def propose(self, images, captions, contexts=None):
        self.calls += 1
        if self.calls == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().propose(images, captions, contexts)

inputs, out, settings = json.loads(sys.argv[1])
run_shard(inputs, out, KilledDuring(), **settings)
"""


def test_a_kill_9_mid_shard_of_odd_text_then_a_rerun_redoes_only_the_unfinished(tmp_path, fuzzed):
    inputs, odd_caption = fuzzed
    out, settings = tmp_path / "out", {"batch_size": 2, "part_size": 3}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.replace("KILL_AT", "7"),
                             json.dumps([inputs, str(out), settings])], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    parts = sorted(out.glob("parts-*/*.array_record"))
    recorded = [i for part in parts for i in records.load_index(part)["ids"]]
    failed = [json.loads(line)["id"] for line in (out / "failures-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(recorded) >= 9 and not (out / "summary-00000-of-00001.json").exists()

    summary = run_shard(inputs, out, HeuristicBackend(), **settings)

    got = accounted(out)
    assert len(got) == len(set(got)) == 27 and set(got) == set(odd_caption)
    assert summary["resumed_with_done"] == len(recorded) + len(failed)
    assert summary["figures_this_run"] == summary["figures"] - len(recorded) == 23 - len(recorded)
    assert not list(out.glob("parts-*")) and not list(out.rglob("*.partial"))
