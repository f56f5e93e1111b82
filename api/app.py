"""The read-only status API: health, zones, changes, queue and metrics as JSON over HTTP."""

from __future__ import annotations

import math
import sqlite3
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.health import UNHEALTHY, assess_health, unreadable_health
from api.metrics import CONTENT_TYPE_LATEST, metrics_registry, render_metrics
from api.queries import read_changes, read_queue_detail, read_zones
from shared.config import Settings
from shared.db import open_database
from shared.logging import get_logger
from shared.status import reading

log = get_logger(__name__)

CHANGES_DEFAULT_LIMIT = 1000
CHANGES_MAX_LIMIT = 10000


def ensure_schema(settings: Settings) -> None:
    """Create or migrate the schema once, so a fresh device's API can open the file read-only."""
    connection = open_database(
        settings.database_path,
        busy_timeout_s=settings.database.busy_timeout_s,
        synchronous=settings.database.synchronous,
    )
    connection.close()


def _bad_request(message: str) -> HTTPException:
    """A 400 whose JSON body says what was wrong with the query."""
    return HTTPException(status_code=400, detail=message)


def _since_param(request: Request) -> float:
    """The `since` query parameter: finite unix seconds, 0 when absent, else a 400."""
    raw = request.query_params.get("since")
    if raw is None or raw == "":
        return 0.0
    try:
        since = float(raw)
    except ValueError:
        raise _bad_request(f"since must be a unix timestamp in seconds, got {raw!r}") from None
    if not math.isfinite(since):
        raise _bad_request(f"since must be a finite number, got {raw!r}")
    return since


def _limit_param(request: Request) -> int:
    """The `limit` query parameter: an integer from 1 to CHANGES_MAX_LIMIT."""
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return CHANGES_DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise _bad_request(f"limit must be an integer, got {raw!r}") from None
    if not 1 <= limit <= CHANGES_MAX_LIMIT:
        raise _bad_request(f"limit must be between 1 and {CHANGES_MAX_LIMIT}, got {limit}")
    return limit


def _settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


def health(request: Request) -> JSONResponse:
    """Overall status with its reasons; 503 when unhealthy."""
    settings = _settings(request)
    now = time.time()
    try:
        with reading(settings) as connection:
            document = assess_health(connection, settings, now)
    except sqlite3.Error as error:
        document = unreadable_health(settings, error, now)
    status_code = 503 if document["status"] == UNHEALTHY else 200
    return JSONResponse(document, status_code=status_code)


def zones(request: Request) -> JSONResponse:
    """Every zone and whether it is occupied, with per-camera counts; `?camera_id=` picks one camera."""
    settings = _settings(request)
    camera_id = request.query_params.get("camera_id") or None
    with reading(settings) as connection:
        document = read_zones(connection, settings, camera_id)
    if camera_id is not None and not document["cameras"]:
        raise HTTPException(status_code=404, detail=f"unknown camera_id {camera_id!r}")
    return JSONResponse({"device_id": settings.device_id, **document})


def changes(request: Request) -> JSONResponse:
    """Zone events after `?since=` (unix s), oldest first, at most `?limit=`."""
    settings = _settings(request)
    since = _since_param(request)
    limit = _limit_param(request)
    camera_id = request.query_params.get("camera_id") or None
    with reading(settings) as connection:
        document = read_changes(connection, since, limit, camera_id)
    return JSONResponse({"device_id": settings.device_id, **document})


def queue(request: Request) -> JSONResponse:
    """Jobs per stage and state, the oldest waiting job per stage, and the parked jobs."""
    settings = _settings(request)
    with reading(settings) as connection:
        document = read_queue_detail(connection, time.time())
    return JSONResponse({"device_id": settings.device_id, **document})


def metrics(request: Request) -> Response:
    """Prometheus text exposition, read from the database now."""
    body = render_metrics(request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def http_error(request: Request, error: Exception) -> JSONResponse:
    """HTTP errors as JSON bodies."""
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": error.detail}, status_code=error.status_code)


async def database_error(request: Request, error: Exception) -> JSONResponse:
    """A database that cannot be read answers 503, not a stack trace."""
    log.warning("api_database_unreadable", path=request.url.path, error=str(error))
    return JSONResponse({"error": f"database cannot be read: {error}"}, status_code=503)


def create_app(settings: Settings) -> Starlette:
    """The API application for these settings; makes sure the schema exists first."""
    ensure_schema(settings)
    middleware = [Middleware(GZipMiddleware, minimum_size=500)]
    if settings.api.enable_cors:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET"]))
    routes = [
        Route("/health", health),
        Route("/zones", zones),
        Route("/changes", changes),
        Route("/queue", queue),
        Route("/metrics", metrics),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, sqlite3.Error: database_error},
    )
    app.state.settings = settings
    app.state.metrics_registry = metrics_registry(settings)
    return app
