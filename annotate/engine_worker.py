"""The engine on a thread of its own, fed from every batch in flight, so that it never waits.

`annotate run` works on several batches at once (run.py, --batches-in-flight), each in a host thread
that builds its requests, reads the answers and builds its records. Their generate calls go through
one EngineWorker, which runs them back to back on its own thread: a call takes every request
submitted while the call before it ran, whichever batch it comes from. So the engine goes straight
from one call to the next while the host threads read answers and crop panels, and the rounds of
different batches share calls (batch k+1's figure round with batch k's panel round).

A call out of memory is run again in halves, down to single requests, so a round too big for the card
shrinks without any earlier round being asked again (pipeline.propose_bisecting, which redoes a whole
batch, then only sees a request that does not fit alone). Another exception of a call (a CUDA error, a
stop) reaches every submitter of that call; a request out of memory alone, only its own submitter (the
call's submissions are then run one by one).
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future

from annotate.engines import Answer, Engine, Request
from annotate.faults import free_accelerator_memory, is_out_of_memory


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.busy_seconds = 0.0  # inside engine.generate; what the engine waited is the rest
        self._pending: collections.deque[tuple[list[Request], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, requests: list[Request]) -> Future:
        """A future of the answers to `requests`, in order."""
        future: Future = Future()
        with self._wake:
            self._pending.append((requests, future))
            self._wake.notify()
        return future

    def generate(self, requests: list[Request]) -> list[Answer]:
        return self.submit(requests).result()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                calls = list(self._pending)
                self._pending.clear()
            self._answer(calls)

    def _generate(self, requests: list[Request]) -> list[Answer]:
        """engine.generate, run again in halves when out of memory."""
        start = time.perf_counter()
        try:
            return self.engine.generate(requests)
        except Exception as err:
            if len(requests) == 1 or not is_out_of_memory(err):
                raise
        finally:
            self.busy_seconds += time.perf_counter() - start
        free_accelerator_memory()  # outside the except block: the traceback's tensors are gone
        half = len(requests) // 2
        return self._generate(requests[:half]) + self._generate(requests[half:])

    def _answer(self, calls: list[tuple[list[Request], Future]]) -> None:
        """One generate call (halved as needed) for `calls`; when a request is out of memory alone, the
        calls are run one by one, so only its submitter sees it."""
        merged = [request for requests, _ in calls for request in requests]
        try:
            answers = self._generate(merged)
        except BaseException as err:  # noqa: B036 - a stop or a fault is every submitter's to handle
            alone = len(calls) > 1 and is_out_of_memory(err)
            if not alone:
                for _, future in calls:
                    future.set_exception(err)
        else:
            alone = False
            for requests, future in calls:
                future.set_result(answers[:len(requests)])
                answers = answers[len(requests):]
        if alone:  # outside the except block: the traceback's tensors are gone
            free_accelerator_memory()
            for call in calls:
                self._answer([call])
