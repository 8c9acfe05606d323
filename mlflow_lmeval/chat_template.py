"""Chat templates: which one an evaluation uses, and rendering it as transformers renders it.

lm-eval's ``hf`` backend renders chat prompts with the tokenizer's own template. Here:

1. ``--apply_chat_template`` given Jinja text (with ``{{`` or ``{%`` in it): that text.
2. A tokenizer with templates of its own (a Hugging Face directory's ``chat_template.jinja`` and
   ``additional_chat_templates/NAME.jinja``, which win over ``tokenizer_config.json``'s
   ``chat_template``, a string or a list of ``{name, template}``, as in transformers):
   ``--apply_chat_template`` alone takes its only or its ``default`` one, ``--apply_chat_template
   NAME`` its template NAME. A tokenizer with one template uses it whatever the name and warns,
   as lm-eval does.
3. A tokenizer without templates (our SentencePiece checkpoints): NAME picks one of BUILT_IN;
   without a name it is exit 2, "this tokenizer has no chat template": a guessed format would
   score the model on prompts it never saw without saying so.

Rendering follows transformers' ``apply_chat_template``: a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``{% generation %}`` blocks,
a ``tojson`` that does not escape HTML, ``raise_exception`` and ``strftime_now``; the tokenizer's
special tokens (``bos_token``, ``eos_token``, ...) as variables; with ``add_generation_prompt``
false (lm-eval's ``gen_prefix``) the last message is continued, not closed. Like lm-eval's ``hf``
backend, a template that raises on the chat is tried once more without the system message.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers' default template, written beside tokenizer_config.json
NAMED_TEMPLATES_DIR = "additional_chat_templates"  # transformers' named templates: NAME.jinja
DEFAULT_NAME = "default"  # the name transformers and lm-eval give a tokenizer's default template

# Templates for a tokenizer that has none, by name. "roles" is the form --apply_chat_template
# rendered before it read the tokenizer's template; "chatml" is the widespread <|im_start|> form.
BUILT_IN = {
    "roles": "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "chatml": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
# Appended to the message to continue, then cut off again: what the template puts after a
# message's content (its end-of-turn) goes with it. transformers does the same.
_CONTINUE = "CONTINUE_FINAL_MESSAGE_TAG "


def is_template_text(value: str) -> bool:
    """True for Jinja text, False for a template's name."""
    return "{{" in value or "{%" in value


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    text: str
    source: str  # where it came from: a file of the tokenizer, "built-in", or "--apply_chat_template"
    name: str | None = None

    @property
    def sha256(self) -> str:
        return "sha256:" + hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        """results.json's ``chat_template`` section: what the evaluation's identity keys on."""
        return {"source": self.source, "name": self.name, "sha256": self.sha256, "text": self.text}

    def _error(self, what: str, error: Exception) -> UserError:
        line = f" at line {error.lineno}" if getattr(error, "lineno", None) else ""
        named = f" {self.name!r}" if self.name else ""
        return UserError(f"the chat template{named} ({self.source}) {what}{line}: {type(error).__name__}: {error}")

    @functools.cached_property
    def _compiled(self) -> jinja2.Template:
        try:
            return _environment().from_string(self.text)
        except jinja2.TemplateError as error:
            raise self._error("cannot be rendered", error) from None

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
               special_tokens: Mapping[str, object] | None = None) -> str:
        """The prompt for ``messages`` ({role, content} dicts), as transformers' ``apply_chat_template``
        with ``continue_final_message=not add_generation_prompt`` (lm-eval's ``hf`` call) renders it."""
        try:
            return self._render(messages, add_generation_prompt, special_tokens or {})
        except jinja2.TemplateError as error:
            without_system = [m for m in messages if m.get("role") != "system"]
            if len(without_system) == len(messages):
                raise self._error("cannot be rendered", error) from None
            first = error
        warnings.warn(f"the chat template ({self.source}) refuses this chat ({first}); rendering it without the "
                      "system message, as lm-eval's hf backend does", stacklevel=2)
        try:
            return self._render(without_system, add_generation_prompt, special_tokens or {})
        except jinja2.TemplateError as error:
            raise self._error("cannot be rendered", error) from None

    def _render(self, messages, add_generation_prompt: bool, special_tokens: Mapping[str, object]) -> str:
        messages = [dict(m) for m in messages]
        if add_generation_prompt or not messages:
            return self._compiled.render(**special_tokens, messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt)
        messages[-1]["content"] = str(messages[-1].get("content", "")) + _CONTINUE
        rendered = self._compiled.render(**special_tokens, messages=messages, tools=None, documents=None,
                                         add_generation_prompt=False)
        cut = rendered.rfind(_CONTINUE.strip())
        if cut < 0:
            raise UserError(f"the chat template ({self.source}) leaves out the last message's content, so lm-eval's "
                            "gen_prefix cannot be continued")
        # The tag's own trailing space survives unless the template strips the content.
        return rendered[:cut] if rendered.startswith(_CONTINUE, cut) else rendered[:cut].rstrip()


class _Generation(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: it marks the assistant's text for
    training masks; a prompt renders the body as it is (in a scope of its own, as there)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


# ---- a tokenizer's own templates -------------------------------------------------------------------


def template_files(directory: str | Path) -> list[Path]:
    """The template files of a Hugging Face tokenizer directory (they count towards its fingerprint)."""
    directory = Path(directory)
    named = directory / NAMED_TEMPLATES_DIR
    files = sorted(named.glob("*.jinja")) if named.is_dir() else []
    return [directory / TEMPLATE_FILE] + files if (directory / TEMPLATE_FILE).is_file() else files


def read_templates(directory: str | Path, tokenizer_config: Mapping) -> dict[str, ChatTemplate]:
    """A Hugging Face tokenizer's templates by name (one unnamed template is ``default``), from its
    template files, else from ``tokenizer_config`` (the directory's tokenizer_config.json)."""
    directory = Path(directory)
    files = template_files(directory)
    if files:
        templates = {}
        for file in files:
            name = DEFAULT_NAME if file.name == TEMPLATE_FILE and file.parent == directory else file.stem
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise UserError(f"cannot read the chat template {file}: {error}") from None
            templates[name] = ChatTemplate(text, str(file.relative_to(directory)), name)
        return templates
    value = tokenizer_config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_NAME: ChatTemplate(value, TOKENIZER_CONFIG_FILE, DEFAULT_NAME)}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: ChatTemplate(t["template"], TOKENIZER_CONFIG_FILE, t["name"]) for t in value}
    raise UserError(f"{directory / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of "
                    f"{{\"name\", \"template\"}} objects, got {type(value).__name__}")


def resolve(requested: bool | str, tokenizer) -> ChatTemplate:
    """The template ``--apply_chat_template`` (True, a name or Jinja text) selects for ``tokenizer``
    (its ``chat_templates``, if it has any); the rules are in the module docstring. It is compiled
    here, so that a broken one fails before any work."""
    template = _select(requested, tokenizer)
    template._compiled  # noqa: B018 (compiled once and kept; a syntax error is a UserError now)
    return template


def _select(requested: bool | str, tokenizer) -> ChatTemplate:
    if isinstance(requested, str) and is_template_text(requested):
        return ChatTemplate(requested, "--apply_chat_template")
    name = requested if isinstance(requested, str) else None
    own: dict[str, ChatTemplate] = dict(getattr(tokenizer, "chat_templates", None) or {})
    built_in = ", ".join(BUILT_IN)
    if not own:
        if name is None:
            raise UserError(f"this tokenizer has no chat template: name a built-in one (--apply_chat_template NAME, "
                            f"NAME one of {built_in}) or give a Jinja template")
        if name not in BUILT_IN:
            raise UserError(f"--apply_chat_template {name}: this tokenizer has no chat template and {name!r} is not "
                            f"a built-in one ({built_in}); give one of those or a Jinja template")
        return ChatTemplate(BUILT_IN[name], "built-in", name)
    if len(own) == 1 and DEFAULT_NAME in own:
        template = own[DEFAULT_NAME]
        if name is not None and name != DEFAULT_NAME:
            warnings.warn(f"--apply_chat_template {name}: the tokenizer has one chat template ({template.source}), "
                          "which is used instead, as lm-eval's hf backend does", stacklevel=3)
        return template
    names = ", ".join(sorted(own))
    if name is None:
        if DEFAULT_NAME not in own:
            raise UserError(f"this tokenizer has several chat templates and none named {DEFAULT_NAME!r}: "
                            f"give one with --apply_chat_template NAME ({names})")
        return own[DEFAULT_NAME]
    if name not in own:
        raise UserError(f"--apply_chat_template {name}: the tokenizer has no chat template of that name ({names})")
    return own[name]


def special_tokens(tokenizer) -> dict[str, object]:
    """The variables a template sees besides the chat: the tokenizer's special tokens as strings
    (transformers' ``special_tokens_map``), where the tokenizer says what they are."""
    return dict(getattr(tokenizer, "special_tokens_map", None) or {})
