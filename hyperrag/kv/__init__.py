"""Document KV: codecs (compression), static batch layout, and the LMCache-backed store."""
