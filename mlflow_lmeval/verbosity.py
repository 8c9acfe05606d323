"""What a command-line run prints besides its own lines: libraries' routine notices only with --verbose.

A normal run shows our progress, our warnings and notices, lm-eval's table and every library's
warnings and errors that matter. It leaves out lm-eval's routine notices (a metric's default
aggregation, the ``num_fewshot`` asked for replacing a task's, at WARNING on every run), MLflow's
INFO lines (creating a store's tables), datasets' progress bars, and the location and source line
Python prints under a warning. ``--verbose`` shows all of it, lm-eval's INFO lines too.

Only levels, the documented environment switches and Python's warning format are set, at the edge
(the console entry point): no library is patched.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_LIBRARY_FORMAT = "%(levelname)s %(name)s: %(message)s"
_handler: logging.Handler | None = None


class _Formatter(logging.Formatter):
    """Our records in the style of our error lines (``warning: ...``); a library's with its level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name.partition(".")[0] == __package__:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)


def _one_line(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` of a normal run: the message alone (its code location helps a developer)."""
    return f"warning: {message}\n"


def configure(verbose: bool) -> None:
    """Set, for this process, what libraries print: their routine notices only if ``verbose``.

    Must run before MLflow is imported (it reads MLFLOW_LOGGING_LEVEL then); a level the user set in
    MLFLOW_LOGGING_LEVEL or LMEVAL_LOG_LEVEL stays theirs.
    """
    global _handler
    root = logging.getLogger()
    if _handler is None:  # one handler however often this runs; installed first, so grain's basicConfig adds none
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(_Formatter(_LIBRARY_FORMAT))
        root.addHandler(_handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if "LMEVAL_LOG_LEVEL" not in os.environ:
        # lm-eval's own notices are WARNING records: its defaults applied, as a normal run asks.
        logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)
    if verbose:
        warnings.formatwarning = _default_format
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "mlflow" in sys.modules:  # already configured from the environment at its import
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    warnings.formatwarning = _one_line


_default_format = warnings.formatwarning
