"""`annotate audit` (issue 29): the stratified sample of two real runs of the 10 MedICaT figures, the bad
inputs' one-line errors, the verdict file under concurrent writers, and the report's numbers on a
hand-made verdict file, computed by hand here. The page in a real browser: tests/test_audit_browser.py."""
import io
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from annotate.audit import ASPECTS
from annotate.audit.report import write_report
from annotate.audit.sample import allocate, make_sample
from conftest import DATA, REPO, built_once, run_cli
from zoomin_jax import records

MEDICAT = DATA / "figures" / "medicat"


def build_medicat_runs(directory: Path) -> None:
    """Two runs over the 10 real MedICaT figures, sharing ids: `annotate run --backend heuristic` as the
    README gives it, and the heuristic with the splitter's refinements off (no text strips peeled, no
    arrow-crossed gutter kept, no unlabelled parts split as pictures) as the second run. The figures come
    from two manifests (radiology or not, as MedICaT marks them), so the sample has two sources."""
    from annotate.backends import HeuristicBackend
    from annotate.heuristic import SplitConfig
    from annotate.run import run_shard
    directory.mkdir(parents=True, exist_ok=True)
    manifests = {True: directory / "medicat-radiology.jsonl", False: directory / "medicat-other.jsonl"}
    lines = {True: [], False: []}
    for item in map(json.loads, (MEDICAT / "sample.jsonl").read_text().splitlines()):
        name = f"{item['pdf_hash']}_{item['fig_uri']}"
        lines[bool(item["radiology"])].append(json.dumps({"id": name, "image": str(MEDICAT / name),
                                                          "caption": item["s2_caption"],
                                                          "context": item["s2orc_references"]}))
    for radiology, path in manifests.items():
        path.write_text("\n".join(lines[radiology]) + "\n")
    inputs = [str(path) for path in manifests.values()]
    run_cli("-m", "annotate", "run", "--input", *inputs, "--out", str(directory / "heuristic"),
            "--backend", "heuristic", "--decode-workers", "0")
    run_shard(inputs, directory / "heuristic-plain",
              HeuristicBackend(SplitConfig(text_aspect=1e9, bridge_gap=0, picture_fill=2.0)))


@pytest.fixture(scope="session")
def medicat_runs(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "audit-medicat", build_medicat_runs)


def sampled_ids(audit: Path, run: str) -> list[str]:
    return [r["figure_id"] for r in records.iter_records(sorted((audit / "runs" / run).glob("*.array_record")))]


def test_the_sample_is_seeded_stratified_and_the_same_figures_in_every_run(medicat_runs, tmp_path):
    for name in ("a", "b"):
        make_sample([str(medicat_runs / "heuristic"), f"plain={medicat_runs / 'heuristic-plain'}"], 7, 3, tmp_path / name)
    sample = json.loads((tmp_path / "a" / "sample.json").read_text())
    assert sample == json.loads((tmp_path / "b" / "sample.json").read_text())  # seeded
    ids = [entry["id"] for entry in sample["figures"]]
    assert len(set(ids)) == 7 and [run["name"] for run in sample["runs"]] == ["heuristic", "plain"]
    assert sorted(sampled_ids(tmp_path / "a", "heuristic")) == sorted(sampled_ids(tmp_path / "a", "plain")) \
        == sorted(ids)
    # The strata: the first run's panel count, the manifest the figure came from, the caption's panels.
    files = sorted((medicat_runs / "heuristic").glob("*.array_record"))
    heuristic = {r["figure_id"]: r for r in records.iter_records(files)}
    for entry in sample["figures"]:
        record = heuristic[entry["id"]]
        assert entry["stratum"]["panels"] == {1: "1", 2: "2", 3: "3-4", 4: "3-4"}[len(record["panels"])]
        assert entry["stratum"]["source"] == Path(record["source"].rsplit(":", 1)[0]).name
        assert entry["stratum"]["kind"] == ("compound" if "(A)" in record["caption"] else "single")
    assert {s["stratum"]["source"] for s in sample["strata"]} == {"medicat-radiology.jsonl", "medicat-other.jsonl"}
    # Proportional allocation: each stratum gets its share of 7 of the 10, rounded down or up.
    assert sum(s["population"] for s in sample["strata"]) == 10 and sum(s["sample"] for s in sample["strata"]) == 7
    for s in sample["strata"]:
        assert math.floor(7 * s["population"] / 10) <= s["sample"] <= math.ceil(7 * s["population"] / 10)
        assert s["sample"] == sum(entry["stratum"] == s["stratum"] for entry in sample["figures"])


def test_allocation_follows_the_largest_remainders():
    # 10 of 17 figures in strata of 9, 5 and 3: quotas 5.294, 2.941, 1.765 -> 5, 2, 1 and two left over,
    # which go to the largest remainders (0.941 and 0.765).
    assert allocate({"x": 9, "y": 5, "z": 3}, 10) == {"x": 5, "y": 3, "z": 2}


def one_line_error(capsys, *argv: str) -> str:
    """The command run in this process (the CLI's own code, without a process start each) fails with
    exit status 1 and one line, which names each of the words."""
    from annotate.__main__ import main
    capsys.readouterr()
    assert main(["audit", *argv[:-1]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and argv[-1] in err, err
    return err


def test_bad_sample_inputs_give_one_line_errors(medicat_runs, tmp_path, capsys):
    run, out = str(medicat_runs / "heuristic"), str(tmp_path / "x")
    one_line_error(capsys, "sample", "--records", str(medicat_runs), "--out", out,
                   f"error: {medicat_runs} holds no records-*.array_record files: give --records the --out folder "
                   "of an `annotate run` (after `annotate merge` for a fanned-out run)")
    one_line_error(capsys, "sample", "--records", run, "--n", "11", "--out", out,
                   "error: a sample of 11 is larger than the 10 figures the run holds: ask for --n 10 or fewer")
    one_line_error(capsys, "sample", "--records", run, "--records", run, "--out", out, "named alike")
    from annotate.__main__ import main
    assert main(["audit", "sample", "--records", run, "--n", "2", "--out", out]) == 0
    one_line_error(capsys, "sample", "--records", run, "--n", "2", "--out", out, "sample.json exists")
    one_line_error(capsys, "serve", str(medicat_runs), f"error: {medicat_runs} has no sample.json: make it with "
                   f"`python -m annotate audit sample --records DIR --n N --seed S --out {medicat_runs}`")
    one_line_error(capsys, "report", str(tmp_path), "has no sample.json")


class Server:
    """`python -m annotate audit serve DIR --port 0` in a process of its own; the address it prints."""

    def __init__(self, directory: Path, log: Path):
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "annotate", "audit", "serve", str(directory),
                                         "--port", "0"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.monotonic() + 120
        while not (found := re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())):
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        self.url = found.group(0)

    def stop(self) -> None:
        self.process.terminate()
        assert self.process.wait(timeout=30) == 0, self.log.read_text()


@pytest.fixture
def serving():
    servers = []

    def start(directory: Path, name: str = "server") -> Server:
        servers.append(Server(directory, directory.parent / f"{name}-{len(servers)}.log"))
        return servers[-1]

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.stop()


def request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    try:
        asked = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(asked, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_get(url: str, path: str) -> tuple[int, dict]:
    """GET with the path sent as written (urllib would not keep '..' either, but a browser or curl may)."""
    import http.client
    host, port = url.split("//")[1].strip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def verdict(figure: str, reviewer: str, runs: list[str], answer: str = "correct", note: str = "") -> dict:
    return {"reviewer": reviewer, "figure": figure, "note": note,
            "answers": {run: {aspect: answer for aspect in ASPECTS} for run in runs}}


@pytest.fixture(scope="module")
def medicat_audit(medicat_runs, tmp_path_factory) -> Path:
    audit = tmp_path_factory.mktemp("medicat-audit") / "audit"
    make_sample([str(medicat_runs / "heuristic"), f"plain={medicat_runs / 'heuristic-plain'}"], 10, 0, audit)
    return audit


def test_the_server_refuses_bad_verdicts_and_paths_outside_the_folder(medicat_audit, serving):
    server = serving(medicat_audit)
    sample = json.loads((medicat_audit / "sample.json").read_text())
    status, info = request(server.url + "api/sample")
    assert status == 200 and info["runs"] == ["heuristic", "plain"] and info["total"] == 10
    status, figure = request(server.url + "api/figure/0?reviewer=ana")
    assert figure["id"] == sample["figures"][0]["id"] and [run["name"] for run in figure["runs"]] == info["runs"]
    with urllib.request.urlopen(server.url + "image/0/plain", timeout=60) as response:
        assert Image.open(io.BytesIO(response.read())).size == (figure["runs"][1]["width"], figure["runs"][1]["height"])
    status, answer = request(server.url + "api/verdict", verdict("not-in-the-sample.png", "ana", info["runs"]))
    assert status == 400
    assert answer["error"] == "verdict refused: figure 'not-in-the-sample.png' is not in this audit's sample"
    partial = verdict(figure["id"], "ana", info["runs"])
    del partial["answers"]["plain"]["regions"]
    status, answer = request(server.url + "api/verdict", partial)
    assert status == 400 and "'plain'" in answer["error"] and "regions" in answer["error"]
    (medicat_audit.parent / "secret.txt").write_text("not for the page")
    for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files//etc/passwd",
                 "/files/runs/../../secret.txt"):
        status, answer = raw_get(server.url, path)
        assert status == 403 and answer["error"].startswith("refused: ")
        assert "outside the audit folder" in answer["error"]
    status, answer = raw_get(server.url, "/files/sample.json")
    assert status == 200 and answer == sample
    assert not (medicat_audit / "verdicts.jsonl").exists()  # nothing refused was written


def test_two_servers_and_concurrent_requests_lose_no_verdict(medicat_audit, tmp_path, serving):
    audit = tmp_path / "audit"
    make_sample([f"{medicat_audit / 'runs' / 'heuristic'}", f"plain={medicat_audit / 'runs' / 'plain'}"], 10, 0, audit)
    ids = [entry["id"] for entry in json.loads((audit / "sample.json").read_text())["figures"]]
    servers = [serving(audit, "one"), serving(audit, "two")]
    notes = "a long note " * 2000  # 24 kB: more than one write of a pipe or socket buffer

    def review(server: Server, reviewer: str) -> None:
        for figure in ids:
            status, answer = request(server.url + "api/verdict", verdict(figure, reviewer, ["heuristic", "plain"],
                                                                         note=notes))
            assert status == 200, answer

    threads = [threading.Thread(target=review, args=(servers[n % 2], f"reviewer-{n}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = [json.loads(line) for line in (audit / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and sorted((v["reviewer"], v["figure"]) for v in lines) == sorted(
        (f"reviewer-{n}", figure) for n in range(4) for figure in ids)
    assert all(v["note"] == notes and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", v["time"]) for v in lines)
    status, progress = request(servers[0].url + "api/next?reviewer=reviewer-1")
    assert progress == {"next": None, "done": 10, "total": 10}
    # A line a crash cut short stays a line of its own: the next verdict is whole, the report names the cut one.
    with open(audit / "verdicts.jsonl", "a") as f:
        f.write('{"reviewer": "reviewer-9", "fig')
    status, answer = request(servers[1].url + "api/verdict", verdict(ids[0], "reviewer-9", ["heuristic", "plain"]))
    assert status == 200
    _, skipped = write_report(audit)
    assert skipped == [f"{audit / 'verdicts.jsonl'} line 41 is not JSON (Unterminated string starting at: line 1 "
                       "column 28 (char 27)): skipped, fix or delete it"]
    assert json.loads((audit / "report" / "report.json").read_text())["verdict_lines"] == 41


def tiny_png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def hand_made_runs(directory: Path) -> list[str]:
    """Runs 'big' and 'small' of six figures: f1-f3 two panels with a caption naming (A) and (B)
    (compound), f4-f6 one panel (single); f1-f4 from a.jsonl, f5-f6 from b.jsonl."""
    specs = []
    for run in ("big", "small"):
        with records.RecordWriter(directory / run / "records-00000-of-00001.array_record") as writer:
            for n in range(1, 7):
                compound = n <= 3
                panels = ([records.new_panel(panel_id=0, label="A", box=[0, 0, 20, 30], text="x"),
                           records.new_panel(panel_id=1, label="B", box=[20, 0, 40, 30], text="y")] if compound
                          else [records.new_panel(panel_id=0, box=[0, 0, 40, 30], text="One image.")])
                writer.write(records.new_figure(
                    figure_id=f"f{n}", source=f"/data/{'a' if n <= 4 else 'b'}.jsonl:{n}",
                    image_bytes=tiny_png((n * 40, 0, 0)),
                    width=40, height=30, caption="(A) x. (B) y." if compound else "One image.", panels=panels))
        specs.append(f"{run}={directory / run}")
    return specs


def hand_verdict(reviewer: str, figure: str, big_panels: str, small_panels: str, time: str, note: str = "") -> str:
    """Only the panels aspect varies; labels, caption split and regions are correct throughout."""
    answers = {run: {aspect: "correct" for aspect in ASPECTS} for run in ("big", "small")}
    answers["big"]["panels"], answers["small"]["panels"] = big_panels, small_panels
    return json.dumps({"reviewer": reviewer, "figure": figure, "answers": answers, "note": note, "time": time})


Z = 1.959963984540054


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p, z2 = k / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_the_report_on_a_hand_made_verdict_file(tmp_path):
    audit = tmp_path / "audit"
    make_sample(hand_made_runs(tmp_path), 6, 0, audit)
    c, w, u = "correct", "wrong", "unsure"
    lines = [
        hand_verdict("ana", "f1", c, c, "2026-12-01T10:00:00.000Z"),
        hand_verdict("ana", "f2", w, w, "2026-12-01T10:01:00.000Z"),  # replaced by ana's line 11
        hand_verdict("ana", "f3", w, w, "2026-12-01T10:02:00.000Z", note="B cut in two"),
        hand_verdict("ana", "f4", c, c, "2026-12-01T10:03:00.000Z"),
        hand_verdict("ana", "f5", u, c, "2026-12-01T10:04:00.000Z"),
        hand_verdict("ana", "f6", c, w, "2026-12-01T10:05:00.000Z"),
        hand_verdict("bob", "f1", c, c, "2026-12-01T11:00:00.000Z"),
        hand_verdict("bob", "f2", c, w, "2026-12-01T11:01:00.000Z"),
        hand_verdict("bob", "f3", c, w, "2026-12-01T11:02:00.000Z"),
        hand_verdict("bob", "f4", w, c, "2026-12-01T11:03:00.000Z"),
        hand_verdict("ana", "f2", c, w, "2026-12-01T12:00:00.000Z"),
        "this line is not JSON",
        hand_verdict("ana", "f9", c, c, "2026-12-01T12:01:00.000Z"),
    ]
    (audit / "verdicts.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli("-m", "annotate", "audit", "report", str(audit))
    verdicts_path = audit / "verdicts.jsonl"
    assert result.stderr.splitlines()[:2] == [
        f"warning: {verdicts_path} line 12 is not JSON (Expecting value: line 1 column 1 (char 0)): skipped, fix or "
        "delete it",
        f"warning: {verdicts_path} line 13 is skipped: figure 'f9' is not in this audit's sample; fix or delete it"]
    report = json.loads((audit / "report" / "report.json").read_text())
    assert report["verdict_lines"] == 11 and report["reviewers"] == ["ana", "bob"]
    assert report["figures_judged"] == 6 and report["figures_judged_twice"] == 4

    # Each figure once, with its first reviewer (ana) and her last line: big's panels f1..f6 are
    # c, c (line 11), w, c, u, c -> 4 correct, 1 wrong, 1 unsure: 4 / (4 + 1) = 0.8, unsure left out.
    big = report["shares"]["big"]["panels"]
    assert (big["correct"], big["wrong"], big["unsure"], big["share"]) == (4, 1, 1, 0.8)
    # Wilson, k = 4, n = 5: z^2 = 3.841459; centre = (0.8 + z^2/10) / (1 + z^2/5) = 1.184146 / 1.768292
    # = 0.669655; half = z / 1.768292 * sqrt(0.8*0.2/5 + z^2/100) = 1.108393 * sqrt(0.070415) = 0.294121.
    assert big["ci95"] == pytest.approx(wilson_by_hand(4, 5), abs=1e-12)
    assert big["ci95"] == pytest.approx([0.669655 - 0.294121, 0.669655 + 0.294121], abs=2e-6)
    # small's panels: c, w, w, c, c, w -> 3 / 6 = 0.5; Wilson centre 0.5 (symmetric), half =
    # z / (1 + z^2/6) * sqrt(0.25/6 + z^2/144) = 1.194921 * sqrt(0.068344) = 0.312384.
    small = report["shares"]["small"]["panels"]
    assert (small["correct"], small["wrong"], small["unsure"], small["share"]) == (3, 3, 0, 0.5)
    assert small["ci95"] == pytest.approx(wilson_by_hand(3, 6), abs=1e-12)
    assert small["ci95"] == pytest.approx([0.5 - 0.312384, 0.5 + 0.312384], abs=2e-6)
    # Labels: 6 of 6 correct; Wilson k = n = 6: [6 / (6 + z^2), 1] = [0.609666, 1].
    assert report["shares"]["big"]["labels"]["ci95"] == pytest.approx([6 / (6 + Z * Z), 1.0], abs=1e-12)
    assert 6 / (6 + Z * Z) == pytest.approx(0.609666, abs=1e-6)

    # By stratum, big's panels: compound f1-f3 c, c, w -> 2/3; single f4-f6 c, u, c -> 2/2;
    # a.jsonl f1-f4 -> 3/4; b.jsonl f5-f6 -> 1/1; panel bucket "2" = compound, "1" = single.
    strata = report["by_stratum"]["big"]["panels"]
    assert {value: (r["correct"], r["wrong"], r["unsure"]) for value, r in strata["kind"].items()} == {
        "compound": (2, 1, 0), "single": (2, 0, 1)}
    assert {value: r["share"] for value, r in strata["source"].items()} == {"a.jsonl": 0.75, "b.jsonl": 1.0}
    assert strata["panels"]["2"]["ci95"] == pytest.approx(wilson_by_hand(2, 3), abs=1e-12)
    assert strata["source"]["a.jsonl"]["ci95"] == pytest.approx(wilson_by_hand(3, 4), abs=1e-12)

    # Paired, big minus small on panels, f5 left out (big unsure): f1 (c, c), f2 (c, w), f3 (w, w),
    # f4 (c, c), f6 (c, w) -> both 2, big only 2, small only 0, neither 1; difference (2 - 0) / 5 = 0.4.
    panels = next(d for d in report["differences"] if d["aspect"] == "panels")
    assert (panels["both"], panels["first_only"], panels["second_only"], panels["neither"]) == (2, 2, 0, 1)
    assert panels["difference"] == pytest.approx(0.4, abs=1e-15)
    # Newcombe's method 10: p1 = 4/5, p2 = 2/5 with their Wilson bounds; phi = (2*1 - 2*0) / sqrt(4*1*2*3)
    # = 0.408248; lower = 0.4 - sqrt((p1-l1)^2 - 2 phi (p1-l1)(u2-p2) + (u2-p2)^2), upper likewise.
    # Wilson(2, 5) = 0.443453 -+ 0.325828 = [0.117625, 0.769281]; p1 - l1 = 0.424465, u2 - p2 = 0.369281:
    # lower = 0.4 - sqrt(0.180171 - 0.127984 + 0.136368) = 0.4 - 0.434228 = -0.034228; u1 - p1 = 0.163776,
    # p2 - l2 = 0.282375: upper = 0.4 + sqrt(0.026823 - 0.037760 + 0.079736) = 0.4 + 0.262298 = 0.662298.
    (l1, u1), (l2, u2) = wilson_by_hand(4, 5), wilson_by_hand(2, 5)
    phi = 2 / math.sqrt(24)
    lower = 0.4 - math.sqrt((0.8 - l1) ** 2 - 2 * phi * (0.8 - l1) * (u2 - 0.4) + (u2 - 0.4) ** 2)
    upper = 0.4 + math.sqrt((u1 - 0.8) ** 2 - 2 * phi * (u1 - 0.8) * (0.4 - l2) + (0.4 - l2) ** 2)
    assert panels["ci95"] == pytest.approx([lower, upper], abs=1e-12)
    assert panels["ci95"] == pytest.approx([-0.034228, 0.662298], abs=5e-6)
    # Labels: both runs correct on all 6: both = 6, no difference; phi's margins are 0 so phi = 0 and the
    # interval is [0 - (1 - l), 0 + (1 - l)] with l = 0.609666 (the Wilson lower bound of 6 of 6).
    labels = next(d for d in report["differences"] if d["aspect"] == "labels")
    assert labels["difference"] == 0 and labels["ci95"] == pytest.approx(
        [-math.hypot(0, 1 - 6 / (6 + Z * Z)), math.hypot(1 - 6 / (6 + Z * Z), 0)], abs=1e-12)

    # Agreement on f1-f4 (ana's last lines against bob's), big's panels: (c, c), (c, c), (w, c), (c, w):
    # observed 2/4; each gave 3 c and 1 w, chance (3*3 + 1*1) / 16 = 0.625; kappa (0.5 - 0.625) / 0.375 = -1/3.
    agreement = report["agreement"]["big"]["panels"]
    assert agreement == {"figures": 4, "agreement": 0.5, "kappa": pytest.approx(-1 / 3, abs=1e-15)}
    # small's panels: (c, c), (w, w), (w, w), (c, c): kappa 1. Labels: all c, chance agreement 1: undefined.
    assert report["agreement"]["small"]["panels"]["kappa"] == 1.0
    assert report["agreement"]["big"]["labels"] == {"figures": 4, "agreement": 1.0, "kappa": None}

    # The figures someone judged wrong (by their last line): f2, f3, f6 (ana), f2, f3, f4 (bob).
    assert sorted({w["figure"] for w in report["judged_wrong"]}) == ["f2", "f3", "f4", "f6"]
    gallery = (audit / "report" / "wrong" / "index.html").read_text()
    assert gallery.count("<section>") == 4 and "B cut in two" in gallery and "<h2>f5</h2>" not in gallery
    assert len(list((audit / "report" / "wrong").glob("*.png"))) == 8  # each of the 4 in both runs
    markdown = (audit / "report" / "report.md").read_text()
    assert "| big | panels | 4 | 1 | 1 | 0.800 | [0.376, 0.964] |" in markdown
    assert "| big | small | panels | 5 | 2 | 2 | 0 | 1 | 0.400 | [-0.034, 0.662] |" in markdown
    assert "| big | panels | 4 | 0.500 | -0.333 |" in markdown
    assert "left out of the denominator" in markdown and "Newcombe's method 10" in markdown
    assert (f"- {verdicts_path} line 13 is skipped: figure 'f9' is not in this audit's sample; fix or delete it"
            in markdown)
