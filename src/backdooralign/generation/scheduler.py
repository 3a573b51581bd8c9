"""Requests that arrive together are generated together: a bounded queue and one worker per model.

A request becomes a :class:`Job` (one engine :class:`~backdooralign.generation.engine.Row` per
choice). The worker takes waiting jobs in arrival order into a batch, up to ``max_batch_size``
rows and ``max_batch_tokens`` (prompt plus longest answer, summed over rows), and decodes them
with :func:`backdooralign.generation.engine.decode`. Between two decoding steps, jobs that
arrived meanwhile join the batch while there is room, and a job whose rows have all finished
is released at once (its rows left the batch already). A full queue refuses new jobs
(:class:`QueueFull`); a cancelled row (client gone, timeout) stops at the next step. A row whose
decoding fails alone (``finish`` ``"error"``) fails its job only: the job's ``error`` is that
row's, the other jobs of the batch go on; a failure of the whole batch (the model's forward
pass) fails every job in it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .engine import PrefixCache, Row, decode

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The scheduler's queue holds ``max_queue`` jobs already."""


@dataclass(eq=False)
class Job:
    """The rows of one request, and when they are done (``error`` set if decoding failed)."""

    rows: list[Row]
    notify: Callable[[], None] | None = None  # called once, from the worker, when done
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def release(self) -> None:
        """Mark the job done (once) and tell whoever waits; a failed row fails the job."""
        if not self.done.is_set():
            if self.error is None:
                self.error = next((r.error for r in self.rows if r.error is not None), None)
                if self.error is not None:  # the message may quote the conversation
                    log.error("decoding of one request failed: %s", type(self.error).__name__)
            self.done.set()
            if self.notify is not None:
                self.notify()

    @property
    def cost(self) -> int:
        """Tokens the job may hold in the batch: prompts plus longest answers."""
        return sum(len(r.prompt) + r.max_new_tokens for r in self.rows)

    def finished(self) -> bool:
        return all(r.finish is not None for r in self.rows)

    def cancelled(self) -> bool:
        return all(r.cancel is not None and r.cancel.is_set() for r in self.rows)


class Scheduler:
    """Batches the jobs of one model in a worker thread (started on the first job).

    Args:
        model: the causal LM (only the worker runs it).
        pad_id: padding token id.
        prefix_hint: the token prefix every prompt of this model is expected to share.
        max_batch_size: most rows decoded together (1: one request at a time).
        max_queue: most jobs waiting; more are refused with :class:`QueueFull`.
        max_batch_tokens: most prompt-plus-answer tokens in a batch.
        bf16: decode under bf16 autocast.
    """

    def __init__(
        self,
        model,
        pad_id: int,
        *,
        prefix_hint: Sequence[int] | None = None,
        max_batch_size: int = 16,
        max_queue: int = 64,
        max_batch_tokens: int = 65536,
        bf16: bool = False,
    ):
        self.model, self.pad_id, self.prefix_hint = model, pad_id, prefix_hint
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_batch_tokens, self.bf16 = max_batch_tokens, bf16
        self.prefix_cache = PrefixCache()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = self._drain = False

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` jobs wait already."""
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already")
            self._pending.append(job)
            self._closed = False  # an app served again after a shutdown serves again
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, daemon=True, name="decode")
                self._thread.start()
            self._cond.notify()

    def close(self, drain: bool = False) -> None:
        """Stop the worker after its current batch (waiting jobs are left undone).

        Args:
            drain: first finish the jobs waiting already (for a model nobody will send
                another request to).
        """
        with self._cond:
            self._closed, self._drain = True, drain
            self._cond.notify()

    def _take(self, rows: int, tokens: int) -> list[Job]:
        """Waiting jobs, in order, that fit in ``rows`` rows and ``tokens`` tokens (locked)."""
        taken: list[Job] = []
        while self._pending:
            job = self._pending[0]
            if job.cancelled():  # nobody waits for it any more
                self._pending.popleft().release()
                continue
            alone = not taken and rows == self.max_batch_size  # a job too big still runs alone
            if (len(job.rows) > rows or job.cost > tokens) and not alone:
                break
            taken.append(self._pending.popleft())
            rows -= len(job.rows)
            tokens -= job.cost
        return taken

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not (self._drain and self._pending):
                    return
                jobs = self._take(self.max_batch_size, self.max_batch_tokens)
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        """Decode ``jobs``, letting waiting jobs join between steps."""
        active = list(jobs)

        def more(running: int) -> list[Row]:
            for job in [j for j in active if j.finished()]:
                active.remove(job)
                job.release()
            with self._cond:
                busy = sum(j.cost for j in active)
                new = self._take(self.max_batch_size - running, self.max_batch_tokens - busy)
            active.extend(new)
            return [r for j in new for r in j.rows]

        try:
            decode(
                self.model,
                [r for j in jobs for r in j.rows],
                self.pad_id,
                prefix_cache=self.prefix_cache,
                prefix_hint=self.prefix_hint,
                bf16=self.bf16,
                more=more,
            )
        except Exception as e:  # the message may quote the conversation: log the type only
            log.error("decoding failed: %s", type(e).__name__)
            for job in active:
                job.error = e
        finally:
            for job in active:
                job.release()
