"""Reading figures from manifests, WebDataset tars and real PMC JATS articles; bad input is recorded."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from annotate.inputs import FILE_STAGE, Figure, InputFailure, expand_inputs, iter_inputs
from annotate.text import CONTROLS, SURROGATES
from conftest import DATA


def png_bytes(size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_real_jats_articles(tmp_path):
    articles = sorted((DATA / "jats").glob("*.nxml"))
    for article in articles:
        shutil.copy(article, tmp_path)
    shutil.copy(DATA / "jats" / "pone.0000217.nxml", tmp_path)
    (tmp_path / "pone.0000217.g001.tif").write_bytes(png_bytes())
    figures = list(iter_inputs(sorted(tmp_path.glob("*.nxml"))))
    assert all(isinstance(f, Figure) for f in figures) and len(figures) == 17
    fig1 = next(f for f in figures if f.figure_id.endswith("pone-0000217-g001"))
    assert fig1.caption.startswith("Fisher's geometric model in two-dimensional phenotypic space.")
    assert fig1.context and all("Fig. 1" in c or "Figure 1" in c for c in fig1.context)
    assert fig1.read_image_bytes() == png_bytes()
    assert sum(f.image_path is None for f in figures) == 16  # their image files are not shipped
    assert len({f.figure_id for f in figures}) == 17


def test_a_jats_article_with_bytes_that_are_not_utf8_keeps_its_figures(tmp_path):
    """Scraped articles hold stray bytes (0xff, a Latin-1 0xe9) and control characters that no XML
    parser takes: the article is read with them replaced, and its figure says so."""
    data = (DATA / "jats" / "pone.0000217.nxml").read_bytes()
    start = data.index(b"<caption>") + len(b"<caption>")
    (tmp_path / "bad.nxml").write_bytes(data[:start] + b"caf\xe9 \xff\x01" + data[start:])
    figures = list(iter_inputs([tmp_path / "bad.nxml"]))
    assert len(figures) == 3 and all(isinstance(f, Figure) for f in figures)  # as read without the bytes
    assert figures[0].caption.startswith("caf\ufffd \ufffd Fisher's geometric model")
    assert all(f.notes == [f"article: text normalised: {SURROGATES} and {CONTROLS} replaced"] for f in figures)
    (tmp_path / "cut.nxml").write_bytes(data[:start] + b"\xff")  # still not XML once replaced
    (failure,) = iter_inputs([tmp_path / "cut.nxml"])
    assert isinstance(failure, InputFailure) and failure.stage == FILE_STAGE and "JATS XML unreadable" in failure.reason


def test_manifest_lines_and_failures(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    lines = [json.dumps({"id": "a", "image": "img/a.png", "caption": "(A) x. (B) y.", "context": ["see Fig. 1"]}),
             "{broken", json.dumps({"id": "b", "caption": "no image key"}),
             json.dumps({"id": "c", "image": "img/missing.png", "caption": ""})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    items = list(iter_inputs([tmp_path / "m.jsonl"]))
    assert [type(i).__name__ for i in items] == ["Figure", "InputFailure", "InputFailure", "Figure"]
    assert items[0].read_image_bytes() == png_bytes() and items[0].context == ["see Fig. 1"]
    assert "no 'image' path" in items[2].reason and items[1].figure_id.endswith("m.jsonl:2")


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_with_unsafe_and_broken_members(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "PMC1_fig1.jpg", png_bytes())
        add(tar, "PMC1_fig1.json", json.dumps({"image_caption": "(a) Chest CT. (b) MRI.", "license": "CC BY",
                                               "image_context": ["as in Figure 1"]}).encode())
        add(tar, "../evil.jpg", png_bytes())
        add(tar, "PMC2_fig3.png", png_bytes())
        add(tar, "PMC2_fig3.json", b"\xff not json")
        add(tar, "PMC3_fig1.json", b"{}")
    items = list(iter_inputs([path]))
    kinds = [(type(i).__name__, i.figure_id) for i in items]
    # A refused member is reported at once; a sample when its last member has been read.
    assert kinds == [("InputFailure", "../evil.jpg"), ("Figure", "PMC1_fig1"), ("InputFailure", "PMC2_fig3"),
                     ("InputFailure", "PMC3_fig1")]
    assert items[1].caption == "(a) Chest CT. (b) MRI." and items[1].license == "CC BY"
    assert items[1].context == ["as in Figure 1"] and items[1].read_image_bytes() == png_bytes()
    assert "escapes the archive" in items[0].reason and "no image member" in items[3].reason
    assert "sample JSON unreadable" in items[2].reason


def test_unreadable_tar_keeps_what_was_read(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "k1.png", png_bytes())
        add(tar, "k1.json", b'{"caption": "ok"}')
        add(tar, "k2.png", png_bytes((400, 400)) * 20)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    items = list(iter_inputs([path, tmp_path / "nope.tar", tmp_path / "notes.txt"]))
    assert isinstance(items[0], Figure) and items[0].figure_id == "k1"
    assert isinstance(items[1], InputFailure) and "tar unreadable from sample 'k2' on" in items[1].reason
    assert "does not exist" in items[2].reason and "does not exist" in items[3].reason
    # Whole-file failures, named by the file: they stand for figures no one can name.
    assert [(i.figure_id, i.stage) for i in items[1:]] == [(str(p), FILE_STAGE) for p in
                                                          (path, tmp_path / "nope.tar", tmp_path / "notes.txt")]


def test_lists_and_directories_expand_to_files_each_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tars/b/2.tar", "tars/a/1.tar", "tars/a/notes.txt", "tars/c.jsonl", "arts/x.nxml", "arts/y.xml.bak"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text("")
    Path("list.txt").write_text("arts/x.nxml\n\n  gone.nxml  \ntars/c.jsonl\narts\n")
    assert expand_inputs(["tars", "@list.txt", "tars/a/1.tar"]) == [
        "tars/a/1.tar", "tars/b/2.tar", "tars/c.jsonl", "arts/x.nxml", "gone.nxml"]
    with pytest.raises(ValueError, match="input list absent.txt does not exist"):
        expand_inputs(["@absent.txt"])
    Path("empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="input list empty.txt names no paths"):
        expand_inputs(["@empty.txt"])
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="input directory bare holds no"):
        expand_inputs(["bare"])


def test_text_no_encoder_takes_is_cleaned_as_it_is_read_and_noted(tmp_path):
    """JSON lone surrogates, raw invalid UTF-8, control characters (raw or escaped) in every field: ids
    escaped as \\uXXXX, texts replaced, each change one note; a NUL in an image path fails the line."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    lines = [json.dumps({"id": "lone\udcff", "image": "a.png", "caption": "Panel \ud800A.\x00", "license": "CC\x07",
                         "context": ["see Fig.\x1b1", "\x00\x01", "fine"]}).encode(),
             b'{"id": "raw\xff", "image": "a.png", "caption": "caf\xe9\tcr\xc3\xa8me"}',
             json.dumps({"id": "nul", "image": "a\x00.png", "caption": "x"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    lone, raw, nul = iter_inputs([tmp_path / "m.jsonl"])
    assert lone.figure_id == "lone\\udcff" and raw.figure_id == "raw\\udcff"
    assert lone.caption == "Panel \ufffdA. " and lone.license == "CC " and lone.context == ["see Fig. 1", "fine"]
    assert raw.caption == "caf\ufffd\tcr\u00e8me" and lone.read_image_bytes() == png_bytes()
    assert lone.notes == [f"figure_id: text normalised: {SURROGATES} escaped as \\uXXXX",
                          f"caption: text normalised: {SURROGATES} and {CONTROLS} replaced",
                          f"license: text normalised: {CONTROLS} replaced",
                          f"context[0]: text normalised: {CONTROLS} replaced",
                          f"context[1]: text normalised: {CONTROLS} replaced"]
    assert [n.split(":")[0] for n in raw.notes] == ["figure_id", "caption"]
    assert isinstance(nul, InputFailure) and "NUL character" in nul.reason

    path = tmp_path / "shard.tar"
    key = b"PMC\xff_fig1".decode("utf-8", "surrogateescape")  # a member name that is not UTF-8, as tarfile reads it
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, f"{key}.png", png_bytes())
        add(tar, f"{key}.json", b'{"caption": "\xff\xfe(a) CT\x0c"}')
        add(tar, "deep.png", png_bytes())
        add(tar, "deep.json", b"[" * 100_000)  # too deep for json's recursion: one sample lost, not the tar
    sample, deep = iter_inputs([path])
    assert sample.figure_id == "PMC\\udcff_fig1" and sample.caption == "\ufffd\ufffd(a) CT "
    assert "\udcff" not in sample.source and sample.read_image_bytes() == png_bytes()
    assert isinstance(deep, InputFailure) and "sample JSON unreadable" in deep.reason
