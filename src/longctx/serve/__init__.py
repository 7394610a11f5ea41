"""``longctx serve``: long documents over HTTP, on ``LongContextQwen3`` (book chapter "Serving long documents").

Upload a document once (it is prefilled into the strategy's cache and kept,
on disk too), then ask it questions: each continues from a copy of that
cache, so it costs only its own tokens. Plus OpenAI's chat API, so the
``openai`` client works unchanged. ``engine`` is the model side (one worker
thread, the documents, their persistence), ``app`` the HTTP side (FastAPI),
``security`` the keys and the rate limit, ``load`` a load test.
Needs the ``serve`` extra: ``pip install 'longctx[serve]'``.
"""
from __future__ import annotations

GRACE = 2.0  # seconds


def serve(model, *, strategy: str = "full", options: dict | None = None, backend: str = "mlx",
          host: str = "127.0.0.1", port: int = 8000, api_keys=None, data=None, rate: float = 60.0,
          burst: int = 20, limits=None, log_level: str = "info") -> None:
    """Run the server until interrupted (``longctx serve``'s body). SIGTERM or Ctrl-C stop it within
    about ``2 * GRACE`` seconds whatever it is doing: requests get ``GRACE`` seconds to finish,
    the model's running job as long again; an unfinished document is dropped, as a crash would
    drop it (the store keeps whole documents only)."""
    import logging
    import os
    import sys

    import uvicorn

    from longctx.serve.app import create_app
    from longctx.serve.engine import Engine
    from longctx.serve.security import Keys, RateLimiter, read_keys
    sys.setswitchinterval(0.001)  # the event loop waits at most 1 ms (not 5) for the GIL behind the model's thread
    keys = Keys(None if api_keys is None else read_keys(api_keys))
    engine = Engine(model, strategy, options, backend=backend, data=data)
    app = create_app(engine, keys, RateLimiter(rate, burst), limits)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACE)
    finally:
        if not engine.close(timeout=GRACE):
            logging.getLogger("longctx.serve").warning("stopped during a model job; its document, if any, is dropped")
            logging.shutdown()
            os._exit(1)  # the model's thread cannot be interrupted; the store holds whole documents only


__all__ = ["serve"]
