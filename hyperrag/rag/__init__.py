"""The RAG layer: runtime, retrieval, the shared batch runner, reranker, reader, generator,
precompute, modes and metrics. Imports the layers below it (common, model, kv, data), never the
workbench or a front door."""
