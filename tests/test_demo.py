"""The demo page in a real browser: src/serve.py on a free loopback port, driven by headless Chromium through
Selenium. The caption shown for a built-in image is caption.py's for the same file; a broken upload and an
image over the pixel limit get a line on the page, and the server serves on. A screenshot of the page is kept
in outputs/test-artifacts/ (git-ignored)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from captioning.demo import DemoCaptioner, _table

from entrypoints import REPO, command, environment, run, tiny
from entrypoints import train as run_train

ARTIFACTS = REPO / "outputs" / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"serve.py did not answer at {url} within {seconds} s")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), (
        "the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver "
        "(.ci/run installs them)")
    options = Options()
    # as the machine's probe starts it: no sandbox as root, no background calls to a closed network
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def caption_rows(driver, wait_for_files: list[str], seconds: float = 90) -> dict[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def rows(d):
        found = {r.get_attribute("data-file"): r.find_element(By.CSS_SELECTOR, "td.caption").text
                 for r in d.find_elements(By.CSS_SELECTOR, "#captions tbody tr")}
        return found if all(name in found for name in wait_for_files) else False

    return WebDriverWait(driver, seconds).until(rows)


def test_the_page_table_escapes_and_names_errors(tmp_path):
    from types import SimpleNamespace

    page = _table([(tmp_path / "a<b>.png", SimpleNamespace(text="a red square", log_prob=-1.5), None),
                   (tmp_path / "x.jpg", None, "Image x.jpg could not be decoded")])
    assert "a&lt;b&gt;.png" in page and "a red square" in page and "-1.500" in page
    assert "class='error'" in page and "could not be decoded" in page
    beams = SimpleNamespace(text="a red square", log_prob=-1.5,
                            alternatives=[("a red square", -1.5), ("a red <circle>", -2.25)])
    page = _table([(tmp_path / "a.png", beams, None)])  # a beam's n-best list under its caption, best first
    assert "<ol class='nbest' start='2'" in page and "a red &lt;circle&gt; <span class='log-prob'>(-2.250)" in page
    demo = DemoCaptioner.__new__(DemoCaptioner)
    demo.max_length, demo.length_penalty = 16, 1.0
    assert demo.decoder("beam", 4).n_best == 4 and demo.decoder("beam", 4).length_penalty == 1.0 and demo.decoder("greedy", 4).n_best == 1
    assert DemoCaptioner.caption(DemoCaptioner.__new__(DemoCaptioner), [])[0].startswith("<p")


@pytest.mark.slow
def test_demo_page_in_a_real_browser(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run_train(tiny(tmp_path, "model=attention", "trainer.max_epochs=1", "test=false"))
    (run_dir,) = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    image = sorted((tmp_path / "data" / "shapes" / "val2017").glob("*.jpg"))[0]
    expected = run("caption.py", [f"ckpt_path={ckpt}", f"images={image}", f"hydra.run.dir={tmp_path / 'caption'}"])
    caption_py = expected.stdout.strip().split("\t")[1]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    large = tmp_path / "large.png"
    Image.new("RGB", (120, 100), (200, 30, 30)).save(large)

    port = free_port()
    proc = subprocess.Popen(**command("serve.py", [f"ckpt_path={ckpt}", f"port={port}", "max_image_pixels=5000",
                                                   f"hydra.run.dir={tmp_path / 'serve'}"], environment()),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, proc)
        driver = browser()
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))
        upload = driver.find_element(By.CSS_SELECTOR, "#images input[type=file]")
        upload.send_keys("\n".join(str(p) for p in (image, broken, large)))
        time.sleep(1)
        driver.find_element(By.CSS_SELECTOR, "#caption-button").click()
        rows = caption_rows(driver, [image.name, broken.name, large.name])
        assert rows[image.name] == caption_py  # the page captions as caption.py does
        assert "could not be decoded" in rows[broken.name]
        assert "more than the limit of 5,000" in rows[large.name]  # refused, the limit named
        assert driver.find_elements(By.CSS_SELECTOR, "#attention img")  # the attention model's overlays
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "demo_page.png"))
        with urllib.request.urlopen(url, timeout=5) as response:  # and it serves on
            assert response.status == 200
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert (ARTIFACTS / "demo_page.png").stat().st_size > 10_000


def test_queued_requests_with_the_same_settings_are_decoded_as_one_batch(tmp_path):
    from types import SimpleNamespace

    calls = []

    class Captioner:
        pipeline = SimpleNamespace(load=lambda path: Image.new("RGB", (8, 8)) if path.suffix == ".png" else
                                   (_ for _ in ()).throw(FileNotFoundError(path)))
        module = SimpleNamespace(set_decoding=lambda decoder: calls.append(("decoding", decoder.strategy,
                                                                            decoder.beam_size)))

        def __call__(self, images):
            calls.append(("batch", len(images)))
            return [SimpleNamespace(text=f"caption {len(calls)}.{k}", log_prob=-1.0, attention=None, words=[])
                    for k in range(len(images))]

    demo = DemoCaptioner.__new__(DemoCaptioner)
    demo.captioner, demo.max_length, demo.length_penalty = Captioner(), 16, 1.0
    files = [[tmp_path / "a.png", tmp_path / "b.png"], [tmp_path / "c.png", tmp_path / "gone.jpg"], [tmp_path / "d.png"]]
    tables, galleries = demo.caption_batch(files, ["greedy", "beam", "greedy"], [3, 3, 5])
    # two settings: greedy (requests 1 and 3: three images, one batch), beam 3 (request 2: its readable image)
    assert calls == [("decoding", "greedy", 1), ("batch", 3), ("decoding", "beam", 3), ("batch", 1)]
    assert "caption 2.0" in tables[0] and "caption 2.1" in tables[0] and "caption 2.2" in tables[2]
    assert "caption 4.0" in tables[1] and "could not be read" in tables[1] and galleries == [[], [], []]
