"""Run core jobs off the GUI thread; report progress, warnings and errors as napari notifications.

A job is a plain function ``fn(progress, should_stop) -> result`` that calls the
core (``embed.embed_fields``, ``reduce.embed_2d`` ...).  :func:`start_job` runs it
in a thread worker, relays ``progress(done, total)`` calls to the GUI thread
through a queued Qt signal (a napari activity progress bar with Cancel, plus any
callback the widget passes), turns :class:`~napari_cellclip.errors.CellClipWarning`
into ``show_warning`` and errors into ``show_error`` (the message, never a
traceback).  The worker never touches a widget.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal

from . import _notify

__all__ = ["Job", "start_job"]

_log = logging.getLogger(__name__)


class _Relay(QObject):
    """Lives on the GUI thread; signals emitted from the worker are queued to it."""

    progressed = Signal(int, int)


class Job:
    """A running background job: ``cancel()``, ``is_running``, ``worker``."""

    def __init__(self, name: str):
        self.name = name
        self.stop_event = threading.Event()
        self.worker = None
        self.pbar = None
        self.relay = _Relay()
        self.done = False
        self.cancelled = False

    # called from the worker thread
    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def progress(self, done: int, total: int) -> None:
        self.relay.progressed.emit(int(done), int(total))

    # GUI thread
    def cancel(self) -> None:
        if self.done:
            return
        self.cancelled = True
        self.stop_event.set()
        if self.worker is not None:
            self.worker.quit()

    @property
    def is_running(self) -> bool:
        return not self.done

    def wait(self, timeout: float = 60.0) -> bool:  # pragma: no cover - debugging aid
        from qtpy.QtCore import QCoreApplication
        import time

        t0 = time.monotonic()
        while not self.done and time.monotonic() - t0 < timeout:
            QCoreApplication.processEvents()
            time.sleep(0.01)
        return self.done


def _message(exc: BaseException) -> str:
    from ..errors import CellClipError

    if isinstance(exc, CellClipError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def start_job(
    fn: Callable[[Callable[[int, int], None], Callable[[], bool]], Any],
    *,
    name: str,
    on_returned: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    total: int = 0,
) -> Job:
    """Start ``fn(progress, should_stop)`` in a thread worker and return its :class:`Job`."""
    from napari.utils import cancelable_progress
    from superqt.utils import create_worker

    from ..errors import Cancelled, CellClipWarning

    job = Job(name)
    pbar = cancelable_progress(total=total, desc=name, cancel_callback=job.cancel)
    job.pbar = pbar

    def _on_progress(done: int, total_: int) -> None:
        if job.done:
            return
        try:
            if total_ and pbar.total != total_:
                pbar.total = total_
            if done > pbar.n:
                pbar.update(done - pbar.n)
        except Exception:  # pragma: no cover - progress bars are decoration
            pass
        if on_progress is not None:
            on_progress(done, total_)

    job.relay.progressed.connect(_on_progress)

    def _run():
        return fn(job.progress, job.should_stop)

    worker = create_worker(_run, _start_thread=False, _ignore_errors=True)
    job.worker = worker

    def _returned(result):
        if job.cancelled:
            return
        if on_returned is not None:
            try:
                on_returned(result)
            except Exception as exc:  # noqa: BLE001 - shown, not raised into Qt
                _notify.error(f"{name}: {_message(exc)}")

    def _errored(exc):
        if isinstance(exc, Cancelled) or job.cancelled:
            _notify.info(f"{name}: cancelled")
        else:
            _notify.error(f"{name}: {_message(exc)}")
        if on_error is not None:
            on_error(exc)

    def _warned(w):
        message, category = w[0], w[1]
        if isinstance(category, type) and issubclass(category, CellClipWarning):
            _notify.warning(str(message))
        elif isinstance(category, type) and issubclass(category, (DeprecationWarning, FutureWarning,
                                                                  PendingDeprecationWarning)):
            return
        else:  # other warnings go to the log, not to the user.  (Never call
            # warnings.showwarning here: a running worker may have replaced it with
            # its own relay, which would call back into this handler.)
            _log.warning("%s: %s", getattr(category, "__name__", category), message)

    def _finished():
        job.done = True
        try:
            pbar.close()
        except Exception:  # pragma: no cover
            pass
        if on_finished is not None:
            on_finished()

    worker.returned.connect(_returned)
    worker.errored.connect(_errored)
    worker.warned.connect(_warned)
    worker.finished.connect(_finished)
    worker.start()
    return job
