"""A process other than 0 in a multi-process run: it makes process 0's Engine calls in step.

Process 0 broadcasts every device-touching Engine call as a command (``distributed.send``); here
each one is received and made through ``Engine.run_command`` with the same arguments, so both
sides dispatch the same jitted steps in the same order (see ``distributed.py``).
"""

from __future__ import annotations

from ..errors import UserError
from ..models.protocol import LanguageModel
from . import distributed
from .loop import Engine


def serve(model: LanguageModel) -> int:
    """Mirror process 0's Engine calls on ``model`` until told to stop; returns the commands run.

    Each Engine is built from the settings process 0 sends, so the two sides cannot disagree
    about batch size or chunking.
    """
    engine, count = None, 0
    while True:
        name, args = distributed.receive()
        if name == distributed.STOP:
            return count
        count += 1
        if name == "engine":
            (settings,) = args
            engine = Engine(model, settings)
            continue
        if engine is None:
            raise RuntimeError(f"command {name!r} arrived before any engine was set up")
        try:
            engine.run_command(name, args)
        except UserError:
            pass  # process 0 meets the same error at the same batch and reports it
