"""Multi-host evaluation: joining a ``jax.distributed`` run, and how process 0 leads the others.

JAX across processes is SPMD: every process must dispatch the same jitted computations, in the
same order, over the global mesh, or the collectives inside them never meet. lm-eval, though, is
a driver that only one process should run (it reads tasks, writes results, talks to MLflow). So
process 0 runs lm-eval, and every device-touching Engine call on process 0 first broadcasts a
small *command* (the pickled call, padded to a power-of-two size so the broadcast compiles only a
few shapes). The other processes sit in ``follower.serve``, receive each command and make the same
Engine call with the same arguments, so both sides build the same batches from the same pieces
and run the same steps. A ``stop`` command ends the loop.

Why commands and not a gather of per-process work: the batching (sort by length, buckets,
shared contexts) is deterministic, so sending the requests once is enough for every process to
derive identical batches; no per-batch coordination is needed beyond the collectives that XLA
already runs inside the step. What process 0 alone decides at run time (a generation's stop
strings, which need the tokenizer) is sent with :func:`from_leader` at the few points where it
changes control flow.

Only what runs on devices is mirrored: the response cache, the progress bar and lm-eval stay on
process 0. An error that every process meets the same way (NaN logits) is raised on all of them
at the same batch, so they stay in step; followers drop it and wait for the next command.

JAX 0.10.2 facts this relies on (read from its source): ``jax.distributed.initialize`` reads
``JAX_COORDINATOR_ADDRESS`` itself and auto-detects TPU pods, SLURM, Open MPI and Kubernetes when
its arguments are left out; on CPU the cross-process collectives default to gloo over TCP
(``jax_cpu_collectives_implementation``); ``jax.device_put`` of host data to a sharding that
spans other processes runs an equality check across processes (a collective) on every call, so
batches are placed with ``jax.make_array_from_callback`` instead, which only copies this
process's slices; a global array that is not fully addressable cannot be fetched, but a fully
replicated one can, so totals are replicated by a jitted identity before they are read.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..errors import UserError

# Environment variables for settings JAX does not read itself (it reads JAX_COORDINATOR_ADDRESS).
NUM_PROCESSES_ENV = "MLFLOW_LMEVAL_NUM_PROCESSES"
PROCESS_ID_ENV = "MLFLOW_LMEVAL_PROCESS_ID"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"

_MIN_MESSAGE = 1024  # bytes; smaller commands are padded so the broadcast has few shapes
STOP = "stop"


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process run. ``auto`` leaves every value to JAX's cluster
    detection (TPU pods, SLURM, Open MPI); otherwise all three values are needed."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    join_timeout_s: int = 300  # how long to wait for every process to join (JAX's default)

    @property
    def enabled(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1 or self.coordinator_address is not None

    @classmethod
    def from_env(cls, coordinator_address=None, num_processes=None, process_id=None, auto=False,
                 join_timeout_s: int = 300) -> DistributedSettings:
        """Explicit values win; missing ones come from the environment. JAX_COORDINATOR_ADDRESS
        alone does not start a distributed run: it may be set for some other program."""
        num_processes = num_processes if num_processes is not None else _env_int(NUM_PROCESSES_ENV)
        if coordinator_address is None and num_processes is not None and not auto:
            coordinator_address = os.environ.get(COORDINATOR_ENV) or None
        return cls(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id if process_id is not None else _env_int(PROCESS_ID_ENV),
            auto=auto,
            join_timeout_s=join_timeout_s,
        ).validate()

    def validate(self) -> DistributedSettings:
        if self.num_processes is not None and self.num_processes < 1:
            raise UserError(f"num_processes must be a positive integer, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise UserError(f"process_id must be a non-negative integer, got {self.process_id}")
        if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
            raise UserError(f"process_id must be below num_processes ({self.num_processes}), got {self.process_id}")
        if self.coordinator_address is not None and not _valid_address(self.coordinator_address):
            raise UserError(f"coordinator address must be HOST:PORT with a port from 1 to 65535, got {self.coordinator_address!r}")
        if self.enabled and not self.auto:
            missing = [name for name, value in (("coordinator_address", self.coordinator_address),
                                                ("num_processes", self.num_processes),
                                                ("process_id", self.process_id)) if value is None]
            if missing:
                raise UserError(f"a distributed run needs {', '.join(missing)} too (or --distributed for the cluster's own settings)")
        return self


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {text!r}") from None


def _valid_address(address: str) -> bool:
    match = re.fullmatch(r"(.+):(\d+)", address)
    return bool(match) and 1 <= int(match.group(2)) <= 65535


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Process 0's coordinator accepting connections, or a one-line error.

    JAX's own client aborts the whole process (a C++ check failure and a stack trace) when it
    cannot register in time; a follower checks first that the address answers at all.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise UserError(f"cannot join the distributed run: nothing answers at {address} after {timeout_s} s "
                                f"(is process 0 running there?): {error}") from None
            time.sleep(0.5)


def initialize(settings: DistributedSettings) -> None:
    """Join the run; must come before anything touches a JAX device. One process needs nothing."""
    if not settings.enabled or (settings.num_processes == 1 and not settings.auto):
        return
    if not settings.auto and settings.process_id != 0:
        _wait_for_coordinator(settings.coordinator_address, settings.join_timeout_s)
    try:
        if settings.auto:
            jax.distributed.initialize(initialization_timeout=settings.join_timeout_s)
        else:
            jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                                       initialization_timeout=settings.join_timeout_s)
    except (RuntimeError, ValueError, TypeError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        where = settings.coordinator_address or "the cluster's coordinator"
        raise UserError(f"cannot join the distributed run at {where}: {first}") from None


def shutdown() -> None:
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def is_leader() -> bool:
    return jax.process_index() == 0


# ---- the command channel ---------------------------------------------------------------------
def _broadcast(array: np.ndarray) -> np.ndarray:
    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def _padded_size(length: int) -> int:
    return max(_MIN_MESSAGE, 1 << (length - 1).bit_length())


def send(name: str, *args) -> None:
    """Process 0: tell every process which Engine call to make next."""
    payload = np.frombuffer(pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    _broadcast(np.array([payload.size], np.int64))
    buffer = np.zeros(_padded_size(payload.size), np.uint8)
    buffer[: payload.size] = payload
    _broadcast(buffer)


def receive() -> tuple[str, tuple]:
    """The other processes: wait for process 0's next command."""
    size = int(_broadcast(np.zeros(1, np.int64))[0])
    buffer = _broadcast(np.zeros(_padded_size(size), np.uint8))
    # Only process 0 can write into this buffer, and it runs the same code as this process.
    return pickle.loads(buffer[:size].tobytes())


def from_leader(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (same shape and dtype everywhere)."""
    return _broadcast(np.asarray(values))


def stop_followers() -> None:
    """Process 0: end every other process's ``follower.serve`` loop (no-op in one process)."""
    if jax.process_count() > 1 and is_leader():
        send(STOP)


# ---- arrays across processes -------------------------------------------------------------------
def put_global(tree, sharding):
    """Place host data, identical on every process, as global arrays without a collective."""
    def place(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)
