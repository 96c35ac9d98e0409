"""HyperRAG workbench: ``python app.py [--host H] [--port P] [--share] [engine flags]``.

Listens on 127.0.0.1 unless asked otherwise (--host, HYPERRAG_HOST, or GRADIO_SERVER_NAME,
which Hugging Face Spaces sets). The UI lives in hyperrag/ui.py; all work is engine calls.
"""
import argparse
import os

from hyperrag.common.settings import add_cli_args, settings_from_args


def main(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=env("HYPERRAG_HOST") or env("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(env("HYPERRAG_PORT") or env("GRADIO_SERVER_PORT") or 7860),
                        help="port (default 7860)")
    parser.add_argument("--share", action="store_true", default=env("HYPERRAG_SHARE") == "1",
                        help="also open a public gradio.live link (off by default)")
    parser.add_argument("--concurrency", type=int, default=int(env("HYPERRAG_APP_CONCURRENCY") or 0) or None,
                        help="requests worked on at once (default: batch_requests, so that many users' questions "
                             "can share model calls, hyperrag.workbench.batcher)")
    parser.add_argument("--data-dir", default=None, help="uploads, exports (default <cache-dir>/app)")
    parser.add_argument("--allow-any-store", action="store_true", default=None,
                        help="let users point the app at any store URL (trusted deployments only)")
    parser.add_argument("--no-preload", action="store_true", help="load the models on the first request")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)

    data_dir = os.path.abspath(os.path.expanduser(
        args.data_dir or env("HYPERRAG_DATA_DIR") or os.path.join(settings.cache_dir, "app")))
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(data_dir, "gradio"))  # Gradio's upload cache too
    from hyperrag import ui  # imports gradio: after GRADIO_TEMP_DIR is set
    from hyperrag.workbench.config import AppConfig
    from hyperrag.workbench.operations import Workbench

    config = AppConfig.from_env(settings, data_dir, allow_any_store=args.allow_any_store)
    workbench = Workbench(settings, config)
    if not args.no_preload:
        workbench.start_loading()
    demo = ui.build_app(workbench)
    demo.queue(default_concurrency_limit=args.concurrency or settings.batch_requests, max_size=settings.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **ui.launch_kwargs(workbench))


if __name__ == "__main__":
    main()
