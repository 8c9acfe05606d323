"""The ``mlflow-lmeval`` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from . import compare_report, response_cache, verbosity
from . import config as config_module
from .config import EvalConfig
from .errors import UserError
from .evaluation import serve_checkpoint
from .pipeline import stages
from .pipeline.params import load_params
from .response_cache import ResponseCache
from .tokenizer import Tokenizer, train_tokenizer
from .tracking import sync
from .workflows import LiveEvaluation, Tracking, check_destinations, evaluate_and_publish, tracked_training

# JAX (the model, training and engine modules) and lm_eval are imported lazily, where a command
# needs them: importing JAX takes about 1.8 s and lm_eval.utils 0.3 s on this machine, and
# `mlflow-lmeval --help`, `sync`, `cache` and `compare` need neither.


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _cmd_tokenizer(args) -> None:
    tokenizer = train_tokenizer(args.input, args.vocab_size, args.output)
    print(f"wrote {args.output} (vocabulary {tokenizer.vocab_size})")


def _tracking(args):
    return Tracking(enabled=not args.no_tracking, tracking_uri=args.tracking_uri, experiment=args.experiment)


def _add_tracking_flags(parser, what: str) -> None:
    parser.add_argument("--tracking_uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db)")
    parser.add_argument("--experiment", help=f"MLflow experiment for the {what}")
    parser.add_argument("--no_tracking", action="store_true", help="do not log to MLflow")


def _cmd_train(args) -> None:
    from .models import mlstm
    from .training import TrainSettings, encode_corpus, print_progress, save_steps_every

    tokenizer = Tokenizer.load(args.tokenizer)
    config = mlstm.preset_config(args.model_size, tokenizer.vocab_size)
    settings = TrainSettings(
        steps=args.steps,
        save_steps=save_steps_every(args.steps, args.save_every),
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        learning_rate=args.learning_rate,
        seed=args.seed,
    ).validate()
    tokens = encode_corpus(args.corpus, tokenizer)
    print(
        f"training {args.model_size} mLSTM ({mlstm.count_params(mlstm.init_params(config)):,} params) "
        f"on {len(tokens):,} tokens",
        flush=True,
    )
    live = LiveEvaluation()
    if args.eval_every:
        if not args.eval_tasks:
            raise UserError("--eval_every needs --eval_tasks")
        live = LiveEvaluation(args.eval_every, EvalConfig(
            evaluation_tasks=args.eval_tasks, include_path=args.include_path, limit_requests=args.eval_limit,
            bootstrap_iters=args.bootstrap_iters))
    paths = tracked_training(tokens, tokenizer, config, settings, args.output, tracking=_tracking(args), live=live,
                             on_log=print_progress(args.steps))
    for path in paths:
        print(f"wrote {path}")


def _is_process_0(args) -> bool:
    """Will this process write the results and publish them? Known before JAX starts, unless the
    cluster's own settings decide (--distributed). The variable is engine.distributed.PROCESS_ID_ENV,
    spelled out here because that module imports JAX."""
    process_id = args.process_id if args.process_id is not None else os.environ.get("MLFLOW_LMEVAL_PROCESS_ID", "")
    return not args.distributed and str(process_id).strip() in ("", "0")


def _cmd_evaluate(args) -> None:
    config = config_module.from_args(args)
    if _is_process_0(args):  # a bad output path or tracking URI is told at once, before JAX and the model load
        check_destinations(config, _tracking(args))
    from .engine import distributed

    cluster = distributed.DistributedSettings.from_env(args.coordinator_address, args.num_processes, args.process_id,
                                                       args.distributed, args.join_timeout)
    distributed.initialize(cluster)
    try:
        if not distributed.is_leader():
            # Only process 0 runs lm-eval, writes results and talks to MLflow.
            count = serve_checkpoint(args.checkpoint)
            import jax

            print(f"process {jax.process_index()} served {count} engine call(s) for process 0")
            return
        try:
            results, outcome = evaluate_and_publish(args.checkpoint, config, _tracking(args), training_run_id=args.training_run_id,
                                                   step=args.step)
        finally:
            distributed.stop_followers()
    finally:
        distributed.shutdown()
    from lm_eval.utils import make_table

    print(make_table(results))
    print(f"wrote {args.output_path}/results.json")
    if outcome is not None:
        print(f"MLflow run {outcome.run_id} ({'published' if outcome.created else 'already published'})")


def _cmd_sync(args) -> None:
    outcomes = sync(args.results_dirs, tracking_uri=args.tracking_uri, experiment=args.experiment)
    created = sum(o.created for o in outcomes)
    print(f"{created} evaluation(s) published, {len(outcomes) - created} already in MLflow")


def _cmd_cache(args) -> None:
    if args.action == "info":  # read only: creates, moves and changes nothing
        print(response_cache.describe(args.cache_path))
        return
    path = response_cache.cache_file(args.cache_path)
    if not path.exists():  # nothing to clear: no new cache is made just to be emptied
        print(f"{path}: no response cache to clear")
        return
    cache = ResponseCache(args.cache_path)
    print(f"removed {cache.clear()} cached responses from {cache.path}")
    cache.close()


def _cmd_pipeline(args) -> None:
    params = load_params(args.params)
    if args.stage == "evaluate":
        if not args.name:
            raise UserError("pipeline evaluate needs the checkpoint's name from evaluate.checkpoints")
        stages.evaluate(params, args.name)
    else:
        getattr(stages, args.stage)(params)


def _add_verbose(parser, default=argparse.SUPPRESS) -> None:
    """``--verbose``, before the command or after it (a command's flag only sets it when given)."""
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="also show libraries' routine notices: lm-eval's, MLflow's INFO lines, warnings' source lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlflow-lmeval", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    _add_verbose(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tok = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer on a text file")
    tok.add_argument("--input", required=True, help="UTF-8 text file")
    tok.add_argument("--vocab_size", type=config_module.positive_int, default=1024)
    tok.add_argument("--output", required=True, help="where to write the .model file")
    tok.set_defaults(func=_cmd_tokenizer)

    tr = commands.add_parser("train", help="train the reference mLSTM and write checkpoints")
    tr.add_argument("--corpus", required=True, help="UTF-8 text file")
    tr.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    tr.add_argument("--output", required=True, help="directory for step_<N>/ checkpoints")
    tr.add_argument("--steps", type=config_module.positive_int, required=True)
    tr.add_argument("--save_every", type=config_module.positive_int, required=True)
    tr.add_argument("--model_size", default="tiny", help="model preset: tiny or small")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--batch_size", type=config_module.positive_int, default=16)
    tr.add_argument("--sequence_length", type=config_module.positive_int, default=128)
    tr.add_argument("--learning_rate", type=float, default=3e-3)
    tr.add_argument("--eval_every", type=int, default=0, help="evaluate the live params every K steps into the training run")
    tr.add_argument("--eval_tasks", help="comma-separated tasks for --eval_every")
    tr.add_argument("--include_path", help="directory of local task YAML files for --eval_tasks")
    tr.add_argument("--eval_limit", type=config_module.parse_number, help="examples per task for --eval_every")
    tr.add_argument("--bootstrap_iters", type=int, default=1000, help="bootstrap iterations for --eval_every stderrs")
    _add_tracking_flags(tr, "training run")
    _add_verbose(tr)
    tr.set_defaults(func=_cmd_train)

    ev = commands.add_parser("evaluate", help="run lm-eval tasks on a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint directory: ours, or a Hugging Face save_pretrained one")
    config_module.add_arguments(ev)
    ev.add_argument("--training_run_id", help="the MLflow training run (default: the checkpoint's metadata)")
    ev.add_argument("--step", type=config_module.non_negative_int, help="the checkpoint's training step (default: its metadata, or a step_N / checkpoint-N directory name)")
    multihost = ev.add_argument_group("multi-host evaluation (docs/multihost.md)")
    multihost.add_argument("--coordinator_address", metavar="HOST:PORT",
                           help="process 0's address and a free port (default: $JAX_COORDINATOR_ADDRESS)")
    multihost.add_argument("--num_processes", type=config_module.positive_int, help="processes in the run, one per host (default: $MLFLOW_LMEVAL_NUM_PROCESSES)")
    multihost.add_argument("--process_id", type=int, help="this process, 0 to num_processes-1; 0 runs lm-eval (default: $MLFLOW_LMEVAL_PROCESS_ID)")
    multihost.add_argument("--distributed", action="store_true",
                           help="join a run whose settings JAX detects (TPU pods, SLURM, Open MPI)")
    multihost.add_argument("--join_timeout", type=config_module.positive_int, default=300, metavar="SECONDS",
                           help="give up when not every process has joined after this long (default: 300)")
    _add_tracking_flags(ev, "evaluation run (default: the training run's)")
    _add_verbose(ev)
    ev.set_defaults(func=_cmd_evaluate)

    sy = commands.add_parser("sync", help="publish results directories that MLflow does not hold yet")
    sy.add_argument("results_dirs", nargs="+", help="directories holding results.json (searched recursively)")
    sy.add_argument("--tracking_uri")
    sy.add_argument("--experiment")
    sy.set_defaults(func=_cmd_sync)

    compare_report.add_parser(commands)

    ca = commands.add_parser("cache", help="inspect or clear the resumable response cache")
    ca.add_argument("action", choices=["info", "clear"])
    ca.add_argument("--cache_path", help=config_module.settings()["response_cache_path"].help)
    ca.set_defaults(func=_cmd_cache)

    pl = commands.add_parser("pipeline", help="run one DVC pipeline stage (dvc.yaml calls these)")
    pl.add_argument("stage", choices=["prepare", "train", "evaluate", "publish", "report"])
    pl.add_argument("name", nargs="?", help="for evaluate: the key in evaluate.checkpoints")
    pl.add_argument("--params", default="params.yaml")
    _add_verbose(pl)
    pl.set_defaults(func=_cmd_pipeline)
    return parser


def main(argv: list[str] | None = None, *, console: bool = False) -> int:
    """Run one command; ``console``: this process is the command line's own, so set what libraries
    print in it (verbosity.py), which a caller of ``main`` in its own process keeps as it is."""
    args = build_parser().parse_args(argv)
    if console:
        verbosity.configure(args.verbose)
    try:
        args.func(args)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"internal error: {type(error).__name__}: {first_line} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def _without_closed_loop_noise(hook):
    """``hook`` (sys.excepthook, sys.unraisablehook or threading.excepthook), silent for
    "Event loop is closed"."""

    def filtered(*args):
        error = args[1] if len(args) == 3 else args[0].exc_value  # excepthook's, or the hooks' one argument
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
            return None
        return hook(*args)

    return filtered


def run() -> None:
    """The console entry point. An error exit ends the process at once after its one line, so no
    library's shutdown work can print below it."""
    # tensorstore's threads call back into orbax's asyncio loop after a failed restore has closed
    # it; Python reports that RuntimeError as "unraisable", racing the one-line error.
    sys.excepthook = _without_closed_loop_noise(sys.excepthook)
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    threading.excepthook = _without_closed_loop_noise(threading.excepthook)
    code = main(console=True)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
