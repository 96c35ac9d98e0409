"""The storage layer: the KV entry format, codecs, the LMCache-backed store and its backends, the planner.
Bytes only, no model code: imports only :mod:`hyperrag.common`."""
