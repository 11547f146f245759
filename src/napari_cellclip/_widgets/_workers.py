"""Run the widgets' heavy work in background processes; progress, cancel and errors on the GUI side.

A job is one call into the core, named by a task of :mod:`._child` (``"embed"``,
``"text_query"``, ``"map_2d"`` …).  :func:`submit` queues it on the :class:`Engine` of
its kind (``"model"``, ``"map"`` or ``"cells"``): a child process started with ``spawn`` that runs
its jobs one at a time.  Nothing heavy runs in napari's process, so its event loop
keeps turning whatever the job does with the GIL or the CPU.

* Progress: the child reports ``(done, total)`` per batch; the :class:`Job`'s
  :class:`ProgressMeter` turns that into counts, rate and time left, shown by the
  widget (``on_progress``) and in napari's activity panel.
* Cancel: the child is asked to stop at its next batch; if it has not within
  :data:`CANCEL_GRACE_MS`, it is terminated (and restarted, warm, for the next job).
* Errors: :class:`~napari_cellclip.errors.CellClipError` messages and
  :class:`~napari_cellclip.errors.CellClipWarning` are shown as napari notifications
  (never a traceback); a child that dies (e.g. out of memory) fails its job with a
  message saying so.
* Warming: an engine starts when a widget that needs it opens; the child imports
  torch / compiles UMAP at once, and :attr:`Engine.status` says so on screen.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable

from qtpy.QtCore import QObject, QTimer, Signal

from . import _notify

__all__ = ["Job", "Engine", "ProgressMeter", "engine", "submit", "shutdown_engines", "format_duration"]

_log = logging.getLogger(__name__)

#: how long a job has to stop by itself after Cancel before its process is terminated
CANCEL_GRACE_MS = 1500
KINDS = ("model", "map", "cells")
_IDS = itertools.count(1)


# ------------------------------------------------------------------ progress
def format_duration(seconds: float) -> str:
    """``"8 s"``, ``"3 min 05 s"``, ``"2 h 10 min"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class ProgressMeter:
    """Counts, rate and time left of a job, from its ``(done, total)`` reports.

    The rate is measured from the first report (work already done then, e.g. cached
    fields, does not inflate it) over at most the last :attr:`WINDOW` reports.
    """

    WINDOW = 20

    def __init__(self, unit: str = "items", clock: Callable[[], float] = time.monotonic):
        self.unit = unit
        self.clock = clock
        self.done = 0
        self.total = 0
        self._reports: deque[tuple[float, int]] = deque(maxlen=self.WINDOW)
        self.started = clock()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)
        self._reports.append((self.clock(), self.done))

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 0.0

    @property
    def rate(self) -> float | None:
        """Units per second, once two reports with progress between them have arrived."""
        if len(self._reports) < 2:
            return None
        (t0, d0), (t1, d1) = self._reports[0], self._reports[-1]
        if d1 <= d0 or t1 <= t0:
            return None
        return (d1 - d0) / (t1 - t0)

    @property
    def eta(self) -> float | None:
        r = self.rate
        return None if r is None else max(0.0, (self.total - self.done) / r)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def text(self) -> str:
        """``"36 / 72 fields · 2.4 fields/s · about 15 s left"``."""
        if self.total <= 0:
            return ""
        parts = [f"{self.done} / {self.total} {self.unit}"]
        r = self.rate
        if r is not None:
            parts.append(f"{r:.1f} {self.unit}/s" if r >= 1 else f"{r * 60:.1f} {self.unit}/min")
            if self.done < self.total:
                parts.append(f"about {format_duration(self.eta)} left")
        elif self.done < self.total:
            parts.append("measuring speed…")
        return " · ".join(parts)


# ----------------------------------------------------------------------- jobs
class Job:
    """One queued or running call of a background task.

    ``done`` / ``cancelled`` / ``result`` / ``error`` tell how it ended; ``meter`` holds
    its progress.  Callbacks run on the GUI thread.
    """

    def __init__(self, name: str, task: str = "", payload: dict | None = None, *, unit: str = "items",
                 on_returned=None, on_error=None, on_finished=None, on_progress=None,
                 clock: Callable[[], float] = time.monotonic):
        self.id = next(_IDS)
        self.name, self.task, self.payload = name, task, dict(payload or {})
        self.meter = ProgressMeter(unit, clock)
        self.on_returned, self.on_error = on_returned, on_error
        self.on_finished, self.on_progress = on_finished, on_progress
        self.done = self.cancelled = False
        self.result: Any = None
        self.error: str | None = None
        self.engine: Engine | None = None
        self.pbar = None
        #: ``time.perf_counter()`` when the result reached the GUI (before it was shown)
        self.returned_at: float | None = None

    # ------------------------------------------------------------ GUI thread
    def cancel(self) -> None:
        """Stop the job: dropped if still queued, else asked to stop, then terminated."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        if self.engine is not None:
            self.engine.cancel(self)
        else:
            self._finish()

    @property
    def is_running(self) -> bool:
        return not self.done

    def wait(self, timeout: float = 60.0) -> bool:
        """Process Qt events until the job is done (scripts, the demo); True if it finished."""
        from qtpy.QtCore import QCoreApplication

        t0 = time.monotonic()
        while not self.done and time.monotonic() - t0 < timeout:
            QCoreApplication.processEvents()
            time.sleep(0.005)
        return self.done

    # the engine calls these, on the GUI thread
    def _progress(self, done: int, total: int) -> None:
        if self.done:
            return
        self.meter.update(done, total)
        if self.pbar is not None:
            try:
                if self.pbar.total != total:
                    self.pbar.total = total
                if done > self.pbar.n:
                    self.pbar.update(done - self.pbar.n)
                self.pbar.set_description(f"{self.name}: {self.meter.text()}")
            except Exception:  # noqa: BLE001 - the activity panel is decoration
                pass
        if self.on_progress is not None:
            self.on_progress(self)

    def _returned(self, result) -> None:
        if self.cancelled:
            return self._finish()
        self.result = result
        if self.on_returned is not None:
            try:
                self.on_returned(result)
            except Exception as exc:  # noqa: BLE001 - shown, never raised into Qt
                _log.exception("%s: showing the result failed", self.name)
                _notify.error(f"{self.name}: {type(exc).__name__}: {exc}")
        self._finish()

    def _failed(self, message: str, *, cancelled: bool = False) -> None:
        if cancelled or self.cancelled:
            self.cancelled = True
            _notify.info(f"{self.name}: cancelled")
        else:
            self.error = message
            _notify.error(f"{self.name}: {message}")
            if self.on_error is not None:
                self.on_error(message)
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.pbar is not None:
            try:
                self.pbar.close()
            except Exception:  # noqa: BLE001
                pass
        if self.on_finished is not None:
            self.on_finished()


# --------------------------------------------------------------------- engine
_START_LOCK = threading.Lock()


def _start_without_main(proc) -> None:
    """``proc.start()`` without the child running napari's ``__main__`` again.

    ``spawn`` normally re-imports the parent's main module in the child; for a napari
    script without an ``if __name__ == "__main__"`` guard that would open a second
    viewer in the background process.  The child needs nothing from it (its target lives
    in :mod:`._child`), so the main module is left out of the preparation data.
    """
    from multiprocessing import spawn

    with _START_LOCK:
        original = spawn.get_preparation_data

        def preparation_data(name):
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        spawn.get_preparation_data = preparation_data
        try:
            proc.start()
        finally:
            spawn.get_preparation_data = original


class _Relay(QObject):
    """Lives on the GUI thread; the reader thread's messages are queued to it."""

    message = Signal(object)


class Engine(QObject):
    """One background process for one kind of work; runs its queued jobs in order.

    ``status_changed(text, ready)``: what the process is doing while no job runs
    ("loading torch…", "compiling UMAP (first map of this session only, about a minute)…", "ready").
    """

    status_changed = Signal(str, bool)

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.status, self.ready = "not started", False
        self._proc = self._conn = self._cancel = None
        self._relay = _Relay()
        self._relay.message.connect(self._on_message)
        self._queue: deque[Job] = deque()
        self._current: Job | None = None
        self._known: set[str] = set()  # store tokens the current process holds
        self._generation = 0

    # -------------------------------------------------------------- process
    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        """Start (and warm) the process if it is not running."""
        if self._proc is not None:
            return
        import multiprocessing as mp

        from . import _child

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._cancel = ctx.Value("q", -1, lock=False)  # one writer (the GUI): no lock, no semaphore to leak
        self._proc = ctx.Process(target=_child.main, args=(child, self._cancel, self.kind),
                                 name=f"napari-cellclip-{self.kind}", daemon=True)
        _start_without_main(self._proc)
        child.close()
        self._conn = parent
        self._known = set()
        self._generation += 1
        self._set_status("starting…", False)
        threading.Thread(target=self._read, args=(parent, self._proc, self._generation),
                         name=f"cellclip-{self.kind}-reader", daemon=True).start()

    def _read(self, conn, proc, generation: int) -> None:
        """Reader thread: forward every message to the GUI thread; report the process's end."""
        try:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                except Exception as exc:  # noqa: BLE001 - an unpicklable result
                    msg = ("error", -1, "other", f"could not receive a result: {type(exc).__name__}: {exc}", "")
                self._relay.message.emit(msg)
            proc.join(5)
            self._relay.message.emit(("exited", generation, proc.exitcode))
        except RuntimeError:  # Qt is shutting down: nobody to tell
            pass

    def _send(self, *msg) -> None:
        self._conn.send(msg)

    def _kill(self) -> None:
        """Terminate the process (its reader thread reports the exit)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()

    def shutdown(self) -> None:
        for job in list(self._queue):
            job.cancel()
        if self._current is not None:
            self._current.cancelled = True
        if self._proc is not None:
            try:
                self._send("stop")
            except (OSError, ValueError):
                pass
            self._kill()
        self._proc = self._conn = None

    def _set_status(self, text: str, ready: bool) -> None:
        self.status, self.ready = text, ready
        self.status_changed.emit(text, ready)

    # ----------------------------------------------------------------- jobs
    def store_spec(self, store) -> dict:
        """How to hand ``store`` to a job: by token when the process holds it, else the store."""
        token = store.__dict__.setdefault("_engine_token", uuid.uuid4().hex)
        if token in self._known:
            return {"token": token}
        self._known.add(token)
        return {"token": token, "store": store}

    def learn(self, store) -> None:
        """The process holds ``store`` (it made it)."""
        token = getattr(store, "_engine_token", None)
        if token:
            self._known.add(token)

    def forget(self, store) -> None:
        """The GUI no longer needs ``store``: the process may drop it."""
        token = getattr(store, "_engine_token", None)
        if token in self._known and self.alive:
            self._known.discard(token)
            try:
                self._send("forget", token)
            except (OSError, ValueError):
                pass

    def submit(self, job: Job) -> Job:
        from napari.utils import cancelable_progress

        job.engine = self
        job.pbar = cancelable_progress(total=0, desc=job.name, cancel_callback=job.cancel)
        self._queue.append(job)
        self._pump()
        return job

    def _pump(self) -> None:
        if self._current is not None or not self._queue:
            return
        self.start()
        job = self._queue.popleft()
        self._current = job
        env = {k: v for k, v in os.environ.items() if k.startswith("NAPARI_CELLCLIP_")}
        try:
            self._send("run", job.id, job.task, job.payload, env)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable payload, a dead pipe
            self._current = None
            job._failed(f"could not start ({type(exc).__name__}: {exc})")
            self._kill()
            QTimer.singleShot(0, self._pump)

    def cancel(self, job: Job) -> None:
        if job in self._queue:
            self._queue.remove(job)
            job._finish()
            return
        if job is self._current and self._cancel is not None:
            self._cancel.value = job.id

            def hard_stop(job=job):
                if self._current is job and not job.done:
                    self._kill()

            QTimer.singleShot(CANCEL_GRACE_MS, hard_stop)

    def _on_message(self, msg) -> None:
        kind, job = msg[0], self._current
        if kind == "status":
            self._set_status(msg[1], bool(msg[2]))
            return
        if kind == "exited":
            self._on_exit(msg[1], msg[2])
            return
        if kind == "warning":
            _, _job_id, category, is_cellclip, text = msg
            if is_cellclip:
                _notify.warning(text)
            elif category not in ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning"):
                _log.warning("%s: %s", category, text)
            return
        if job is None or msg[1] not in (job.id, -1):
            return  # a late message of a job already given up
        if kind == "progress":
            job._progress(msg[2], msg[3])
            return
        self._current = None
        job.returned_at = time.perf_counter()
        if kind == "done":
            if job.task == "embed" and not job.cancelled:
                self.learn(msg[2][1])
            job._returned(msg[2])
        elif kind == "cancelled":
            job._failed("", cancelled=True)
        elif kind == "error":
            job._failed(msg[3])
        self._pump()

    def _on_exit(self, generation: int, exitcode) -> None:
        if generation != self._generation:
            return
        self._proc = self._conn = None
        self._known = set()
        job, self._current = self._current, None
        if job is not None:
            job._failed(f"the background process stopped (exit code {exitcode}); "
                        "it may have run out of memory", cancelled=job.cancelled)
        self._set_status("stopped", False)
        if job is not None and job.cancelled:
            self.start()  # warm again for the next job
        self._pump()


_ENGINES: dict[str, Engine] = {}


def engine(kind: str) -> Engine:
    """The process-wide :class:`Engine` of ``kind`` (``"model"``, ``"map"`` or ``"cells"``), started and warming."""
    if kind not in KINDS:
        raise ValueError(f"unknown engine kind {kind!r}")
    eng = _ENGINES.get(kind)
    if eng is None:
        eng = _ENGINES[kind] = Engine(kind)
    eng.start()
    return eng


def submit(kind: str, task: str, payload: dict | None = None, *, name: str, **job_kwargs) -> Job:
    """Queue ``task(**payload)`` of :mod:`._child` on the engine of ``kind``; returns the :class:`Job`."""
    return engine(kind).submit(Job(name, task, payload, **job_kwargs))


def shutdown_engines() -> None:
    """Stop every background process (they also stop with napari's process)."""
    for eng in list(_ENGINES.values()):
        eng.shutdown()
    _ENGINES.clear()
