"""The app's own limits and folders (the engine's settings live in :class:`~hyperrag.common.settings.Settings`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperrag.common.settings import Settings


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass
class AppConfig:
    """App-side limits and folders (engine settings live in :class:`Settings`)."""

    data_dir: Path
    upload_max_mb: float = 25.0  # per upload, all files together
    upload_max_files: int = 1000
    upload_max_docs: int = 5000
    keep_uploads: int = 20  # upload folders kept on disk (oldest removed first)
    keep_exports: int = 20
    allow_any_store: bool = False  # let users point the app at any store URL (trusted deployments)

    @classmethod
    def from_env(cls, settings: Settings, data_dir: str | Path | None = None, **overrides: Any) -> "AppConfig":
        folder = data_dir or os.environ.get("HYPERRAG_DATA_DIR") or Path(settings.cache_dir) / "app"
        values = dict(
            upload_max_mb=_env_float("HYPERRAG_UPLOAD_MAX_MB", cls.upload_max_mb),
            upload_max_docs=int(_env_float("HYPERRAG_UPLOAD_MAX_DOCS", cls.upload_max_docs)),
            allow_any_store=os.environ.get("HYPERRAG_ALLOW_ANY_STORE", "") in ("1", "true", "yes"),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(Path(folder).expanduser().resolve(), **values)

    @property
    def upload_max_bytes(self) -> int:
        return int(self.upload_max_mb * 2**20)

    @property
    def uploads(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def exports(self) -> Path:
        return self.data_dir / "exports"

    @property
    def stores(self) -> Path:
        return self.data_dir / "stores"
