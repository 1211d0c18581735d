"""The engine on a thread of its own, fed from every batch in flight, so that it never waits.

`annotate run` works on several batches at once (run.py, --batches-in-flight), each in a host thread
that builds its requests, reads the answers and builds its records. Their generate calls go through
one EngineWorker, which runs them back to back on its own thread: a call takes every request
submitted while the call before it ran, whichever batch it comes from. So the engine goes straight
from one call to the next while the host threads read answers and crop panels, and the rounds of
different batches share calls (batch k+1's figure round with batch k's panel round).

An exception of a call (a CUDA error, a stop) reaches every submitter of that call. Out of memory in a
call of several submissions runs them one by one, so a submitter sees out of memory only for its own
requests, which it then halves (qwen.QwenBackend).
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

    def _answer(self, calls: list[tuple[list[Request], Future]]) -> None:
        """One generate call for `calls`; calls that run out of memory together are run one by one, so
        that a submitter sees out of memory only for requests of its own (it halves them: qwen.py)."""
        merged = [request for requests, _ in calls for request in requests]
        start = time.perf_counter()
        try:
            answers = self.engine.generate(merged)
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
        finally:
            self.busy_seconds += time.perf_counter() - start
        if alone:  # outside the except block: the traceback's tensors are gone
            free_accelerator_memory()
            for call in calls:
                self._answer([call])
