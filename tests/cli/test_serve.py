"""``instseg serve``'s app through FastAPI's in-process test client: /health, /predict (COCO
results with RLE masks equal to the Python API's, optional overlay), the web page, and 4xx (never
500) for bad uploads."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the serve extra (python-multipart) is not installed")
pytest.importorskip("httpx", reason="fastapi.testclient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from instseg.api import Predictor  # noqa: E402
from instseg.serve import create_app  # noqa: E402
from tests.predict_utils import CLASS_NAMES, synthetic_image, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = tiny_checkpoint("mask_rcnn", tmp_path_factory.mktemp("serve") / "m.pt")
    predictor = Predictor(ckpt, device="cpu")
    return predictor, TestClient(create_app(predictor, max_upload_mb=0.05))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_page(served):
    predictor, client = served
    h = client.get("/health").json()
    assert h == {"status": "ok", "model": "mask_rcnn", "checkpoint": predictor.checkpoint,
                 "classes": CLASS_NAMES, "device": "cpu", "tta": ""}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and 'id="overlay"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: nothing fetched elsewhere


def test_predict_equals_the_api(served):
    predictor, client = served
    image = synthetic_image(2)
    r = client.post("/predict", files={"file": ("x.png", _png(image), "image/png")}, params={"score_thr": 0.1})
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == {"file_name": "x.png", "height": 90, "width": 120}
    assert [c["name"] for c in body["categories"]] == CLASS_NAMES
    expected = predictor(image).filter(0.1)
    got = body["detections"]
    assert len(got) == len(expected) > 0 and "overlay" not in body
    assert [d.pop("class_name") for d in got] == expected.class_names
    assert got == json.loads(json.dumps(expected.to_coco(image_id=0)))
    assert all(d["segmentation"]["size"] == [90, 120] for d in got)  # RLE in the image's frame

    r = client.post("/predict?overlay=true&score_thr=0.1", files={"file": ("x.png", _png(image), "image/png")})
    head, data = r.json()["overlay"].split(",", 1)
    assert head == "data:image/png;base64"
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert drawn.shape == (90, 120, 3) and np.array_equal(drawn, np.asarray(expected.draw(score_thr=0.1)))


def test_bad_uploads_get_4xx_with_a_message(served):
    _, client = served
    cases = [
        ({"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 415, "not a readable image"),
        ({"files": {"file": ("e.png", b"", "image/png")}}, 400, "empty"),
        ({"files": {"file": ("t.png", _png(synthetic_image())[:60], "image/png")}}, 415, "not a readable image"),
        ({"files": {"file": ("big.bmp", b"BM" + b"\0" * 60_000, "image/bmp")}}, 413, "0.05 MB"),  # read check
        ({"files": {"file": ("huge.bmp", b"BM" + b"\0" * 300_000, "image/bmp")}}, 413, "0.05 MB"),  # Content-Length
        ({"content": b"--xx\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xx"}}, 400, ""),
        ({"files": {"other": ("x.png", _png(synthetic_image()), "image/png")}}, 400, "field 'file'"),
        ({"data": {"file": "just text"}}, 400, "field 'file'"),
        ({"content": b"raw bytes", "headers": {"content-type": "application/octet-stream"}}, 400, "field 'file'"),
    ]
    for kw, status, words in cases:
        r = client.post("/predict", **kw)
        assert r.status_code == status, (kw, r.text)
        assert words in r.json()["detail"]
    r = client.post("/predict?score_thr=2", files={"file": ("x.png", _png(synthetic_image()), "image/png")})
    assert r.status_code == 422 and r.json()["detail"] == "score_thr: Input should be less than or equal to 1"


def test_chunked_upload_is_refused_while_it_streams(served):
    """Without a Content-Length the limit applies to the bytes as they arrive: the app stops
    reading soon after the limit (0.05 MB + 64 kB of form framing) and answers 413."""
    import asyncio

    predictor, _ = served
    app = create_app(predictor, max_upload_mb=0.05)
    head = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.bmp"\r\n\r\n'
    chunks = [head] + [b"\0" * 10_000] * 40 + [b"\r\n--xx--\r\n"]
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        k = len(pulled) - 1
        return {"type": "http.request", "body": chunks[k], "more_body": k + 1 < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=xx"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert "0.05 MB" in json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["detail"]
    assert len(pulled) < 20  # ~116 kB read of the 400 kB


def test_too_many_pixels_is_413(served):
    predictor, _ = served
    client = TestClient(create_app(predictor, max_pixels=50 * 50))
    r = client.post("/predict", files={"file": ("x.png", _png(synthetic_image()), "image/png")})
    assert r.status_code == 413 and "120x90" in r.json()["detail"]


def test_concurrent_requests_agree(served):
    """Requests from several threads at once each get their own image's result."""
    predictor, client = served
    images = [synthetic_image(k) for k in range(4)]
    expected = [json.loads(json.dumps(predictor(im).to_coco(image_id=0, score_thr=0.3))) for im in images]
    got: dict[int, list] = {}

    def ask(k: int) -> None:
        r = client.post("/predict", files={"file": (f"{k}.png", _png(images[k]), "image/png")})
        got[k] = [{key: v for key, v in d.items() if key != "class_name"} for d in r.json()["detections"]]

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(4)] == expected


def test_instseg_serve_command(tmp_path):
    """``instseg serve`` as a user runs it: uvicorn on 127.0.0.1 answers /health, then stops on SIGINT."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    ckpt = tiny_checkpoint("retinanet", tmp_path / "r.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "instseg.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "instseg serve did not answer"
                time.sleep(0.2)
        assert health["model"] == "retinanet" and health["device"] == "cpu"
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert f"open http://127.0.0.1:{port}/" in out


def test_serve_without_the_extra_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from instseg.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if uvicorn were not installed
    assert main(["serve", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "pip install 'instseg[serve]'" in capsys.readouterr().err
