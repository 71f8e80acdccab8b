"""One generation at a time on the device: a queue of jobs and the thread that runs them.

A :class:`Job` is one request's images. Jobs run in arrival order on a single worker thread
(the model is loaded once and the device does one thing at a time); a waiting job knows its
position, a running one its step. Cancelling (a client that went away, or an explicit
cancel) removes a waiting job from the queue, or stops a running one at its next step.
Everything here is thread-safe: the web handlers read jobs while the worker fills them.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class Cancelled(Exception):
    """Raised inside a running job's step callback when the job was cancelled."""


@dataclass
class Job:
    """``work(job)`` produces the images; it calls :meth:`step` after every sampler step."""

    work: Callable[[Job], list[tuple[bytes, str]]]
    steps: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    number: int = 0  # arrival order
    state: str = "queued"  # queued, running, done, error, cancelled
    step_done: int = 0
    images: list[bytes] = field(default_factory=list)  # PNG files with their metadata
    infotexts: list[str] = field(default_factory=list)  # A1111 "parameters" text per image
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: threading.Event = field(default_factory=threading.Event)
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def step(self, *_) -> None:
        """The sampler's per-step callback: count the step, stop if cancelled."""
        if self.cancel_requested.is_set():
            raise Cancelled
        self.step_done += 1

    @property
    def over(self) -> bool:
        return self.state in ("done", "error", "cancelled")


class JobQueue:
    """FIFO of jobs served by one worker thread (:meth:`start`)."""

    def __init__(self, keep: int = 64):
        self._pending: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._counter = itertools.count(1)
        self._keep = keep  # finished jobs kept for their images
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._serve, name="zimagekit-jobs", daemon=True)
        self._stopping = False

    def start(self) -> JobQueue:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the running job; waiting jobs end as cancelled, so no waiter hangs."""
        with self._wake:
            self._stopping = True
            while self._pending:
                job = self._pending.popleft()
                job.state = "cancelled"
                job.finished.set()
            self._wake.notify_all()

    def submit(self, job: Job) -> Job:
        with self._wake:
            job.number = next(self._counter)
            self._pending.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._wake.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        """Every job still remembered, in arrival order."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.number)

    def position(self, job: Job) -> int:
        """0 when running (or over), else how many jobs run before it."""
        with self._lock:
            if job.state != "queued":
                return 0
            ahead = next((i for i, j in enumerate(self._pending) if j is job), len(self._pending))
            return ahead + (1 if self.running is not None else 0)

    def cancel(self, job: Job) -> None:
        with self._lock:
            job.cancel_requested.set()
            if job.state == "queued":
                self._pending.remove(job)
                job.state = "cancelled"
                job.finished.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending) + (1 if self.running is not None else 0)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.over]
        for job in sorted(finished, key=lambda j: j.number)[: max(0, len(finished) - self._keep)]:
            del self._jobs[job.id]

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state = "running"
                self.running = job
            try:
                results = job.work(job)
                job.images = [png for png, _ in results]
                job.infotexts = [text for _, text in results]
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Exception as e:  # reported to the client; the server keeps serving
                job.error = str(e).splitlines()[0] if str(e) else type(e).__name__
                job.state = "error"
            finally:
                job.work = None  # let the request's uploads and settings go
                with self._lock:
                    self.running = None
                job.finished.set()
