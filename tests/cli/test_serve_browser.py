"""The web page of ``instseg serve`` in a real browser: uvicorn on 127.0.0.1 (a free port), a
headless Chromium (Debian's package; installed with apt-get when missing, else this test is
skipped saying why) driven over the DevTools protocol; it uploads an image, waits for the
overlay and saves a screenshot, which must show the overlay the API returns."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the serve extra (python-multipart) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

from instseg.api import Predictor  # noqa: E402
from instseg.serve import create_app  # noqa: E402
from tests.cdp_pipe import Browser, install_chromium  # noqa: E402
from tests.golden_utils import GOLDEN  # noqa: E402
from tests.predict_utils import synthetic_image, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        return install_chromium()
    except RuntimeError as e:
        pytest.skip(f"no headless Chromium: {e}")


@pytest.fixture
def server(tmp_path):
    predictor = Predictor(tiny_checkpoint("mask_rcnn", tmp_path / "m.pt"), device="cpu")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(predictor), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield predictor, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_upload_in_headless_chromium_shows_the_overlay(chromium, server, tmp_path):
    predictor, url = server
    image_path = GOLDEN / "100002.jpg"
    if not image_path.is_file():  # the page does not need the golden model, only an image
        image_path = tmp_path / "upload.png"
        Image.fromarray(synthetic_image(4, 240, 320)).save(image_path)
    browser = Browser(chromium, tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent")
        blank = _screenshot(browser)
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(image_path)])
        browser.evaluate("document.getElementById('thr').value = '0'; document.getElementById('run').click(); 1")
        size = browser.wait_for("(() => { const i = document.getElementById('overlay');"
                                " return i.dataset.loaded === '1' && [i.naturalWidth, i.naturalHeight]; })()")
        rect = browser.evaluate("(() => { const i = document.getElementById('overlay'), r = i.getBoundingClientRect();"
                                " return [r.left + i.clientLeft, r.top + i.clientTop, i.clientWidth, i.clientHeight];"
                                " })()")  # inside the border
        status = browser.evaluate("document.getElementById('status').textContent")
        shot = _screenshot(browser)
    finally:
        browser.close()
    path = tmp_path / "serve_page.png"
    Image.fromarray(shot).save(path)
    print(f"screenshot: {path}")

    expected = predictor(image_path).draw(score_thr=0.0)
    assert tuple(size) == expected.size  # the <img> holds the full-size overlay
    assert "detections in" in status and not status.startswith("0 ")
    x, y, w, h = (int(round(v)) for v in rect)
    assert (w, h) == expected.size  # shown at 1:1 (device scale factor 1)
    shown = shot[y : y + h, x : x + w].astype(np.int16)
    assert np.abs(shown - blank[y : y + h, x : x + w]).mean() > 20  # the page changed where the overlay is
    # what the browser shows is the overlay the API draws (not the bare image)
    assert np.abs(shown - np.asarray(expected, dtype=np.int16)).mean() < 2
    raw = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int16)
    assert np.abs(shown - raw).mean() > 5


def _screenshot(browser: Browser) -> np.ndarray:
    data = browser.call("Page.captureScreenshot", format="png")["data"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
