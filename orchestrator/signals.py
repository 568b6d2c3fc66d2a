"""Signals in avlab's processes: a driver's SIGTERM handled as Ctrl-C (Ray's start-up included),
and a training worker's SIGTERM that ends it quietly."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

_ACTIVE = False  # inside sigterm_as_interrupt


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def _ask_again_when_swallowed(handler_name: str, exc_type: type[BaseException]) -> None:
    """A ``sys.unraisablehook`` for a signal handler's exception that Python could not raise.

    A handler runs wherever the main thread is. When that is a weakref callback, a ``__del__`` or
    the garbage collector, Python cannot raise there: it prints "Exception ignored in ..." with
    the handler's traceback and carries on as if no signal had come (a driver's SIGTERM would be
    lost and its sweep would run to the end). The hook takes that one case: the signal is sent
    again a moment later from another thread, so that the main thread handles it once out of the
    callback (a signal sent from inside would be handled inside again); every other unraisable
    exception goes to the hook before."""
    import threading
    import traceback

    previous = sys.unraisablehook
    if handler_name in getattr(previous, "avlab_signal_handlers", ()):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, exc_type) and any(
                frame.f_code.co_name == handler_name for frame, _ in traceback.walk_tb(unraisable.exc_traceback)):
            again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    hook.avlab_signal_handlers = (*getattr(previous, "avlab_signal_handlers", ()), handler_name)  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``avlab stop``, ``ray job stop``, a batch scheduler's cancel) handled like Ctrl-C
    while a job runs: the job settles its runs and can be resumed."""
    global _ACTIVE
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    _ACTIVE = True
    _ask_again_when_swallowed(_interrupt.__name__, KeyboardInterrupt)
    try:
        yield
    finally:
        _ACTIVE = False
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_starting() -> Iterator[None]:
    """Around ``ray.init`` in a driver: a SIGTERM while Ray starts stops the job like one after.

    ``ray.init`` gives the driver SIGTERM handlers of its own, which exit at once (no run
    settled, the sweep marked failed), and its core worker installs a C++ crash handler that
    turns a SIGTERM into an abort with a stack dump. Inside ``sigterm_as_interrupt`` the crash
    handler is left out of the driver (Ray's workers keep theirs), a SIGTERM that Ray's handlers
    took while it started (they raise SystemExit, after stopping what had started) becomes the
    KeyboardInterrupt that avlab's handler raises, and avlab's handler is put back afterwards."""
    if not _ACTIVE:
        yield
        return
    import ray
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver's core worker starts
    try:
        yield
    except SystemExit:
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise KeyboardInterrupt from None
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _interrupt)


def quiet_worker_sigterm() -> None:
    """In a Ray worker process of avlab's (a sweep trial, a run's task, a Ray Train worker).

    Ray stops a worker with SIGTERM, and its handler raises SystemExit wherever the worker's
    main thread is. When that is a weakref callback, a ``__del__`` or the garbage collector, the
    exit would be lost and "Exception ignored in ..." streamed to the avlab command's terminal;
    the exit is asked for again once out of the callback (``_ask_again_when_swallowed``)."""
    _ask_again_when_swallowed("sigterm_handler", SystemExit)
