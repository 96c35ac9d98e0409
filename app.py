"""HyperRAG workbench (Gradio). Filled in by the UI module; this stub only proves the engine imports."""
import hyperrag  # noqa: F401

if __name__ == "__main__":
    raise SystemExit("the app is not built yet")
