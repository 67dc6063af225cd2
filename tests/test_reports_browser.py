"""The HTML site in a real browser: Debian's headless Chromium (installed by the README's set-up) loads the index and
a table page without console messages, every plot is a non-blank image, a hostile run error shows as text, and
screenshots of both pages are written (to $REPBENCH_TEST_ARTIFACTS when set, else the test's tmp folder)."""

import base64
import io
import os
import re
import shutil
import subprocess

import matplotlib.image
import pytest

import suites
from reports import write_reports
from results import Store

from test_reports import HOSTILE, fill, ratio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page, *flags, cwd):
    """Run headless Chromium on ``page``; returns (stdout, console lines)."""
    assert CHROMIUM, "chromium is not installed: the README's test command installs Debian's chromium"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--window-size=1400,2400", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def non_blank(png: bytes) -> bool:
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    return pixels.shape[0] > 50 and pixels.shape[1] > 50 and float(pixels[..., :3].std()) > 0.01


def test_the_console_check_sees_a_script_error(tmp_path):
    """The check below can fail: a page with a script error is reported."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><script>undefined_function();</script></body></html>")
    _, console = chromium(page, "--dump-dom", cwd=tmp_path)
    assert any("undefined_function" in line for line in console)


@pytest.mark.slow
def test_the_site_in_chromium(tmp_path):
    url = f"sqlite:///{tmp_path}/r.sqlite"
    store = Store(url)
    t4 = suites.get_table("table4")
    fill(store, t4, "smoke", {
        "ResNet-18/None": [{"top1": 50.0, "time_per_batch": 0.1, "train_memory": 0.3, "latency": 0.01,
                            **ratio(1.0), **ratio(1.0, name="train_memory")}],
        "ResNet-18/DBB": [{"top1": 40.0, "time_per_batch": 0.3, "train_memory": 0.6, "latency": 0.012,
                           **ratio(3.0, 2.8, 3.2), **ratio(2.0, name="train_memory")}],
        "ResNet-18/OREPA": [{"top1": 45.0, "time_per_batch": 0.2, "train_memory": 0.4, "latency": 0.01,
                             **ratio(2.0, 1.9, 2.1), **ratio(1.3, name="train_memory")}]})
    fill(store, t4, "smoke", {"ResNet-34/DBB": [{}]}, status="failed", error=HOSTILE)
    store.close()
    out = tmp_path / "site"
    written = write_reports([t for t in suites.TABLES.values() if t.paper == "orepa"], url, "html", out)
    assert written[0].name == "index.html" and (out / "leaderboard.html").exists()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for name in ("index.html", "orepa.table4.html", "leaderboard.html"):
        page = out / name
        dom, console = chromium(page, "--dump-dom", cwd=tmp_path)
        assert console == [], console
        assert "<h1>" in dom
        images = re.findall(r'src="data:image/png;base64,([^"]+)"', page.read_text())
        assert all(non_blank(base64.b64decode(data)) for data in images), name
        if name == "orepa.table4.html":
            assert len(images) >= 1
            assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "&lt;script&gt;alert(2)" in dom
            assert not re.search(r"<img[^>]*onerror", dom) and "<script>alert" not in dom
        if name == "leaderboard.html":
            assert len(images) >= 3 and "ResNet-18/OREPA" in dom
        shot = shots / name.replace(".html", ".png")
        chromium(page, f"--screenshot={shot}", cwd=tmp_path)
        assert non_blank(shot.read_bytes())
    if os.environ.get("REPBENCH_TEST_ARTIFACTS"):
        shutil.copytree(shots, os.environ["REPBENCH_TEST_ARTIFACTS"], dirs_exist_ok=True)
