"""The rank monitor's measurements: an evaluation (the snapshot of every adapter update at one step and the
singular values computed from it) and the one background thread, at the lowest priority, that computes them
(and renders the live report) off the training path.

The training thread only copies each layer's update description (``spectral_factors()``: the factors, small
for every factorised method) to the CPU; `BackgroundWorker` then computes each layer's singular values
through its method's exact shortcut (``kr_vlm.spectral``). When the training thread needs an evaluation
finished (the next one is due, a checkpoint, train end) it computes the layers not yet started itself.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from kr_vlm import spectral

# Linux niceness of the background thread (19: the lowest priority). It then runs on the cycles training leaves
# idle and yields wherever training wants a core, rather than preempting a training thread while that
# thread's OpenMP peers wait for it at the next barrier.
WORKER_NICENESS = 19


@functools.cache
def _thread_counts_are_per_thread() -> bool:
    """True when torch's intra-op thread count is a per-thread setting (the OpenMP backend of torch's wheels)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads in the calling thread (None: leave it alone), then restore.

    Safe in a background thread: with the OpenMP backend torch keeps the count per thread
    (``omp_set_num_threads``, ``mkl_set_num_threads_local``), so the training thread keeps its own. What is
    process-wide is torch's default for threads that run their first torch op while the block runs (and the
    size of the pool its mobile/quantized kernels share); the restore puts them back. With another backend
    the count itself is process-wide, so it is left alone.
    """
    if count is None or not _thread_counts_are_per_thread():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lower_this_threads_priority() -> None:
    """Give the calling thread the lowest scheduling priority (Linux; elsewhere nothing happens)."""
    if sys.platform.startswith("linux"):
        with suppress(OSError):  # e.g. a sandbox that forbids it: the thread then runs at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def update_spectrum(update: spectral.UpdateFactors) -> torch.Tensor | None:
    """Singular values (descending, float32) of an update, or None when it is not finite (NaN or inf)."""
    if not update.is_finite():
        return None
    sigma = update.singular_values()
    return sigma.float() if bool(torch.isfinite(sigma).all()) else None


def update_spectra(
    layers: Iterable[tuple[str, nn.Module]], cpu_threads: int | None = 1
) -> dict[str, torch.Tensor | None]:
    """Singular values (descending, float32, on the CPU) of every layer's update, by name, computed in the
    calling thread with ``cpu_threads`` torch threads (None: the current setting); None for a non-finite one."""
    evaluation = Evaluation.of(layers, step=0)
    evaluation.compute_all(cpu_threads)
    return evaluation.spectra()


def spectrum_metrics(sigma: torch.Tensor) -> dict[str, float]:
    """Effective rank, stable rank and Frobenius norm of a matrix, from its singular values."""
    return {
        "effective_rank": float(spectral.effective_rank_from_singular_values(sigma)),
        "stable_rank": float(spectral.stable_rank_from_singular_values(sigma)),
        "frobenius_norm": float(sigma.square().sum().sqrt()),
    }


class Evaluation:
    """One evaluation: the snapshot of every layer's update taken at ``step``, and the spectra computed from it.

    Layers are computed one at a time by whichever thread takes them (``compute``), so the background thread
    and a waiting training thread can share the work.
    """

    def __init__(self, step: int, updates: dict[str, spectral.UpdateFactors]) -> None:
        self.step = step
        self.updates = updates
        self.layer_info: dict[str, Any] = {}  # filled by the monitor, which knows the layers' labels
        self.parameters: dict[str, Any] = {}
        self.seconds = 0.0  # the work: snapshot plus decompositions, whichever thread did them
        self._spectra: dict[str, torch.Tensor | None] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        if not updates:
            self._done.set()

    @classmethod
    def of(cls, layers: Iterable[tuple[str, nn.Module]], step: int) -> Evaluation:
        """Snapshot (copy to the CPU) the update factors of ``layers`` now."""
        started = time.perf_counter()
        with torch.no_grad():
            updates = {name: layer.spectral_factors().snapshot() for name, layer in layers}
        evaluation = cls(step, updates)
        evaluation.seconds = time.perf_counter() - started
        return evaluation

    def compute(self, name: str, cpu_threads: int | None) -> None:
        started = time.perf_counter()
        sigma, error = None, None
        try:
            with _intra_op_threads(cpu_threads), torch.no_grad():
                sigma = update_spectrum(self.updates[name])
        except Exception as exception:  # handed to the training thread, which raises it (see spectra)
            error = exception
        with self._lock:
            self._spectra[name] = sigma
            self._error = self._error or error
            self.seconds += time.perf_counter() - started
            if len(self._spectra) == len(self.updates):
                self._done.set()

    def compute_all(self, cpu_threads: int | None) -> None:
        for name in self.updates:
            self.compute(name, cpu_threads)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()

    def spectra(self) -> dict[str, torch.Tensor | None]:
        """The finished spectra in layer order; re-raises an error a decomposition hit."""
        if self._error is not None:
            raise RuntimeError(
                f"EffectiveRankMonitor failed to decompose the updates of step {self.step}."
            ) from self._error
        return {name: self._spectra[name] for name in self.updates}


class BackgroundWorker:
    """One thread at the lowest priority (a ``ThreadPoolExecutor`` of one worker) that computes the layers
    of submitted evaluations in order, and runs other background tasks (the live report) between them."""

    def __init__(self, cpu_threads: int | None) -> None:
        self.cpu_threads = cpu_threads
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="kr_vlm-rank-monitor",
            # Looked up when the thread starts (tests hold the thread back by replacing it).
            initializer=lambda: _lower_this_threads_priority(),
        )
        self._layers: dict[int, list[Future]] = {}  # by id(evaluation): a future per layer, in order
        # Without close(), the interpreter would first run every queued task at exit.
        atexit.register(self.close)

    def submit(self, evaluation: Evaluation) -> None:
        self._layers[id(evaluation)] = [
            self._executor.submit(evaluation.compute, name, self.cpu_threads) for name in evaluation.updates
        ]

    def run(self, task: Callable[[], Any]) -> Future:
        """Run ``task()`` in the background thread, after the work queued before it."""
        return self._executor.submit(task)

    def finish(self, evaluation: Evaluation) -> None:
        """Return once ``evaluation`` is done, computing the layers the thread has not started in the calling
        thread (a layer cancelled in the queue is one the thread will skip)."""
        for name, future in zip(evaluation.updates, self._layers.pop(id(evaluation), []), strict=False):
            if future.cancel():
                evaluation.compute(name, self.cpu_threads)
        evaluation.wait()

    def close(self) -> None:
        """Drop the queued work and stop the thread (it finishes the task it is running)."""
        atexit.unregister(self.close)
        self._layers.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

