"""Settings and process-wide helpers every layer may use; imports nothing else of hyperrag."""
