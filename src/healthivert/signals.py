"""SIGINT and SIGTERM as an exception, so an interrupted stage removes its temporary outputs.

Ctrl-C, DVC and Kubernetes stop a stage with SIGINT or SIGTERM. Turned into :class:`Interrupted`
(a ``SystemExit`` with the shell's code, 128 + the signal number), the interrupt unwinds the stack:
the atomic writers delete their temporaries, MLflow runs end FAILED, and the command line prints one
line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: the signals that stop a stage.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """Raised in the main thread when the process receives SIGINT or SIGTERM.

    Args:
        signum: the signal received; the exit code is ``128 + signum`` (130, 143).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    Only the main thread can install signal handlers; elsewhere this does nothing. The previous
    handlers are restored on leaving.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
