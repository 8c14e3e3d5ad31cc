"""`das serve`: a local web page and JSON API that attribute uploaded images (Starlette on uvicorn).

- ``GET /``: an upload form (image, and a prompt for text-conditioned models) and links to the
  stored query sets' report pages.
- ``POST /attribute`` (form): the answer as a page (``report.rows_html``) in the reports folder.
- ``POST /api/attribute`` (multipart ``image``, optional ``prompt``): the JSON of
  `das attribute --json`.
- ``GET /reports/...``: the reports folder (thumbnails, report pages), read-only.

The model, factors and train features are loaded once at start-up (``attribute.Attributor``);
model use is serialised by its lock, the store is only read, and nothing is written outside the
reports folder (uploads go to a temporary folder under ``<reports>/attribute`` with sanitised
names and are removed after use). Uploads over ``MAX_UPLOAD_BYTES`` get 413, non-images 415,
images the model cannot take (size, mode, missing prompt) 422, malformed requests 400.
"""

from __future__ import annotations

import time
from html import escape

from .attribute import Attributor, NotAnImage, answer
from .config import Config
from .errors import DataError
from .report import html_page

MAX_UPLOAD_BYTES = 10 << 20


def build_app(cfg: Config, attributor: Attributor | None = None):
    """The Starlette application of one config (loads the model and factors unless given)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    att = attributor or Attributor(cfg, keep_train=True)
    reports = cfg.reports_dir
    (reports / "attribute").mkdir(parents=True, exist_ok=True)

    def fail(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def upload(request):
        """(name, bytes, prompt) of the request's ``image`` field, or an error response."""
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return fail(411, "send the upload with a Content-Length header")
        if int(length) > MAX_UPLOAD_BYTES + 65536:
            return fail(413, f"upload of {int(length)} bytes is over the limit of "
                        f"{MAX_UPLOAD_BYTES} bytes; send a smaller image")
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=MAX_UPLOAD_BYTES)
        except (MultiPartException, HTTPException) as err:
            return fail(400, f"malformed multipart form ({getattr(err, 'message', err)})")
        image = form.get("image")
        if image is None or isinstance(image, str):
            return fail(400, "no file in the multipart field 'image'; send the image as that field")
        data = await image.read()
        if len(data) > MAX_UPLOAD_BYTES:
            return fail(413, f"image of {len(data)} bytes is over the limit of {MAX_UPLOAD_BYTES}")
        prompt = form.get("prompt")
        return image.filename or "upload.png", data, (prompt or None) if isinstance(prompt, str) else None

    async def attribute(request, page: bool):
        got = await upload(request)
        if isinstance(got, JSONResponse):
            return got
        name, data, prompt = got
        try:
            result = await run_in_threadpool(att.attribute, [(name, data)], prompt)
            if page:
                path = await run_in_threadpool(att.write_page, result)
                return RedirectResponse(f"/reports/attribute/{path.name}", status_code=303)
        except NotAnImage as err:
            return fail(415, str(err))
        except DataError as err:
            return fail(422, str(err))
        return JSONResponse(answer(result))

    async def api_attribute(request):
        return await attribute(request, page=False)

    async def form_attribute(request):
        return await attribute(request, page=True)

    async def home(request):
        prompt = ("<p><label>prompt <input name='prompt' size='60' required></label></p>"
                  if att.conditional else "")
        sets = []
        for name in cfg.data.queries:
            first = reports / name / "page-001.html"
            sets.append(f"<li><a href='/reports/{escape(name)}/page-001.html'>{escape(name)}</a></li>"
                        if first.is_file() else f"<li>{escape(name)} (no report yet: `das report "
                        f"CONFIG`)</li>")
        index = ("<p><a href='/reports/index.html'>the run's report</a></p>"
                 if (reports / "index.html").is_file() else "")
        body = (f"<h1>attribute an image</h1><form method='post' action='/attribute' "
                f"enctype='multipart/form-data'><p><input type='file' name='image' "
                f"accept='image/png,image/jpeg' required></p>{prompt}<p><button>attribute"
                f"</button></p></form><p class='small'>PNG or JPEG, at most "
                f"{MAX_UPLOAD_BYTES >> 20} MB; {att.scorer.num_train} training images, methods "
                f"{', '.join(att.scorer.methods)}</p><h2>stored query sets</h2><ul>{''.join(sets)}"
                f"</ul>{index}")
        return HTMLResponse(html_page("das serve", body))

    return Starlette(routes=[
        Route("/", home),
        Route("/attribute", form_attribute, methods=["POST"]),
        Route("/api/attribute", api_attribute, methods=["POST"]),
        Mount("/reports", app=StaticFiles(directory=reports, html=True)),
    ])


def run_serve(cfg: Config, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the model and factors once, then serve until interrupted."""
    import uvicorn

    started = time.perf_counter()
    app = build_app(cfg)
    print(f"serve: model and factors loaded in {time.perf_counter() - started:.1f} s; "
          f"http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
