"""The search page (`/ui`: plain HTML, CSS and JS from this package, nothing from a network)
and the thumbnails it shows (`/thumbnails/{version}/{row}`, immutable per index version)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path
from starlette.requests import Request
from starlette.responses import Response

from clipsearch.core.errors import NotFound
from clipsearch.index.format import Thumbnails
from clipsearch.service.http.deps import State

router = APIRouter(include_in_schema=False)

_PAGE_FILES = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
_STATIC = resources.files("clipsearch.service.http") / "static"


def _static(name: str) -> Response:
    data = (_STATIC / name).read_bytes()
    # The page's files change with the package, not per request: a short cache, revalidated.
    return Response(data, media_type=_PAGE_FILES[name] + "; charset=utf-8",
                    headers={"cache-control": "public, max-age=300", "x-content-type-options": "nosniff"})


@router.get("/ui")
async def page() -> Response:
    """The search page."""
    response = _static("index.html")
    response.headers["content-security-policy"] = (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'")
    return response


@router.get("/ui/{name}")
async def page_file(name: str) -> Response:
    if name not in _PAGE_FILES or name == "index.html":
        raise NotFound(f"no page file {name!r}")
    return _static(name)


@router.get("/thumbnails/{version}/{row}")
async def thumbnail(version: str, row: Annotated[str, Path(pattern=r"^[0-9]{1,12}$", description="the item's row")],
                    request: Request, state: State) -> Response:
    """One image item's thumbnail. A version's thumbnails never change, so the URL names the
    version and is cached for good; once the version is no longer served it is 404."""
    current = state.indexes.current
    index = current.get("image") if current is not None and current.version == version else None
    if index is None:
        raise NotFound(f"index version {version!r} is not served (search again for current results)")
    number = int(row)  # digits only: "+5" or "5.0" is a 422, not another spelling of row 5
    tag = f'"{version}-{number}"'
    # Under API keys a shared cache must not hand a thumbnail to a caller without one.
    cache = "private" if state.settings.has_api_keys else "public"
    headers = {"etag": tag, "cache-control": f"{cache}, max-age=31536000, immutable"}
    if state.settings.has_api_keys:
        headers["vary"] = "authorization"
    if request.headers.get("if-none-match") == tag and index.has_thumbnail(number):
        return Response(status_code=304, headers=headers)
    data = index.thumbnail(number)
    if not data:
        raise NotFound(f"no thumbnail for row {row} of version {version}")
    return Response(data, media_type=Thumbnails.MEDIA_TYPE, headers=headers)
