"""How a run reports what went wrong: one line for a user's error (a config key, a path, a file, a value), the
traceback first for anything else."""
from __future__ import annotations

import os
import traceback
from pathlib import Path

from engine.config import ConfigError

# Bad input, raised with a message that names the key, file or value at fault; OSError covers missing, unreadable
# and unwritable paths.
USER_ERRORS = (ConfigError, OSError, ValueError)
OUR_PACKAGES = tuple(Path(__file__).resolve().parents[1] / name
                     for name in ("engine", "dataloading", "kernels", "benchmarks"))


def error_report(err: BaseException, prefix: str = "seer") -> str:
    """One line "PREFIX: error: ..." when this project raised a user error (its messages name what is at fault) or
    the OS refused a path; the traceback first when a library raised it (perhaps a bug here, and its message may not
    say which file or value), or when it is not a user error, or always with SEER_TRACEBACK=1."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = bool(frames) and any(Path(frames[-1].filename).resolve().is_relative_to(p) for p in OUR_PACKAGES)
    # An OS error about a path (missing, unwritable, not a folder) names it, wherever it was raised.
    about_a_path = isinstance(err, OSError) and err.filename is not None
    line = f"{prefix}: error: {err}"
    if isinstance(err, USER_ERRORS) and (ours or about_a_path) and os.environ.get("SEER_TRACEBACK", "0") == "0":
        return line
    return "".join(traceback.format_exception(err)) + line
