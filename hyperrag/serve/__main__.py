"""Serve HyperRAG over HTTP.

    python -m hyperrag.serve --host 127.0.0.1 --port 8080 [--corpus DIR] [--store URL] [--token-file F]
    python -m hyperrag.serve --ray [ADDRESS] --replicas 2 --store redis://127.0.0.1:6379

Routes: POST /v1/rerank (Cohere v1/v2, Jina, vLLM; also /v2/rerank), POST /rerank (TEI),
POST /v1/answer, GET /health, GET /metrics; the OpenAPI page at /docs. Every engine setting is
a flag or a HYPERRAG_<NAME> variable (--help lists them); the limits are serve_max_body_mb,
serve_max_documents, max_doc_tokens and queue_size. With --ray the same app runs as a Ray Serve
deployment of --replicas replicas, each loading the model once; give them one shared lm:// or
redis:// store so a document computed by one replica is reused by the others.
"""
from __future__ import annotations

import argparse
import logging


def build_parser() -> argparse.ArgumentParser:
    from hyperrag.common.settings import add_cli_args

    parser = argparse.ArgumentParser(prog="python -m hyperrag.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    serve = parser.add_argument_group("service")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--store", dest="store_url", default=None,
                       help="KV store URL: fs://DIR (default <cache-dir>/kv), memory://, lm://HOST:PORT, redis://HOST:PORT")
    serve.add_argument("--token-file", default=None,
                       help="file whose first line is the bearer token every request but /health must send")
    serve.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                       help="run as a Ray Serve deployment: on the Ray at ADDRESS (ray://HOST:PORT or auto), or a "
                            "local one when ADDRESS is left out and none is running")
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray; default 1)")
    add_cli_args(parser, skip=("store_url",))
    return parser


def main(argv: list[str] | None = None) -> None:
    from hyperrag.common.settings import settings_from_args
    from hyperrag.serve.limits import read_token

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.replicas < 1:
        raise SystemExit("--replicas must be >= 1")
    settings = settings_from_args(args)
    token = read_token(args.token_file)
    if args.ray is not None:
        from hyperrag.serve.ray_serve import run_ray

        run_ray(settings, token, args.ray, args.replicas, args.host, args.port)
        return
    import uvicorn

    from hyperrag.serve.app import create_app
    from hyperrag.serve.service import Service

    service = Service.load(settings)
    print(f"HyperRAG serving {service.model_name} at http://{args.host}:{args.port} (API docs at /docs; store "
          f"{service.engine.store.display_url}, corpus {len(service.engine.corpus.docs)} documents)", flush=True)
    try:
        uvicorn.run(create_app(service, token), host=args.host, port=args.port, log_level="warning")
    finally:
        service.close()
        service.engine.close()


if __name__ == "__main__":
    main()
