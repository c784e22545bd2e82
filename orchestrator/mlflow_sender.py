"""The driver's MLflow send queue: typed operations (create a run, log a batch, end a run, log an artifact
or a dict, reopen a run) and the ``Sender`` that sends them in order, with a pause that grows after each
failure.

Outages never reach Tune. Every MLflow write is an ``Operation`` appended to a FIFO queue and sent at
once when the queue is empty — in the sweep driver (``background=True``) by a sender thread, so Tune's
loop (and the trials waiting on it to take their reports) never waits for the server, up or down;
without the thread (tests, a backlog replay) by the call that queues it. When a call fails with a
connection or server error the queue stays, new operations line up behind it (a trial whose run could
not be created has no run id yet), and it is retried after a growing pause (2 s .. 30 s) — by the
sender thread, or without it at later ``flush`` calls — and at a forced flush; catching up sends a
run's queued metrics in batches (without ``force``: at most ``max_flush_s`` per call).

Replays are idempotent: metrics keep their original timestamp (MLflow drops exact duplicates), params
are logged once, and each run carries a ``promptsweep_create_id`` tag that a retried create looks up
first, so a create that timed out but reached the server is not made twice. An operation the server
refuses for good (invalid value, missing run) is set aside in ``rejected`` with the error.

Operations are JSON-able (``to_dict`` / ``operation_from_dict``, the format of Tune's saved callback
state and of ``tracking_backlog.json``). Each one sends itself through a ``RunTarget``: the client,
the experiment and the run ids by key (``sweep``, ``cell:<id>``, ``trial:<id>``), which the tracker
keeps.

The pause is a few lines here rather than a retry library: the sender must not sleep in the caller
(Tune's thread) and must be stoppable mid-pause, which the blocking retry loops of tenacity/backoff
do not give.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol

from orchestrator.mlflow_uri import error_reason

#: error codes the server answers for a request that will never succeed (everything else is retried)
PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "MALFORMED_REQUEST",
}
CREATE_TAG = "promptsweep_create_id"
#: MLflow's nesting tag: a run's parent run id (the UI nests runs by it)
PARENT_TAG = "mlflow.parentRunId"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunTarget(Protocol):
    """What an operation is sent through (the tracker)."""

    sweep_name: str

    @property
    def client(self): ...

    def experiment_id(self) -> str: ...

    def run_id(self, key: str) -> Optional[str]: ...

    def set_run_id(self, key: str, run_id: str) -> None: ...


class Unresolved(Exception):
    """An operation whose run was never created (its create was rejected)."""


def is_permanent(e: BaseException) -> bool:
    """Whether the server refused an operation for good (retrying cannot help)."""
    return getattr(e, "error_code", None) in PERMANENT_CODES or isinstance(e, Unresolved)


# --- the operations -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Operation:
    """One queued MLflow write for the run ``key``; ``id`` and ``t`` (ns) order and identify it."""

    KIND: ClassVar[str] = ""
    key: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    t: int = field(default_factory=time.time_ns)
    error: Optional[str] = None  #: why the server refused it (rejected operations only)

    def send(self, runs: RunTarget) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """A few words for the backlog's list of what is missing."""
        return self.KIND

    def to_dict(self) -> dict:
        d = {"op": self.KIND, **dataclasses.asdict(self)}
        if d["error"] is None:
            del d["error"]
        return d

    def _run_id(self, runs: RunTarget) -> str:
        run_id = runs.run_id(self.key)
        if not run_id:
            raise Unresolved(f"run {self.key} was never created")
        return run_id


@dataclass(kw_only=True)
class CreateRun(Operation):
    """Create the run ``key`` (nested under the run ``parent``, a key) unless it exists already."""

    KIND: ClassVar[str] = "create"
    name: str
    tags: dict[str, str]
    parent: Optional[str] = None
    start_time: int = field(default_factory=_now_ms)
    tried: bool = False  #: an attempt may have reached the server: look for its run before creating one
    lookup: Optional[list[str]] = None  #: ``[tag, value]`` of a run that may exist from before a restore

    def send(self, runs: RunTarget) -> None:
        if runs.run_id(self.key):
            return
        exp_id = runs.experiment_id()
        searches = []
        if self.tried:
            searches.append(f"tags.{CREATE_TAG} = '{self.id}'")
        if self.lookup:
            tag, value = self.lookup
            searches.append(f"tags.{tag} = '{value}' and tags.sweep = '{runs.sweep_name}'")
        for query in searches:
            found = runs.client.search_runs([exp_id], query, max_results=1)
            if found:
                runs.set_run_id(self.key, found[0].info.run_id)
                return
        tags = dict(self.tags, **{CREATE_TAG: self.id})
        if self.parent:
            parent = runs.run_id(self.parent)
            if not parent:
                raise Unresolved(f"its parent run {self.parent} was never created")
            tags[PARENT_TAG] = parent
        self.tried = True
        run = runs.client.create_run(exp_id, start_time=self.start_time, run_name=self.name, tags=tags)
        runs.set_run_id(self.key, run.info.run_id)


@dataclass(kw_only=True)
class LogBatch(Operation):
    """Metrics (``[name, value, timestamp ms, step]``), params and tags in one ``log_batch``."""

    KIND: ClassVar[str] = "log"
    metrics: list[list] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def metrics_only(self) -> bool:
        return bool(self.metrics) and not self.params and not self.tags

    def send(self, runs: RunTarget) -> None:
        from mlflow.entities import Metric, Param, RunTag

        runs.client.log_batch(
            self._run_id(runs),
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in self.metrics],
            params=[Param(k, v) for k, v in self.params.items()],
            tags=[RunTag(k, v) for k, v in self.tags.items()],
        )

    def describe(self) -> str:
        return "log " + ", ".join(
            f"{len(getattr(self, f))} {f}" for f in ("params", "metrics", "tags") if getattr(self, f)
        )


@dataclass(kw_only=True)
class SetTerminated(Operation):
    """End the run with ``status`` (FINISHED, FAILED, KILLED)."""

    KIND: ClassVar[str] = "end"
    status: str
    end_time: int = field(default_factory=_now_ms)

    def send(self, runs: RunTarget) -> None:
        runs.client.set_terminated(self._run_id(runs), self.status, end_time=self.end_time)

    def describe(self) -> str:
        return f"end {self.status}"


@dataclass(kw_only=True)
class LogArtifact(Operation):
    """Upload the file ``path`` into the run's folder ``dir`` (re-sending overwrites it: idempotent)."""

    KIND: ClassVar[str] = "artifact"
    path: str
    dir: Optional[str] = None

    def send(self, runs: RunTarget) -> None:
        run_id = self._run_id(runs)
        if Path(self.path).is_file():
            runs.client.log_artifact(run_id, self.path, artifact_path=self.dir)

    def describe(self) -> str:
        return f"artifact {Path(self.path).name}"


@dataclass(kw_only=True)
class LogDict(Operation):
    """``data`` as the JSON artifact ``file``."""

    KIND: ClassVar[str] = "dict"
    data: Any
    file: str

    def send(self, runs: RunTarget) -> None:
        runs.client.log_dict(self._run_id(runs), self.data, self.file)

    def describe(self) -> str:
        return f"artifact {Path(self.file).name}"


@dataclass(kw_only=True)
class ReopenRun(Operation):
    """Set an ended run RUNNING again (a resumed sweep)."""

    KIND: ClassVar[str] = "reopen"

    def send(self, runs: RunTarget) -> None:
        runs.client.update_run(self._run_id(runs), status="RUNNING")


_KINDS = {cls.KIND: cls for cls in (CreateRun, LogBatch, SetTerminated, LogArtifact, LogDict, ReopenRun)}


def operation_from_dict(d: dict) -> Operation:
    """The operation ``to_dict`` wrote (also those of states saved before the operations were typed)."""
    cls = _KINDS[d["op"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _merged_metrics(ops: list[Operation]) -> Operation:
    """The metric-only ``LogBatch`` operations ``ops`` (one run) as one operation (the first's id)."""
    if len(ops) == 1:
        return ops[0]
    return LogBatch(key=ops[0].key, id=ops[0].id, t=ops[0].t, metrics=[m for op in ops for m in op.metrics])


# --- the sender -----------------------------------------------------------------------------------


class Sender:
    """The queue of operations for ``runs`` and what sends it (see the module docstring). ``where``: the
    server as messages name it (masked); ``listed_in``: where rejected operations are listed at the end."""

    retry_interval_s = 2.0  #: first pause after a failed send; doubles up to ``max_retry_interval_s``
    max_retry_interval_s = 30.0
    max_flush_s = 2.0  #: catching up in a call without ``force`` stops after this long

    def __init__(self, runs: RunTarget, where: str, background: bool = False, listed_in: str = ""):
        self.runs = runs
        self.where = where
        self.background = background
        self.listed_in = listed_in
        self.pending: list[Operation] = []
        self.rejected: list[Operation] = []
        self._init_threading()

    def _init_threading(self) -> None:
        self.lock = threading.RLock()  # the queue: hooks (Tune's thread) vs the sender thread
        self._flushing = threading.Lock()  # one flush at a time
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._retry_at = 0.0
        self._failures = 0

    # --- queueing -------------------------------------------------------------------------------
    def submit(self, op: Operation) -> None:
        """Queue ``op``; the thread sends it now (background), else this call does (if the pause is over)."""
        with self.lock:
            self.pending.append(op)
        if self.background and not self._stopping:
            self._start_thread()
            self._wake.set()
        else:
            self.flush()

    def queued_create(self, key: str) -> bool:
        """Whether the run ``key``'s creation is still queued."""
        return any(op.key == key and isinstance(op, CreateRun) for op in self.pending)

    def to_dicts(self) -> tuple[list[dict], list[dict]]:
        """The pending and the rejected operations, JSON-able."""
        with self.lock:
            return [op.to_dict() for op in self.pending], [op.to_dict() for op in self.rejected]

    def merge(self, pending: list[dict], rejected: list[dict]) -> None:
        """Unite a saved queue with this one, in submission order (an operation is kept once, by id); a saved
        create counts as tried: it may have reached the server after the state was saved."""
        with self.lock:
            for mine, saved in ((self.pending, pending), (self.rejected, rejected)):
                ops = {op.id: op for op in mine}
                for d in saved:
                    op = operation_from_dict(d)
                    if mine is self.pending and isinstance(op, CreateRun):
                        op.tried = True
                    ops.setdefault(op.id, op)
                mine[:] = sorted(ops.values(), key=lambda op: op.t)  # in place: a running flush holds the list

    # --- the background thread (the sweep driver's: Tune's loop never waits for the server) ----------
    def _start_thread(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """Send what is queued as soon as it is queued; after a failure, again when the pause is over."""
        while not self._stopping:
            pause = self._retry_at - time.monotonic() if self.pending else None
            self._wake.wait(timeout=None if pause is None else max(pause, 0.05))
            self._wake.clear()  # before flushing: an operation queued from now on wakes the loop again
            if not self._stopping:
                self.flush(budget_s=float("inf"))

    def stop(self) -> None:
        """Stop the thread (after the operation it is sending); what is queued stays queued and later calls
        send it themselves."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- sending --------------------------------------------------------------------------------
    def _next(self) -> list[int]:
        """Queue positions sent together: the head, plus, when it only logs metrics, the later metric-only
        operations of the same run up to MLflow's 1000 per batch (never past another operation of that run)."""
        pending = self.pending
        head = pending[0]
        if not (isinstance(head, LogBatch) and head.metrics_only):
            return [0]
        take, n = [0], len(head.metrics)
        for j in range(1, min(len(pending), 5000)):
            op = pending[j]
            if op.key != head.key:
                continue
            if not (isinstance(op, LogBatch) and op.metrics_only) or n + len(op.metrics) > MAX_METRICS_PER_BATCH:
                break
            take.append(j)
            n += len(op.metrics)
        return take

    def flush(self, force: bool = False, budget_s: Optional[float] = None) -> bool:
        """Send the queued operations in order; stop at the first one the server does not take. True when empty.

        Never raises. Without ``force`` nothing is tried until the pause after the last failure is over, and a
        call spends at most ``budget_s`` (default ``max_flush_s``) catching up (the rest goes at the next call)."""
        with self._flushing:
            return self._flush(force, self.max_flush_s if budget_s is None else budget_s)

    def _flush(self, force: bool, budget_s: float) -> bool:
        pending = self.pending
        if not pending:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        deadline = float("inf") if force else time.monotonic() + budget_s
        while pending:
            if time.monotonic() > deadline:
                return False
            take = self._next()
            try:
                self._send(_merged_metrics([pending[j] for j in take]))
            except Exception as e:
                if is_permanent(e):
                    self._reject(take, e)
                    continue
                self._failed(e)
                return False
            if self._failures:
                warn(f"MLflow tracking server {self.where} is back: sending {len(pending)} queued operation(s)")
                self._failures, self._retry_at = 0, 0.0
            with self.lock:
                for j in reversed(take):
                    pending.pop(j)
        return True

    def _send(self, op: Operation) -> None:
        """Send one operation (raises what the client raises; ``Unresolved`` when its run does not exist)."""
        op.send(self.runs)

    def _reject(self, take: list[int], e: BaseException) -> None:
        """Set the operations at ``take`` aside as refused for good (one warning per run)."""
        head = self.pending[take[0]]
        if all(op.key != head.key for op in self.rejected):
            warn(
                f"warning: MLflow refused {head.KIND} for {head.key} ({error_reason(e)}); it is listed in "
                f"{self.listed_in} at the end"
            )
        error = " ".join(str(e).split())[:500]
        with self.lock:
            refused = [self.pending[j] for j in take]
            for j in reversed(take):
                self.pending.pop(j)
        for op in refused:
            op.error = error
        with self.lock:
            self.rejected.extend(refused)

    def _failed(self, e: BaseException) -> None:
        """The server did not take the head: pause (doubling up to the most), one warning per outage."""
        self._failures += 1
        pause = min(self.retry_interval_s * 2 ** (self._failures - 1), self.max_retry_interval_s)
        self._retry_at = time.monotonic() + pause
        if self._failures == 1:
            warn(
                f"warning: MLflow tracking server {self.where} is not answering ({error_reason(e)}); trials go on, "
                f"tracking is queued ({len(self.pending)} operation(s)) and retried"
            )

    # --- pickling (Tune saves the tracker): the queue goes, the thread and locks do not ---------------
    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("lock", "_flushing", "_wake", "_thread", "_stopping", "_retry_at", "_failures"):
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._init_threading()
