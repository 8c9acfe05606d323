"""B7's hf side: lm-eval's ``hf`` backend on transformers' xLSTM, in the ``bench-hf`` interpreter.

    python -m benchmarks.hf_child --serve SETTINGS.json     (started by benchmarks.hf_backend)

On start it builds the checkpoint both sides evaluate, once: a byte-level BPE tokenizer trained
with ``tokenizers`` on the benchmark's own text (shared by the presets) and a random float32
``xLSTMForCausalLM``, both written with ``save_pretrained``. Then it answers one ``B7JSON`` line
per command read from stdin:

    load N        make lm-eval's HFLM on the directory with max_length=N (the longest request)
    warm          one untimed simple_evaluate with limit=1
    run [record]  one timed simple_evaluate; ``record`` adds every request's response
    quit

It imports torch, transformers and lm-eval, never JAX or mlflow_lmeval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

import lm_eval
import torch
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, xLSTMConfig, xLSTMForCausalLM

from .hf_protocol import PROTOCOL, ResponseRecorder, metrics_of, requests_digest, weights_digest

# ids 0 and 1, as in the GPT-NeoX vocabulary; neither string occurs in the benchmark's text
# (WikiText's "<unk>" stays plain text, split into byte-level pieces).
SPECIALS = ["<|endoftext|>", "<|padding|>"]
CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "qk_dim_factor", "v_dim_factor",
               "ffn_proj_factor", "chunk_size", "mode", "chunkwise_kernel", "sequence_kernel", "step_kernel",
               "autocast_kernel_dtype", "inference_state_dtype", "tie_word_embeddings", "weight_mode", "use_cache")


def emit(payload: dict) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(payload) + "\n")
    sys.stdout.flush()


def build_tokenizer(shared: Path, corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` pieces trained on ``corpus`` (files), kept in ``shared``
    so that every preset of one run gets the very same file. No BOS or EOS is added on encode."""
    if (shared / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(shared)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                                        pad_token=SPECIALS[1])
    tokenizer.save_pretrained(shared)
    return tokenizer


def spread_weights(model: xLSTMForCausalLM, seed: int) -> None:
    """Wider weights than transformers' init, whose zero gate weights and input-gate bias of -10
    leave the cell nearly unused and the outputs nearly uniform; float32 throughout."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                value = 1.0 + 0.2 * noise
            elif "fgate" in name and name.endswith("bias"):  # forget gates mostly open, as trained ones are
                value = torch.linspace(3.0, 6.0, param.shape[0]) + 0.5 * noise
            elif name.endswith("bias"):
                value = 0.3 * noise
            elif "embeddings" in name:
                value = noise
            else:
                value = noise * (1.0 / param.shape[-1] ** 0.5)
            param.copy_(value)


def build_checkpoint(settings: dict) -> dict:
    start = time.perf_counter()
    directory = Path(settings["model_dir"])
    tokenizer = build_tokenizer(Path(settings["tokenizer_dir"]), settings["corpus"], settings["vocab_size"])
    tokenizer.save_pretrained(directory)
    config = xLSTMConfig(
        **settings["xlstm"],
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        autocast_kernel_dtype="float32",
        inference_state_dtype="float32",
        chunk_size=settings["chunk_size"],
        mode="inference",
        use_cache=False,  # lm-eval scores whole sequences: no recurrent cache between calls
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(settings["seed"])
    model = xLSTMForCausalLM(config)
    spread_weights(model, settings["seed"])
    model.save_pretrained(directory)  # float32 safetensors
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "xlstm_config": {k: v for k, v in config.to_dict().items() if k in CONFIG_KEYS},
        "tokenizer_vocab_size": len(tokenizer),
        "build_s": time.perf_counter() - start,
    }


def loaded_params_digest(model) -> str:
    """sha256 over the names and float32 bytes of the parameters HFLM really holds."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + tensor.detach().float().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


class Instrumented:
    """HFLM with its request path counted and timed: tokens in, padded tokens, forward seconds."""

    def __init__(self, lm):
        self.lm = lm
        self.responses = ResponseRecorder(lm)
        self._tokens, self._call = lm._loglikelihood_tokens, lm._model_call
        lm._loglikelihood_tokens, lm._model_call = self._loglikelihood_tokens, self._model_call
        self.reset()

    def reset(self) -> None:
        self.model_seconds = self.forward_seconds = 0.0
        self.scored_tokens = self.input_tokens = 0
        self.shapes, self.pairs = [], []
        self.responses.reset()

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        # Each request is (strings, context tokens, continuation tokens); rolling documents arrive
        # here too, one window each (max_length covers every document, so one window).
        start = time.perf_counter()
        result = self._tokens(requests, *args, **kwargs)
        self.model_seconds += time.perf_counter() - start
        self.scored_tokens += sum(len(r[2]) for r in requests)
        self.input_tokens += sum(len((r[1] + r[2])[-(self.lm.max_length + 1):][:-1]) for r in requests)
        self.pairs += [(r[1], r[2]) for r in requests]
        return result

    def _model_call(self, inputs, *args, **kwargs):
        start = time.perf_counter()
        result = self._call(inputs, *args, **kwargs)
        self.forward_seconds += time.perf_counter() - start
        self.shapes.append(tuple(inputs.shape))
        return result

    def report(self) -> dict:
        return {
            "model_seconds": self.model_seconds,
            "forward_seconds": self.forward_seconds,
            "scored_tokens": self.scored_tokens,
            "model_input_tokens": self.input_tokens,
            "model_calls": len(self.shapes),
            "model_padded_tokens": sum(b * t for b, t in self.shapes),
            "requests_digest": requests_digest(self.pairs),
            "seconds_by_request_type": dict(self.responses.seconds),
        }


def serve(settings_path: str) -> None:
    settings = json.loads(Path(settings_path).read_text(encoding="utf-8"))
    directory = Path(settings["model_dir"])
    try:
        built = build_checkpoint(settings)
        emit({**built, "weights_digest": weights_digest(directory), "torch_threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "lm_eval": lm_eval.__version__}})
    except Exception as error:  # the parent reports it; the traceback goes to the child's log
        traceback.print_exc()
        emit({"error": f"{type(error).__name__}: {error}"})
        return
    lm = instrumented = None
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "quit":
            return
        try:
            if command == "load":
                start = time.perf_counter()
                model_args = (f"pretrained={directory},tokenizer={directory},dtype=float32,device=cpu,"
                              f"max_length={int(rest[0])}")
                lm = get_model("hf").create_from_arg_string(model_args, {"batch_size": settings["batch_size"]})
                instrumented = Instrumented(lm)
                emit({"load_s": time.perf_counter() - start, "model_args": model_args,
                      "batch_size": settings["batch_size"], "weights_digest": weights_digest(directory),
                      "loaded_params_digest": loaded_params_digest(lm.model)})
                continue
            instrumented.reset()
            start = time.perf_counter()  # the task manager is inside the timing, as in our run_lm_eval
            manager = TaskManager(include_path=settings["include_path"], include_defaults=False)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=settings["tasks"], limit=1 if command == "warm" else None, bootstrap_iters=0,
                log_samples=False, cache_requests=False, task_manager=manager,
            )
            answer = {"seconds": time.perf_counter() - start, **instrumented.report(), "metrics": metrics_of(output)}
            if "record" in rest:
                answer["responses"] = instrumented.responses.responses
            emit(answer)
        except Exception as error:
            traceback.print_exc()
            emit({"error": f"{type(error).__name__}: {error}"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the hf side of B7 (run by benchmarks.hf_backend)")
    parser.add_argument("--serve", required=True, help="JSON settings written by the parent")
    serve(parser.parse_args().serve)
