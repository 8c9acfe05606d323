"""Local lm-eval tasks (YAML + JSONL) built from held-out documents, one of each request type.

- ``<prefix>_rolling``: one document per entry, ``loglikelihood_rolling``, the shape of ``wikitext``
  (word_perplexity, byte_perplexity, bits_per_byte);
- ``<prefix>_lastword``: predict a passage's last word, the shape of ``lambada`` (perplexity, acc);
- ``<prefix>_nextsentence``: ``multiple_choice`` between the true next sentence and distractors
  drawn from other documents (acc, acc_norm);
- ``<prefix>_complete``: ``generate_until`` the end of a line (exact_match).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

_METRICS = {
    "rolling": [
        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
    ],
    "lastword": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    ],
    "nextsentence": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
    "complete": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": False}],
}

_FIELDS = {
    "rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{page}}"},
    "lastword": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
    },
    "nextsentence": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
    },
    "complete": {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
    },
}


def _words(text: str) -> list[str]:
    return text.split()


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def rolling_docs(documents):
    return [{"name": name, "page": text} for name, text in documents if text.strip()]


def lastword_docs(documents, per_document: int = 4, max_words: int = 60):
    docs = []
    for _, text in documents:
        passages = [_words(p) for p in _paragraphs(text)]
        passages = [w[-max_words:] for w in passages if len(w) >= 12 and re.fullmatch(r"[A-Za-z]+", w[-1].rstrip(".,;:"))]
        for words in passages[:per_document]:
            words = words[:-1] + [words[-1].rstrip(".,;:")]
            docs.append({"text": " ".join(words)})
    return docs


def _sentences(text: str) -> list[str]:
    flat = " ".join(_words(text))
    return [s for s in _SENTENCE_END.split(flat) if 4 <= len(s.split()) <= 40]


def nextsentence_docs(documents, seed: int, per_document: int = 4, num_choices: int = 4):
    rng = random.Random(seed)
    sentences = [_sentences(text) for _, text in documents]
    docs = []
    for index, own in enumerate(sentences):
        others = [s for j, group in enumerate(sentences) if j != index for s in group]
        if len(others) < num_choices - 1:
            continue
        for position in range(min(per_document, len(own) - 1)):
            choices = [own[position + 1]] + rng.sample(others, num_choices - 1)
            rng.shuffle(choices)
            docs.append({"context": own[position], "choices": choices, "label": choices.index(own[position + 1])})
    return docs


def complete_docs(documents, per_document: int = 3):
    docs = []
    for _, text in documents:
        lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 6]
        for line in lines[:per_document]:
            words = line.split()
            cut = len(words) // 2
            docs.append({"prompt": " ".join(words[:cut]), "answer": " " + " ".join(words[cut:])})
    return docs


def write_tasks(directory: str | Path, documents: list[tuple[str, str]], *, prefix: str = "pydoc", seed: int = 0, data_root: str | Path | None = None) -> list[str]:
    """Write the four tasks into ``directory``; returns their names.

    JSONL paths in the YAML are absolute, or relative to ``data_root`` when given (lm-eval resolves
    them against the working directory, so a pipeline that runs from its root stays relocatable).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    builders = {
        "rolling": rolling_docs(documents),
        "lastword": lastword_docs(documents),
        "nextsentence": nextsentence_docs(documents, seed),
        "complete": complete_docs(documents),
    }
    names = []
    for kind, docs in builders.items():
        if not docs:
            raise ValueError(f"the held-out documents yield no examples for the {kind} task")
        name = f"{prefix}_{kind}"
        data = directory / f"{name}.jsonl"
        with open(data, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        data_file = str(data.absolute() if data_root is None else data.absolute().relative_to(Path(data_root).absolute()))
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": data_file}},
            "test_split": "test",
            **_FIELDS[kind],
            "metric_list": _METRICS[kind],
            "metadata": {"version": 1.0},
        }
        (directory / f"{name}.yaml").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        names.append(name)
    return names
