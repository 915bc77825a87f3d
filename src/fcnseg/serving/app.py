"""The web app of ``fcnseg serve``: one hand-written page and a small HTTP API, on Starlette.

Routes:

- ``GET /``: the page (``static/index.html``, shipped with the package; it loads nothing else).
- ``GET /api/info``: the model's classes and colours, the server's defaults and caps, as JSON.
- ``POST /api/predict``: multipart field ``image`` -> the palette PNG mask (``fcnseg predict``'s
  ``<stem>.png``); query ``mode=whole|sliding`` and ``flip=0|1`` override the server's defaults.
  Headers ``X-Fcnseg-Counts`` (pixels per class, JSON), ``X-Fcnseg-Size`` (HxW) and
  ``X-Fcnseg-Seconds`` carry what the page's legend shows. A refused upload is a 4xx answer with
  ``{"error": message}``.
- ``GET /api/images`` and ``GET /api/images/{name}``: the photos of ``--images DIR`` (names from
  the folder's listing only, never a path from the request).

Model calls run in a worker thread (`anyio.to_thread`), one at a time (`Predictor`'s lock), so the
event loop keeps answering the page and ``/api/info`` while a photo is being predicted.
"""
from __future__ import annotations

import json
import mimetypes
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fcnseg.serving.predictor import PAYLOAD_TOO_LARGE, Predictor, UploadError, too_large_message

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers beside the file itself
DRAIN_FACTOR = 8  # bodies up to 8 times the cap are read (not kept) to answer 413; larger ones are cut off
# The page is self-contained: it may talk to this server and show blob: and data: pictures, nothing else.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                           "script-src 'self' 'unsafe-inline'; connect-src 'self' blob:; frame-ancestors 'none'")


def page_html() -> str:
    """The page, from the package data."""
    return resources.files("fcnseg.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(predictor: Predictor, *, images: Path | None = None) -> Starlette:
    """The ASGI app serving ``predictor`` (run it with uvicorn, or any ASGI server).

    Args:
        predictor: the model and the upload caps.
        images: a folder whose photos the page offers to pick (``--images DIR``), or None.
    """
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from fcnseg.data.io import list_images

    html = page_html()
    gallery = {p.name: p for p in list_images(images)} if images is not None else {}

    async def page(request: Request) -> Response:
        return HTMLResponse(html, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return JSONResponse({**predictor.info(), "images": sorted(gallery)})

    async def predict(request: Request) -> Response:
        return await _predict(request, predictor)

    async def image_list(request: Request) -> Response:
        return JSONResponse(sorted(gallery))

    async def image_file(request: Request) -> Response:
        return _gallery_file(gallery, request.path_params["name"])

    return Starlette(routes=[
        Route("/", page),
        Route("/api/info", info),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/images", image_list),
        Route("/api/images/{name}", image_file),
    ])


def error_response(message: str, status: int) -> Response:
    """A refusal as JSON ``{"error": message}`` with a 4xx status."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def _predict(request: Request, predictor: Predictor) -> Response:
    """``POST /api/predict``: the upload's mask, or a 4xx answer saying what is wrong with it."""
    import anyio
    from starlette.responses import Response

    try:
        body = await _read_body(request, predictor.max_upload_bytes)  # first: a client sends before it reads
        mode, flip = _options(request)
        data, filename = await _parse_form(request, body)
        result = await anyio.to_thread.run_sync(lambda: predictor.predict(data, filename, mode=mode, flip=flip))
    except UploadError as err:
        return error_response(str(err), err.status)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).stem)[:80] or "upload"
    headers = {"X-Fcnseg-Counts": json.dumps(result.counts), "X-Fcnseg-Size": f"{result.size[0]}x{result.size[1]}",
               "X-Fcnseg-Seconds": f"{result.seconds:.3f}", "Content-Disposition": f'inline; filename="{stem}.png"',
               "Cache-Control": "no-store"}
    return Response(result.png, media_type="image/png", headers=headers)


def _options(request: Request) -> tuple[str | None, bool | None]:
    """``mode`` and ``flip`` from the query string (None: the server's default)."""
    mode = request.query_params.get("mode") or None
    if mode not in (None, "whole", "sliding"):
        raise UploadError(f"mode must be whole or sliding, got {mode!r}")
    text = request.query_params.get("flip")
    if text is None or text == "":
        return mode, None
    if text.lower() not in ("0", "1", "true", "false"):
        raise UploadError(f"flip must be 0 or 1, got {text!r}")
    return mode, text.lower() in ("1", "true")


async def _read_body(request: Request, cap: int) -> bytes:
    """The request's body, read up to the byte cap (plus the form's own overhead).

    The body is counted as it arrives and kept only up to the cap, so a client that sends more than
    it declared (or declares nothing) is refused too, before the form is parsed. A body somewhat
    over the cap is read to its end (and dropped) so that the client, which sends before it reads,
    gets the 413 answer and its message rather than a broken connection.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * cap:
        # Answered without reading: a client that sends its whole body first sees the connection close.
        raise UploadError(too_large_message("upload", int(declared), cap), PAYLOAD_TOO_LARGE)
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > DRAIN_FACTOR * cap:
            break
        if received <= cap + FORM_OVERHEAD:
            body += chunk
    if received > cap + FORM_OVERHEAD:
        raise UploadError(too_large_message("upload", received, cap), PAYLOAD_TOO_LARGE)
    return bytes(body)


async def _parse_form(request: Request, body: bytes) -> tuple[bytes, str]:
    """The bytes and file name of the multipart field ``image`` of ``body``."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request as StarletteRequest

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError("send the photo as multipart/form-data in the field 'image' "
                          "(curl -F image=@photo.jpg ...)")
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=16)
    except MultiPartException as err:
        raise UploadError(f"malformed multipart upload: {err}") from None
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise UploadError("no file in the multipart field 'image'; send the photo as image=@photo.jpg")
        return await upload.read(), upload.filename or "upload"
    finally:
        await form.close()


def _gallery_file(gallery: dict[str, Path], name: str) -> Response:
    """A photo of ``--images DIR`` by its listed name (404 for anything else)."""
    from starlette.responses import FileResponse

    path = gallery.get(name)
    if path is None:
        return error_response(f"no image named {name!r} in --images", 404)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)

