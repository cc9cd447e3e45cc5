"""``instseg serve``: a :class:`~instseg.api.Predictor` behind HTTP (FastAPI + uvicorn, the
``serve`` extra).

Routes of :func:`create_app`:

- ``GET /``: one self-contained HTML page (no external scripts, styles or fonts) to upload an
  image and see the overlay;
- ``GET /health``: ``{"status": "ok", "model", "checkpoint", "classes", "device", "tta"}``;
- ``POST /predict``: multipart form with the image in the field ``file``; query ``score_thr``
  (default 0.3) and ``overlay=true`` (adds a ``data:image/png;base64,...`` overlay).  Answers
  ``{"image": {file_name, height, width}, "detections": [COCO results with RLE masks and
  class_name], "categories": [...]}``.

Bad uploads get a 4xx with ``{"detail": "..."}``: no file or an empty one 400, larger than
``max_upload_mb`` 413, not a decodable image 415, more than ``max_pixels`` pixels 413.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route parameters' annotations
# at run time, and the fastapi names they use are imported lazily inside create_app.
import base64
import io
from typing import Any

__all__ = ["ServeError", "create_app", "run"]


class ServeError(ValueError):
    """The serve extra missing, or a bad server setting (one-line message)."""


def require_extra(module: str):
    """Imports ``module`` of the serve extra, or raises :class:`ServeError` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ServeError(f"instseg serve needs {module.split('.')[0]}: pip install 'instseg[serve]' "
                         "(fastapi, uvicorn, python-multipart)") from None


def decode_upload(data: bytes, max_pixels: int):
    """``(H, W, 3)`` uint8 RGB of an uploaded file (EXIF orientation applied), or ``(status,
    message)`` saying why it cannot be used."""
    import numpy as np
    from PIL import Image, ImageOps

    if not data:
        return 400, "the uploaded file is empty"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                return 413, f"image of {w}x{h} pixels is larger than the server's limit of {max_pixels} pixels"
            arr = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    except Image.DecompressionBombError as e:
        return 413, f"image too large: {e}"
    except Exception as e:  # PIL raises many types for non-images and corrupt files
        return 415, f"the upload is not a readable image ({type(e).__name__}); send a JPEG, PNG, BMP, TIFF or WebP file"
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        return 400, "the image has no pixels"
    return arr


class _BodyTooLarge(Exception):
    """Raised while the request body is read, once it passes the limit (answered with 413)."""


class _LimitBody:
    """ASGI middleware: a request to ``path`` whose body is larger than ``max_bytes`` is refused
    before the multipart parser spools it, by its Content-Length or, for a chunked upload, as soon
    as the bytes received pass the limit (the app's exception handler turns that into a 413)."""

    def __init__(self, app, *, path: str, max_bytes: int, message: str) -> None:
        self.app, self.path, self.max_bytes, self.message = app, path, int(max_bytes), message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, {"detail": self.message})
            return None
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        return await self.app(scope, counting_receive, send)


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(predictor, *, max_upload_mb: float = 10.0, max_pixels: int = 40_000_000):
    """The ASGI app serving ``predictor`` (an ``instseg.Predictor``); see the module docstring."""
    fastapi = require_extra("fastapi")
    require_extra("multipart")  # python-multipart, which FastAPI's form parsing needs
    from fastapi import Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile as StarletteUploadFile

    if max_upload_mb <= 0:
        raise ServeError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    max_bytes = int(max_upload_mb * 1024 * 1024)
    too_large = f"upload larger than the server's limit of {max_upload_mb:g} MB"
    app = fastapi.FastAPI(title="instseg", description="Instance segmentation of uploaded images.")
    categories = [{"id": c, "name": n} for c, n in zip(predictor.cat_ids, predictor.classes)]

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

    async def too_large_response(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return error(413, too_large)

    app.add_exception_handler(_BodyTooLarge, too_large_response)
    # Form framing adds a little to the file's own size.
    app.add_middleware(_LimitBody, path="/predict", max_bytes=max_bytes + 64 * 1024, message=too_large)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{max_mb}}", f"{max_upload_mb:g}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.arch, "checkpoint": predictor.checkpoint,
                "classes": list(predictor.classes), "device": str(predictor.device), "tta": predictor.tta}

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_errors(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default detail is a list of dicts; answer with one readable line like the rest
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:])}: {e.get('msg', '')}" for e in exc.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.post("/predict")
    async def predict(
        request: Request,
        score_thr: float = Query(0.3, ge=0.0, le=1.0, description="keep detections scoring at least this"),
        overlay: bool = Query(False, description="also return the overlay as a base64 PNG data URL"),
    ):
        # The form is read here rather than declared as a File parameter, so a missing or non-file
        # field is our 400 with a clear message instead of FastAPI's generic 422.
        form = await request.form(max_files=1, max_fields=8)
        file = form.get("file")
        if not isinstance(file, StarletteUploadFile):
            return error(400, "no file: send the image as the multipart form field 'file'")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            return error(413, too_large)
        decoded = await run_in_threadpool(decode_upload, data, max_pixels)  # decoding a large photo takes a while
        if isinstance(decoded, tuple):
            return error(*decoded)
        name = file.filename or "upload"
        # the model call is blocking: run it in the thread pool (the Predictor's lock serialises calls)
        pred = (await run_in_threadpool(predictor.predict_arrays, [decoded], [name]))[0]
        detections = pred.to_coco(image_id=0, score_thr=score_thr)
        for d, n in zip(detections, pred.filter(score_thr).class_names):
            d["class_name"] = n
        body: dict[str, Any] = {
            "image": {"file_name": name, "height": pred.image_size[0], "width": pred.image_size[1]},
            "detections": detections,
            "categories": categories,
        }
        if overlay:
            png = io.BytesIO()
            (await run_in_threadpool(pred.draw, score_thr=score_thr)).save(png, format="PNG")
            body["overlay"] = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")
        return body

    return app


def run(predictor, host: str = "127.0.0.1", port: int = 8000, **app_kw: Any) -> None:
    """Serves :func:`create_app` with uvicorn until interrupted."""
    uvicorn = require_extra("uvicorn")
    uvicorn.run(create_app(predictor, **app_kw), host=host, port=int(port), log_level="info")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>instseg</title>
<style>
  body { font-family: sans-serif; margin: 2em; color: #222; }
  #status { margin: 1em 0; min-height: 1.2em; }
  #status.error { color: #b00020; }
  #overlay { max-width: 100%; border: 1px solid #ccc; display: none; }
  table { border-collapse: collapse; margin-top: 1em; }
  td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
</style>
</head>
<body>
<h1>instseg</h1>
<p id="model"></p>
<form id="form">
  <input type="file" id="file" name="file" accept="image/*">
  <label>score &ge; <input type="number" id="thr" value="0.3" min="0" max="1" step="0.05"></label>
  <button type="submit" id="run">Segment</button>
  <small>(at most {{max_mb}} MB)</small>
</form>
<div id="status"></div>
<img id="overlay" alt="overlay">
<table id="dets"></table>
<script>
const status = document.getElementById("status");
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
fetch("health").then(r => r.json()).then(h => {
  document.getElementById("model").textContent = `${h.model} on ${h.device}; classes: ${h.classes.join(", ")}`;
});
document.getElementById("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = document.getElementById("file").files[0];
  if (!file) { status.className = "error"; status.textContent = "choose an image first"; return; }
  const body = new FormData();
  body.append("file", file);
  status.className = ""; status.textContent = "running...";
  const thr = encodeURIComponent(document.getElementById("thr").value);
  const res = await fetch(`predict?overlay=true&score_thr=${thr}`, { method: "POST", body });
  const out = await res.json();
  if (!res.ok) { status.className = "error"; status.textContent = `${res.status}: ${out.detail}`; return; }
  const img = document.getElementById("overlay");
  img.onload = () => { img.dataset.loaded = "1"; };
  img.src = out.overlay;
  img.style.display = "block";
  status.textContent = `${out.detections.length} detections in ${out.image.width}x${out.image.height}`;
  const rows = out.detections.map(d => `<tr><td>${esc(d.class_name)}</td><td>${d.score.toFixed(3)}</td>` +
    `<td>${d.bbox.map(v => v.toFixed(1)).join(", ")}</td></tr>`);
  document.getElementById("dets").innerHTML = "<tr><th>class</th><th>score</th><th>box (x, y, w, h)</th></tr>" + rows.join("");
});
</script>
</body>
</html>
"""
