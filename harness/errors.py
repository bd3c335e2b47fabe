"""The harness's one error type.

Every expected failure is a `HarnessError`: `str(e)` is one line that starts with the
error's kind (e.g. ``config error: train.epochs = 0 (expected an integer >= 1)``), and
`exit_code` is what `harness` exits with: 2 for bad input of any kind (config, search
space, data, paths, resources), 1 for a failure while a run was under way. The CLI
catches this type alone; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["HarnessError", "BAD_INPUT", "RUN_FAILED", "INTERRUPTED"]

BAD_INPUT, RUN_FAILED, INTERRUPTED = 2, 1, 130


class HarnessError(Exception):
    """Base of every expected failure. Subclasses set `kind` and `exit_code`."""

    kind = "error"
    exit_code = RUN_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))  # always one line
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.kind}: {self.args[0]}"
