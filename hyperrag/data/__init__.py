"""The data layer: corpora, ingestion of real files into passages, SQuAD builders. Imports only
:mod:`hyperrag.common` and :mod:`hyperrag.model` (a tokenizer sizes the passages)."""
