"""Pre-emption signals (SIGTERM, SIGUSR1 as SLURM sends them) as a flag read at step boundaries.

A handler only records the signal: the training loop decides when it is safe to act (after an
optimizer step, when no gradient is half accumulated), saves a checkpoint there and exits.
Installed for the training loop only, after Lightning's own handlers (whose SIGTERM reaction is
to stop after the current micro-batch without saving), and put back before Lightning restores
the handlers it found.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Records the first of ``signums`` to arrive while installed."""

    def __init__(self, signums: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signums = signums
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def install(self) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous = {}
