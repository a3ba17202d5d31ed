"""The editor server: `fimtune serve` (FastAPI routes in :mod:`.app`, the engine in :mod:`.engine`)."""
