"""The model layer: loading (packaged, folder, GGUF), the decoder per family, kernels, batch KV,
the static layout and prompts. Imports only :mod:`hyperrag.common`."""
