"""SIGTERM handled as a Ctrl-C by the command-line tools (evaluate, data preprocess).

A cluster scheduler (SLURM) or ``kill`` sends SIGTERM before ending a job; by default Python
dies at once, leaving half-written predictions or cache entries and orphaned workers. Inside
:func:`sigterm_as_interrupt` it raises :class:`Terminated` instead, a ``KeyboardInterrupt``
that the commands already clean up after, and whose ``signum`` gives the exit status 143.
(Training handles SIGTERM itself, finishing the step and saving it: ``train.loops._CtrlC``.)
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["Terminated", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Borrow SIGTERM's handler for the ``with`` block and put the previous one back after it
    (the commands' ``main`` also runs in-process, where a leftover handler would change what
    SIGTERM does to everything after it). Only from the main thread, and only where the
    handler is Python's default (a caller's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)
