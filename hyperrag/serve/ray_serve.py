"""The service as a Ray Serve deployment: the same FastAPI app (:func:`hyperrag.serve.app.create_app`)
in ``replicas`` replicas, each loading the model once and answering through its own batcher.

Replicas share documents' KV only through the store: give them one lm:// or redis:// server
(memory:// is private to a process, and an fs:// folder only works where every replica sees it).
"""
from __future__ import annotations

import dataclasses
import signal
import time

from ray import serve

from hyperrag.common.settings import Settings
from hyperrag.rag.ray_precompute import worker_env
from hyperrag.serve.app import create_app
from hyperrag.serve.service import Service

APP_NAME = "hyperrag"


@serve.ingress()
class HyperRAGReplica:
    """One replica: its service is loaded in ``__init__``, its app built by Ray Serve after it."""

    def __init__(self, settings: dict, token: str):
        self.service = Service.load(Settings(**settings))
        self.token = token

    def __serve_build_asgi_app__(self):
        return create_app(self.service, self.token)


def deploy(settings: Settings, token: str, replicas: int, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy on the Ray this process is connected to (``ray.init`` first); the service's URL.
    Returns once every replica has loaded its model and answers."""
    if settings.store_url.startswith("memory://"):
        raise ValueError("memory:// is private to each replica: Ray Serve replicas need a shared store "
                         "(redis:// or lm://, or an fs:// folder every replica sees)")
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(HyperRAGReplica, name=APP_NAME, num_replicas=replicas,
                                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": worker_env()}},
                                  max_ongoing_requests=max(settings.queue_size, 1))
    serve.run(deployment.bind(dataclasses.asdict(settings), token), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def run_ray(settings: Settings, token: str, address: str, replicas: int, host: str, port: int) -> None:
    """The CLI's ``--ray``: connect (``auto`` starts a local Ray when none runs), deploy, serve until Ctrl-C."""
    import ray

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError:
        if address != "auto":
            raise
        ray.init(include_dashboard=False, log_to_driver=False)
    url = deploy(settings, token, replicas, host, port)
    print(f"HyperRAG on Ray Serve: {replicas} replica(s) at {url} (store {settings.store_url}); Ctrl-C or SIGTERM "
          "stops it", flush=True)
    # SIGTERM (systemd, docker, kill) stops it as cleanly as Ctrl-C; a shell's background job ignores SIGINT.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
