"""Where the running code comes from: git, when it runs from a checkout (recorded with runs and benchmark results)."""
from __future__ import annotations

import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def checkout_git(*args: str) -> str | None:
    """`git ARGS` in this checkout, or None when the code does not run from one or git fails."""
    # Only in a checkout: an installed package may sit inside some other repository (a venv in a checkout).
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str | None:
    return checkout_git("rev-parse", "HEAD") or None
