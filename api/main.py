"""The api stage: serve the status API with uvicorn until SIGTERM."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from shared.config import Settings
from shared.lifecycle import StopFlag
from shared.logging import get_logger

log = get_logger(__name__)


def run(settings: Settings, *, once: bool = False) -> int:
    """Serve the API on settings.api.host:port; `once` is ignored (the API has no queue to drain)."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down on once it restores the previous handlers; with the
    # StopFlag installed beforehand that re-raise lands on the flag, so SIGTERM ends in a clean exit 0.
    StopFlag().install()
    log.info("api_started", host=settings.api.host, port=settings.api.port,
             database=str(settings.database_path))
    try:
        server.run()
    except SystemExit as exit_:
        log.error("api_failed", host=settings.api.host, port=settings.api.port, code=exit_.code)
        return 1
    if not server.started:
        log.error("api_failed", host=settings.api.host, port=settings.api.port)
        return 1
    log.info("api_stopped", host=settings.api.host, port=settings.api.port)
    return 0
