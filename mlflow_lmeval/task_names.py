"""Which task names lm-eval knows, answered cheaply, and close names for a misspelt one.

lm-eval's ``TaskManager`` with its defaults parses all of its ~14,000 task YAML files (with their
``include:``s) before it can say whether a name exists: 14 s measured on this machine. Every task,
group and tag name of theirs is written in one of those files or in a file they include (which
need not end in .yaml: ``_template_yaml``, ``_gen_yaml_2shot``), so a name that appears as a whole
word in no file of lm-eval's task tree but its Python sources cannot be one of lm-eval's tasks.
Reading that tree as plain text (9 MB) takes about 0.7 s of CPU and answers "unknown" without the
index; a name that does appear still goes to the real index, which alone decides that it exists.
Checked against lm-eval 0.4.13's index: each of its 14,683 names appears.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from pathlib import Path

_NAME_CHAR = r"[\w.\-]"  # what lm-eval's task names are made of (a match must not sit inside a longer name)
# The names a YAML defines (suggestions only): its top-level `task:`, `group:` and `tag:` values,
# and the items of a `tag:` list.
_DEFINED = re.compile(r"^(?:task|group|tag):[ \t]*['\"]?([\w.\-]+)", re.MULTILINE)
_TAG_LIST = re.compile(r"^tag:[ \t]*\n((?:[ \t]+-[ \t]*\S+[ \t]*\n)+)", re.MULTILINE)


@functools.cache
def _lm_eval_task_text() -> str:
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    files = (path for path in sorted(root.rglob("*")) if path.is_file() and path.suffix not in (".py", ".pyc"))
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def may_be_lm_eval_task(name: str) -> bool:
    """False only where ``name`` is certainly none of lm-eval's own tasks, groups or tags: it is
    no glob pattern and no file (lm-eval accepts both), and no lm-eval task YAML contains it."""
    if any(char in name for char in "*?[") or Path(name).is_file():
        return True
    pattern = rf"(?<!{_NAME_CHAR}){re.escape(name)}(?!{_NAME_CHAR})"
    return re.search(pattern, _lm_eval_task_text()) is not None


def lm_eval_task_names() -> list[str]:
    """Most names lm-eval's task YAMLs define, found without parsing them: good enough to suggest
    names, never to decide."""
    text = _lm_eval_task_text()
    listed = (item.strip().lstrip("-").strip().strip("'\"") for block in _TAG_LIST.findall(text) for item in block.splitlines())
    return sorted(set(_DEFINED.findall(text)) | set(listed))


def close_names(name: str, *candidates: Iterable[str], count: int = 3) -> list[str]:
    """Up to ``count`` names close to ``name`` (difflib's ratio of at least 0.6), from each group of
    ``candidates`` in turn: the first group's matches come first."""
    found: list[str] = []
    for group in candidates:
        found += [match for match in difflib.get_close_matches(name, list(group), n=count) if match not in found]
    return found[:count]
