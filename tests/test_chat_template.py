"""--apply_chat_template renders with the tokenizer's own template, as lm-eval's hf backend does;
a built-in one only by name for a tokenizer without one; no template at all is exit 2. The
template's text keys the request cache and the evaluation's identity.

The expected prompts come from Jinja itself, in the environment transformers renders chat
templates with (sandboxed, trim_blocks, lstrip_blocks), not from our renderer."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from test_bad_inputs import write_task

from mlflow_lmeval import EvalConfig
from mlflow_lmeval.config import score_settings
from mlflow_lmeval.errors import UserError
from mlflow_lmeval.evaluation import evaluate

SINGLE = Path(__file__).parent / "fixtures" / "hf_xlstm" / "single"
DOCUMENTS = ("hello world", "the cat sat")
# Indented block tags and a newline after each: they render as nothing only with trim_blocks and
# lstrip_blocks, as in transformers. bos_token and eos_token come from tokenizer_config.json.
TEMPLATE_A = ("{{ bos_token }}{% for message in messages %}\n    {% if message['role'] == 'user' %}\n"
              "[INST] {{ message['content'] }} [/INST]{{ eos_token }}\n    {% endif %}\n{% endfor %}\n"
              "{% if add_generation_prompt %}ANSWER:{% endif %}")
TEMPLATE_B = "{% for message in messages %}<<{{ message['role'] }}>>{{ message['content'] }}\n{% endfor %}>>"


def transformers_render(template, messages, **variables):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **variables)


def hf_copy(tmp_path, name, **tokenizer_config):
    """The HF fixture (a tiny xLSTM) copied, with these entries added to its tokenizer_config.json."""
    directory = Path(shutil.copytree(SINGLE, tmp_path / name))
    config_path = directory / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **tokenizer_config}))
    return directory


def run(checkpoint, tasks, output, **overrides):
    config = {"evaluation_tasks": ["chat"], "include_path": str(tasks), "log_samples": True, "output_path": str(output),
              "bootstrap_iters": 0, "response_cache": False, "apply_chat_template": True, **overrides}
    results = evaluate(checkpoint, EvalConfig.from_dict(config), show_progress=False)
    samples = [json.loads(line) for line in (output / "samples_chat.jsonl").read_text().splitlines()]
    return results, [sample["arguments"][0][0] for sample in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.fixture
def tasks(tmp_path):
    write_task(tmp_path / "tasks", "chat", b"".join(json.dumps({"text": t}).encode() + b"\n" for t in DOCUMENTS))
    return tmp_path / "tasks"


def test_the_checkpoints_own_template_renders_the_prompts(tmp_path, tasks):
    checkpoint = hf_copy(tmp_path, "with_template", chat_template=TEMPLATE_A)
    results, prompts = run(checkpoint, tasks, tmp_path / "out")
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}  # the fixture's tokenizer_config.json
    assert prompts == [transformers_render(TEMPLATE_A, [{"role": "user", "content": text}], **specials)
                       for text in DOCUMENTS]
    assert prompts[0] == "<|endoftext|>[INST] hello world [/INST]<|endoftext|>\nANSWER:"  # what the render above says
    section = results["chat_template"]
    assert (section["source"], section["text"]) == ("tokenizer_config.json", TEMPLATE_A)


def test_two_templates_share_no_request_cache_entry_and_no_identity(tmp_path, tasks, monkeypatch):
    """The second copy differs only by a chat_template.jinja, which wins over tokenizer_config.json
    (transformers' rule); with lm-eval's request cache on, its prompts are its own, not the first's."""
    from mlflow_lmeval.tracking.identity import settings_digest

    monkeypatch.setenv("MLFLOW_LMEVAL_CACHE", str(tmp_path / "cache"))
    first = hf_copy(tmp_path, "a", chat_template=TEMPLATE_A)
    second = Path(shutil.copytree(first, tmp_path / "b"))
    (second / "chat_template.jinja").write_text(TEMPLATE_B)
    results_a, prompts_a = run(first, tasks, tmp_path / "out_a", cache_requests=True)
    results_b, prompts_b = run(second, tasks, tmp_path / "out_b", cache_requests=True)
    assert prompts_b == [transformers_render(TEMPLATE_B, [{"role": "user", "content": text}]) for text in DOCUMENTS]
    assert prompts_a != prompts_b and results_b["chat_template"]["source"] == "chat_template.jinja"
    assert len(list((tmp_path / "cache" / "lm_eval_requests").iterdir())) == 2
    assert results_a["checkpoint"]["fingerprint"] != results_b["checkpoint"]["fingerprint"]  # the .jinja counts
    # The same score settings (apply_chat_template: true), two templates: two settings digests.
    assert score_settings(results_a["eval_config"]) == score_settings(results_b["eval_config"])
    assert settings_digest(results_a) != settings_digest(results_b)
    assert settings_digest({**results_b, "chat_template": results_a["chat_template"]}) == settings_digest(results_a)


def test_a_named_built_in_template_serves_a_sentencepiece_checkpoint(checkpoint, tmp_path, tasks):
    _, prompts = run(checkpoint.path, tasks, tmp_path / "out", apply_chat_template="chatml", system_instruction="Be brief.")
    assert prompts == [f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
                       "<|im_start|>assistant\n" for text in DOCUMENTS]


def test_no_template_anywhere_is_exit_2_before_any_work(checkpoint, tmp_path, tasks):
    command = [sys.executable, "-m", "mlflow_lmeval.cli", "evaluate", "--checkpoint", str(checkpoint.path), "--tasks",
               "chat", "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--no_tracking",
               "--apply_chat_template"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("error: this tokenizer has no chat template: "), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "results.json").exists()


def tokenizer_with(tmp_path, files=None, **tokenizer_config):
    from mlflow_lmeval.tokenizer import HFTokenizer

    directory = tmp_path / "tok"
    directory.mkdir(parents=True)
    shutil.copy(SINGLE / "tokenizer.json", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", **tokenizer_config}))
    for name, text in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return HFTokenizer.load(directory)


def test_which_template_a_name_selects(tmp_path):
    from mlflow_lmeval.chat_template import resolve

    named = tokenizer_with(tmp_path / "1", chat_template=[{"name": "plain", "template": "P"}, {"name": "tools", "template": "T"}])
    assert resolve("tools", named).text == "T"
    with pytest.raises(UserError, match="several chat templates and none named 'default'.*plain, tools"):
        resolve(True, named)
    with pytest.raises(UserError, match="no chat template of that name \\(plain, tools\\)"):
        resolve("chatml", named)
    files = tokenizer_with(tmp_path / "2", {"chat_template.jinja": "D", "additional_chat_templates/rag.jinja": "R"},
                           chat_template="ignored: the files win")
    assert (resolve(True, files).text, resolve("rag", files).text, resolve("rag", files).source) == (
        "D", "R", "additional_chat_templates/rag.jinja")
    single = tokenizer_with(tmp_path / "3", chat_template="S")
    with pytest.warns(UserWarning, match="chatml: the tokenizer has one chat template"):
        assert resolve("chatml", single).text == "S"  # as lm-eval's hf backend: a name picks among named ones only
    with pytest.raises(UserError, match="tokenizer_config.json: chat_template must be a string or a list .*got dict"):
        tokenizer_with(tmp_path / "4", chat_template={"name": "x"})
    broken = tokenizer_with(tmp_path / "6", chat_template="{% for m in messages %}")
    with pytest.raises(UserError, match="template 'default' \\(tokenizer_config.json\\) cannot be rendered at line 1"):
        resolve(True, broken)  # when it is chosen, before any prompt is rendered
    bare = tokenizer_with(tmp_path / "5")
    assert resolve("roles", bare).source == "built-in"
    with pytest.raises(UserError, match="'nosuch' is not a built-in one \\(roles, chatml\\)"):
        resolve("nosuch", bare)


def test_rendering_follows_transformers_and_lm_evals_hf_call(tmp_path):
    """gen_prefix (add_generation_prompt false) continues the last message instead of closing it;
    a template that refuses a system message is rendered without it (lm-eval's hf retry), with a
    warning; {% generation %}, loop controls and an HTML-safe tojson render as in transformers."""
    from mlflow_lmeval.chat_template import ChatTemplate

    closing = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}", "test")
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer:"}]
    assert closing.render(chat, add_generation_prompt=False) == "<user>Q?</s><assistant>Answer:"
    with pytest.raises(UserError, match="leaves out the last message's content"):
        ChatTemplate("{% for m in messages %}<{{ m.role }}>{% endfor %}", "test").render(chat, add_generation_prompt=False)
    strict = ChatTemplate("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                          "{% endif %}{{ m.content }}{% endfor %}", "test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert strict.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "U"
    assert any("without the system message" in str(w.message) for w in caught)
    rich = ChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}"
                        "{{ m | tojson }}{% endgeneration %}{% endfor %}", "test")
    assert rich.render([{"role": "user", "content": "<a & b>"}, {"role": "user", "content": "x"}]) == (
        '{"role": "user", "content": "<a & b>"}')
    with pytest.raises(UserError, match="the chat template \\(test\\) cannot be rendered at line 1: TemplateSyntaxError"):
        ChatTemplate("{% for m in messages %}{{ m }", "test").render(chat)
