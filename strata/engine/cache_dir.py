"""Where strata caches models and converted tokenizers (one place, read by both)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "STRATA_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where models are cached: $STRATA_CACHE_DIR, else ~/.cache/strata/models."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "strata" / "models"
