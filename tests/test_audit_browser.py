"""The audit page in a real headless browser (Debian's chromium and its chromedriver, through selenium):
ten figures answered with the keyboard, the server restarted, five more, exactly fifteen verdict lines;
two browsers at once lose nothing; the overlays of the 10 real MedICaT figures (the README's screenshot:
AUDIT_SCREENSHOT=docs/audit.png pytest tests/test_audit_browser.py -k medicat)."""
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from PIL import Image

from annotate.audit.sample import make_sample
from conftest import built_once
from test_audit import medicat_runs, serving  # noqa: F401 (fixtures)

pytest.importorskip("selenium", reason="selenium is not installed: pip install -r requirements-test.txt")

PACKAGES = ["chromium", "chromium-driver"]


def install_browser() -> str | None:
    """apt-get installs chromium and its driver where they are missing and this is root; else (or when
    apt fails) the one-line reason the browser tests are skipped."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return ("chromium and chromedriver are missing and this is not a root Debian to install them: "
                f"apt-get install {' '.join(PACKAGES)}")
    from filelock import FileLock
    with FileLock("/tmp/zoomin-audit-apt.lock"):  # two xdist workers must not run apt at once
        environment = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        for commands in ([["apt-get", "install", "-y", *PACKAGES]],
                         [["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]]):  # stale package lists
            if all(subprocess.run(command, env=environment, capture_output=True).returncode == 0
                   for command in commands):
                break
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    return f"apt-get install {' '.join(PACKAGES)} failed (no package source reachable?)"


@pytest.fixture(scope="session")
def browser():
    """A factory of headless chromium sessions on the system's chromedriver (so that Selenium Manager never
    tries to download a driver)."""
    if reason := install_browser():
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    drivers = []

    def start():
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         "--window-size=1500,940", "--hide-scrollbars"):
            options.add_argument(argument)
        drivers.append(webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options))
        return drivers[-1]

    yield start
    for driver in drivers:
        driver.quit()


def body_says(driver, name: str, value: str, timeout: float = 60) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(f"data-{name}") == value,
        f"the page never had data-{name}={value!r}")


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(driver).send_keys(keys).perform()


def review(driver, url: str | None, reviewer: str, first: int, count: int, answers: str = "cwuccccw") -> None:
    """Opens the page as `reviewer` (url None: it is open), checks it resumes at figure `first`, answers
    `count` figures with the keyboard (`answers`: the keys for run 1's four aspects, then run 2's) and Enter."""
    from selenium.webdriver.common.keys import Keys
    if url:
        driver.get(f"{url}?reviewer={reviewer}")
    for k in range(first, first + count):
        body_says(driver, "index", str(k))
        press(driver, answers + Keys.ENTER)
        body_says(driver, "done", str(k + 1))


def verdict_lines(audit: Path) -> list[dict]:
    return [json.loads(line) for line in (audit / "verdicts.jsonl").read_text().splitlines()]


def build_synth_runs(directory: Path) -> None:
    """16 synthetic figures, judged as two runs sharing ids: their ground truth as records (what `annotate
    synth --truth-records` writes) and the heuristic backend's run over them, made in this process."""
    from annotate.backends import HeuristicBackend
    from annotate.run import run_shard
    from annotate.synth import synthesize, write_truth_records
    synthesize(directory, num=16, seed=0)
    write_truth_records(directory)
    run_shard([str(directory / "manifest.jsonl")], directory / "heuristic", HeuristicBackend())


@pytest.fixture(scope="session")
def synth_runs(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "audit-synth", build_synth_runs)


def synth_audit(runs: Path, audit: Path) -> list[str]:
    """A sample of all 16 figures, truth beside heuristic; its figure order."""
    make_sample([f"truth={runs / 'truth'}", f"heuristic={runs / 'heuristic'}"], 16, 0, audit)
    return [entry["id"] for entry in json.loads((audit / "sample.json").read_text())["figures"]]


@pytest.mark.slow
def test_ten_figures_by_keyboard_a_restart_and_five_more_give_fifteen_lines(browser, serving, synth_runs, tmp_path):
    from selenium.webdriver.common.keys import Keys
    audit = tmp_path / "audit"
    order = synth_audit(synth_runs, audit)
    server, driver = serving(audit), browser()
    # A note on the first figure: n focuses it, Escape hands the keys back to the answers.
    driver.get(f"{server.url}?reviewer=ana")
    body_says(driver, "index", "0")
    press(driver, "n")
    press(driver, "labels look off" + Keys.ESCAPE)
    review(driver, None, "ana", 0, 10)
    assert len(verdict_lines(audit)) == 10
    server.stop()
    server = serving(audit)
    review(driver, server.url, "ana", 10, 5)  # resumes at the eleventh figure
    lines = verdict_lines(audit)
    assert len(lines) == 15 and [line["figure"] for line in lines] == order[:15]
    assert {line["reviewer"] for line in lines} == {"ana"} and lines[0]["note"] == "labels look off"
    assert lines[1]["answers"] == {"truth": {"panels": "correct", "labels": "wrong", "caption_split": "unsure",
                                             "regions": "correct"},
                                   "heuristic": {"panels": "correct", "labels": "correct", "caption_split": "correct",
                                                 "regions": "wrong"}}


def test_two_browsers_at_once_lose_no_verdict(browser, serving, synth_runs, tmp_path):
    audit = tmp_path / "audit"
    order = synth_audit(synth_runs, audit)
    server = serving(audit)
    drivers, errors = [browser(), browser()], []

    def reviewer(n: int) -> None:
        try:
            review(drivers[n], server.url, ["bo", "cy"][n], 0, 5, ["cccccccc", "wwwwuuuu"][n])
        except Exception as err:  # noqa: BLE001 (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=reviewer, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    lines = verdict_lines(audit)
    assert len(lines) == 10
    for name, answers in (("bo", ["correct"] * 4), ("cy", ["wrong"] * 4)):
        mine = [line for line in lines if line["reviewer"] == name]
        assert [line["figure"] for line in mine] == order[:5]
        assert all(list(line["answers"]["truth"].values()) == answers for line in mine)
    assert all(list(line["answers"]["heuristic"].values()) == ["unsure"] * 4
               for line in lines if line["reviewer"] == "cy")


def test_the_page_draws_the_overlays_of_the_real_medicat_figures(browser, serving, medicat_runs,  # noqa: F811
                                                                 tmp_path):
    from selenium.webdriver.common.by import By
    audit = tmp_path / "audit"
    make_sample([f"heuristic={medicat_runs / 'heuristic'}", f"heuristic-plain={medicat_runs / 'heuristic-plain'}"],
                10, 0, audit)
    server, driver = serving(audit), browser()
    driver.get(f"{server.url}?reviewer=ana")
    body_says(driver, "index", "0")
    ids = [entry["id"] for entry in json.loads((audit / "sample.json").read_text())["figures"]]
    # The figure whose two runs differ most: the plain run does not peel the caption strip off panel B.
    k = ids.index("57c9ad0f4aab133f96d40992c46926fabc901ffa_2-Figure2-1.png")
    # Cleared first: the figure may be the one shown, whose columns the call then replaces.
    driver.execute_script("document.body.dataset.index = ''; show(arguments[0])", k)
    body_says(driver, "index", str(k))
    columns = driver.find_elements(By.CSS_SELECTOR, ".run")
    assert [column.get_attribute("data-run") for column in columns] == ["heuristic", "heuristic-plain"]
    for column in columns:
        figure = json.loads(driver.execute_script("return JSON.stringify(state.figure.runs.find(r => r.name === "
                                                  "arguments[0]))", column.get_attribute("data-run")))
        assert len(column.find_elements(By.CSS_SELECTOR, "rect.panel")) == len(figure["panels"]) >= 2
        assert len(column.find_elements(By.CSS_SELECTOR, "rect.region")) == len(figure["regions"])
        labels = [item.find_element(By.TAG_NAME, "b").text
                  for item in column.find_elements(By.CSS_SELECTOR, ".split li")]
        assert labels == [panel["label"] or "—" for panel in figure["panels"]]
        assert column.find_element(By.TAG_NAME, "img").get_property("naturalWidth") == figure["width"]
    assert driver.find_element(By.ID, "caption").text.startswith("Figure 2.")
    press(driver, "ccc")  # the first answers, as a reviewer starts
    shot = tmp_path / "audit.png"
    driver.save_screenshot(str(shot))
    # 256 colours: the README's image stays small; the overlays' colours survive.
    Image.open(shot).convert("RGB").quantize(256).save(shot, optimize=True)
    if target := os.environ.get("AUDIT_SCREENSHOT"):
        shutil.copyfile(shot, target)
