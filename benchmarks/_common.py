"""Helpers the benchmark scripts share: a plain-text table, git facts, machine facts."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def table(head: list, rows: list) -> None:
    """Print ``rows`` under ``head``: the first column left-aligned, the rest right-aligned."""
    w = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    for r in (head, ["-" * k for k in w], *rows):
        print("  ".join(str(c).ljust(k) if i == 0 else str(c).rjust(k)
                        for i, (c, k) in enumerate(zip(r, w))).rstrip())


def git(*args: str) -> str | None:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def machine(**extra) -> dict:
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "machine": platform.machine(), "python": platform.python_version(),
            "platform": platform.platform(), **extra}


def provenance() -> dict:
    """Commit and whether the tree had uncommitted changes, for a JSON record."""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
