"""HyperRAG as an HTTP service: the rerank APIs RAG stacks already call (Cohere / Jina / vLLM
``/v1/rerank``, TEI ``/rerank``), an answer API, health and Prometheus metrics; document KV found
in the store by content. ``python -m hyperrag.serve --help``."""
