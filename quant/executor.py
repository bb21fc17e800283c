"""Where shard-independent work runs: in this process (LocalExecutor) or on a Ray cluster (RayExecutor).

The stages that split into independent shards (calibration = min/max per tensor, a max-reduce, and power-of-two-range
histograms, a grow-and-sum reduce; evaluation = per-utterance metrics, a gather) call `executor.map(fn, shards, context)` and
reduce the results themselves, so the answer never depends on which executor ran them or in what order shards
finished: `map` returns results in shard order.

`context` is what every shard needs and is large (model bytes, the global ranges): Ray ships it through its object
store once (`ray.put`), not once per task. `fn` must be a module-level function (Ray pickles it by reference).

Ray is imported only inside RayExecutor: `--executor local` (the default) never imports it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

from quant.errors import QuantError

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")
C = TypeVar("C")
EXECUTORS = ("local", "ray")
RAY_RETRIES = 2  # a task whose worker process died (OOM kill, node lost) is re-run this many times


class ShardError(QuantError):
    """A shard of a distributed stage failed; the message names the shard and what it covers."""


@dataclass(frozen=True)
class Shard(Generic[P]):
    """One independent piece of a stage: `payload` is what the worker needs (picklable), `covers` names what it
    covers (utterance ids, or feed numbers) for error messages and for counting what the stage saw."""

    index: int
    payload: P
    covers: tuple[str, ...]

    def label(self, total: int) -> str:
        shown = ", ".join(self.covers[:4]) + (f" and {len(self.covers) - 4} more" if len(self.covers) > 4 else "")
        return f"shard {self.index + 1} of {total} ({shown})"


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[Shard[P], C], R], shards: Sequence[Shard[P]], context: C) -> list[R]:
        """fn(shard, context) for every shard, results in shard order; a failure raises ShardError naming it."""
        ...


class LocalExecutor:
    """Every shard in this process, one after the other: the reference the distributed runs must equal."""

    name = "local"

    def map(self, fn: Callable[[Shard[P], C], R], shards: Sequence[Shard[P]], context: C) -> list[R]:
        results = []
        for shard in shards:
            try:
                results.append(fn(shard, context))
            except Exception as error:  # noqa: BLE001 - re-raised with the shard named, cause kept
                raise ShardError(f"{shard.label(len(shards))} failed: {_first_line(error)}") from error
        return results


class RayExecutor:
    """Shards as Ray tasks (one CPU each). address None starts a local Ray instance, "auto" joins the cluster this
    machine belongs to, "ray://host:10001" or "host:6379" joins that one. num_cpus limits a locally started
    instance (ignored when joining a cluster)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def map(self, fn: Callable[[Shard[P], C], R], shards: Sequence[Shard[P]], context: C) -> list[R]:
        ray = self._ray()
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(fn)
        shared = ray.put(context)  # once: every task gets a reference, the object store holds one copy per node
        pending = [remote.remote(shard, shared) for shard in shards]
        log.info("ray: %d shards of %s submitted", len(shards), getattr(fn, "__name__", fn))
        results = []
        for shard, ref in zip(shards, pending):
            try:
                results.append(ray.get(ref))
            except Exception as error:  # noqa: BLE001 - RayTaskError wraps the worker's exception; name the shard
                # the other shards are left to finish and their results dropped: ray.cancel racing a task that is just
                # completing aborted the whole driver process (Ray 2.60: "Check failed: it != submissible_tasks_.end()"
                # in TaskManager::CompletePendingTask, seen in CI), which would turn a named shard error into a crash
                cause = getattr(error, "cause", None) or error
                raise ShardError(f"{shard.label(len(shards))} failed on ray: {_first_line(cause)}") from None
        return results

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise QuantError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from None
        _check_reachable(self.address)  # also when this process already joined a cluster: the address must answer
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None and self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise QuantError(f"cannot reach the Ray cluster at {self.address or 'a new local instance'}: "
                                 f"{_first_line(error)}; start one with `ray start --head` or drop --ray-address"
                                 ) from None
        return ray


CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once when a HOST:PORT cluster address has nobody listening: ray.init would retry for minutes.
    `auto`, `ray://` client addresses and None (a new local instance) are left to Ray."""
    if address is None or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise QuantError(f"--ray-address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default), "
                         "`auto`, or ray://HOST:PORT")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise QuantError(f"cannot reach the Ray cluster at {address}: {error.strerror or error} (nothing answered "
                         f"within {timeout_s:.0f} s); start one with `ray start --head` or check the address") from None


def make_executor(kind: str = "local", address: str | None = None) -> Executor:
    if kind == "local":
        if address is not None:
            raise QuantError("--ray-address needs --executor ray")
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address)
    raise QuantError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}")


def executor_or_none(kind: str = "local", address: str | None = None) -> Executor | None:
    """The executor for `--executor KIND --ray-address ADDR`; None for local: the caller's in-process path (no
    shards, feeds streamed, nothing held for a second pass)."""
    executor = make_executor(kind, address)  # also refuses an address without ray
    return None if kind == "local" else executor


def split(items: Sequence[Any], count: int, unit: int = 1) -> list[range]:
    """Contiguous index ranges over `items` for `count` shards, each starting at a multiple of `unit` (so a shard
    never splits what must stay together, e.g. a padded batch); deterministic, fewer shards when there is less."""
    if count < 1 or unit < 1:
        raise QuantError(f"shards and unit must be at least 1, got {count} and {unit}")
    blocks = -(-len(items) // unit)
    per_shard = max(1, -(-blocks // count))
    step = per_shard * unit
    return [range(start, min(start + step, len(items))) for start in range(0, len(items), step)]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
