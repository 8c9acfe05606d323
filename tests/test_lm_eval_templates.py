"""lm-eval's prompt templates compiled once: the same strings and errors as lm-eval's own rendering."""

import pytest
from jinja2.exceptions import UndefinedError
from lm_eval import utils

from mlflow_lmeval.lm_eval_templates import cached_templates

TEMPLATES = [
    "Question: {{question}}\nAnswer:",
    "{{choices | join(', ')}}",
    "{{ text | regex_replace('[xy]', '#') }}",
    "{% for c in choices %}{{ loop.index }}. {{ c }}\n{% endfor %}",
    " {{answer}}",
]
DOCS = [
    {"question": "Who?", "choices": ["a", "b  c"], "text": "x \n  y", "answer": 3},
    {"question": "What {{not}} now", "choices": ["é", ""], "text": "", "answer": "z"},
]


def test_renders_exactly_what_lm_eval_renders_and_compiles_each_template_once(monkeypatch):
    expected = [utils.apply_template(t, d) for t in TEMPLATES for d in DOCS]
    compiles = []
    from_string = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda source: compiles.append(source) or from_string(source))
    with cached_templates():
        rendered = [utils.apply_template(t, d) for _ in range(3) for t in TEMPLATES for d in DOCS]
    assert rendered == expected * 3
    assert sorted(compiles) == sorted(TEMPLATES)  # 5 compiles for 30 renders


def test_missing_fields_still_raise_and_the_original_comes_back():
    original = utils.apply_template
    with cached_templates():
        assert utils.apply_template is not original
        with pytest.raises(UndefinedError):
            utils.apply_template("{{missing}}", {"question": "q"})
    assert utils.apply_template is original
