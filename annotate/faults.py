"""What stops a shard instead of failing a figure: a fault of the engine or its device, and a stop
request (SIGTERM).

A CUDA error, a dead vLLM engine core, an aborted generation or a lost GPU says nothing about the
figures in flight: written down as their failures they would never be retried (a rerun skips the ids
in the failures file), and a GPU that died after 30k good figures would turn the rest of the shard
into failure lines within minutes. So such an error becomes an EngineFault, which stops the shard
with no failure line for its batch, and the rerun redoes the batch. An out-of-memory error is not a
fault: the generate call is retried in halves (engine_worker.py), then the batch is bisected
(pipeline.propose_bisecting), and only a figure that fails alone fails.

Both exceptions derive from BaseException, as KeyboardInterrupt does, so that no per-figure
`except Exception` turns them into a figure's failure on their way to the shard loop (run.py).
"""
from __future__ import annotations

import gc
import re
import sys
import threading


class EngineFault(BaseException):
    """The engine or its device failed; no figure of the batch in flight is to blame."""


class StopRequested(BaseException):
    """A stop was requested (SIGTERM) and the backend reached a point between generate calls."""


# Set by run.py's SIGTERM handler; the backend and engines look at it between generate calls, so a
# batch of many minutes (3+ rounds with a 72B model) stops within one call rather than at its end.
STOP = threading.Event()


def check_stop() -> None:
    if STOP.is_set():
        raise StopRequested()


# Error types of a broken engine or device: vLLM's engine core died or failed a whole generate call,
# torch's CUDA errors (torch >= 2.8), NCCL's.
_FAULT_TYPES = {"EngineDeadError", "EngineGenerateError", "AcceleratorError", "DistBackendError", "DistError"}
# What CUDA, cuBLAS, cuDNN and NCCL errors say when they arrive as a plain RuntimeError.
_FAULT_TEXT = re.compile(r"CUDA error|CUDA driver|cuda runtime error|CUBLAS_STATUS|CUDNN_STATUS|NCCL|"
                         r"illegal memory access|device-side assert|uncorrectable ECC|no CUDA-capable device|"
                         r"CUDA-capable device\(s\) is/are busy", re.IGNORECASE)


def is_out_of_memory(err: BaseException) -> bool:
    # torch is only looked up, never imported: a backend on the GPU has imported it already.
    torch = sys.modules.get("torch")
    return "out of memory" in str(err).lower() or (torch is not None and isinstance(err, torch.OutOfMemoryError))


def engine_fault(err: BaseException) -> EngineFault | None:
    """The EngineFault `err` stands for, or None when it may be one figure's (or one batch's size's)."""
    if isinstance(err, EngineFault):
        return err
    if is_out_of_memory(err):
        return None
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _FAULT_TYPES or _FAULT_TEXT.search(str(err)):
        first_line = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        return EngineFault(f"{type(err).__name__}: {first_line}"[:300])
    return None


def free_accelerator_memory() -> None:
    """Hand a failed call's cached CUDA blocks back, so its halves get the whole card."""
    torch = sys.modules.get("torch")
    gc.collect()  # tensors caught in reference cycles hold their blocks until collected
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
