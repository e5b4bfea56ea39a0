"""Metrics as JSON lines: one object per logged step and split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["MetricsWriter", "read_metrics"]


def _py(v):
    if isinstance(v, np.generic | np.ndarray):
        v = v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Append-only ``metrics.jsonl`` writer. ``truncate_after(step)`` drops lines logged after a
    checkpoint so a resumed run's file equals an uninterrupted run's."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, split: str, metrics: dict) -> None:
        row = {"step": int(step), "split": split}
        row.update({k: _py(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` file."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows
