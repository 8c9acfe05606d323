"""Which task names lm-eval knows, answered cheaply, and close names for a misspelt one.

lm-eval's ``TaskManager`` with its defaults parses all of its ~14,000 task YAML files (with their
``include:``s) before it can say whether a name exists: 14 s measured on this machine. Every task,
group and tag name of theirs is written in one of those files, so a name that appears in none of
their texts as a whole word cannot be one of lm-eval's tasks. Reading them as plain text takes
about 0.6 s of CPU, and answers "unknown" without the index; a name that does appear still goes
to the real index, which alone decides that it exists.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from pathlib import Path

_NAME_CHAR = r"[\w.\-]"  # what lm-eval's task names are made of (a match must not sit inside a longer name)
# The names a YAML defines: its top-level `task:`, `group:` and `tag:` values (suggestions only).
_DEFINED = re.compile(r"^(?:task|group|tag):[ \t]*['\"]?([\w.\-]+)", re.MULTILINE)


@functools.cache
def _lm_eval_task_text() -> str:
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in sorted(root.rglob("*.yaml")))


def may_be_lm_eval_task(name: str) -> bool:
    """False only where ``name`` is certainly none of lm-eval's own tasks, groups or tags: it is
    no glob pattern and no file (lm-eval accepts both), and no lm-eval task YAML contains it."""
    if any(char in name for char in "*?[") or Path(name).is_file():
        return True
    pattern = rf"(?<!{_NAME_CHAR}){re.escape(name)}(?!{_NAME_CHAR})"
    return re.search(pattern, _lm_eval_task_text()) is not None


def lm_eval_task_names() -> list[str]:
    """The names lm-eval's task YAMLs define on a top-level line, found without parsing them
    (tags written as a YAML list are missed; good enough to suggest names, never to decide)."""
    return sorted(set(_DEFINED.findall(_lm_eval_task_text())))


def close_names(name: str, *candidates: Iterable[str], count: int = 3) -> list[str]:
    """Up to ``count`` names close to ``name`` (difflib's ratio of at least 0.6), from each group of
    ``candidates`` in turn: the first group's matches come first."""
    found: list[str] = []
    for group in candidates:
        found += [match for match in difflib.get_close_matches(name, list(group), n=count) if match not in found]
    return found[:count]
