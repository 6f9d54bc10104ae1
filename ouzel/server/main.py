"""Start the server: load the model, start the engine thread, run uvicorn."""
from __future__ import annotations

import logging

from .engine import ServeConfig, ServeEngine

log = logging.getLogger("ouzel.server")


def build_engine(cfg: ServeConfig, device: str = "cpu") -> ServeEngine:
    from .. import api
    llm = api.load(cfg.model, device=device, ctx=cfg.ctx)
    return ServeEngine(llm, cfg).start()


def serve(cfg: ServeConfig, device: str = "cpu") -> int:
    import uvicorn

    from .app import create_app
    engine = build_engine(cfg, device)
    app = create_app(engine)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use it", cfg.host)
    print(f"ouzel serve: {engine.model_id} on http://{cfg.host}:{cfg.port} (ctx {engine.llm.ctx}, "
          f"{engine.pool.n_blocks} KV blocks of {cfg.block_size}, max batch {cfg.max_batch}"
          + (f", disk tier {cfg.kv_disk_dir}" if cfg.kv_disk_dir else "") + ")", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=2)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()  # uvicorn handled SIGINT/SIGTERM; queued KV blocks are flushed to disk here
    return 0
