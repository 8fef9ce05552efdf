"""Preemption: SIGTERM and SIGUSR1 ask training to finish its step, checkpoint and stop (the loop then raises
:class:`speechlm.errors.Preempted`; recipes exit 75 and the same command resumes)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from speechlm.errors import EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop: dict[str, Any] = {"signum": None, "pid": None}


def _on_stop_signal(signum: int, frame: Any) -> None:
    first = _stop["signum"] is None
    if first:
        _stop["signum"] = signum
    if first and os.getpid() == _stop["pid"]:  # not in DataLoader workers, which inherit the handler
        name = signal.Signals(signum).name
        os.write(2, f"[rank {os.environ.get('RANK', '0')}] {name}: finishing the current step, then a checkpoint "
                    f"and exit {EXIT_PREEMPTED}\n".encode())


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 ask the training loop to checkpoint at the end of the current step and stop.

    Idempotent. Call it before DataLoader workers start: they inherit the handler (and so ignore the signal
    instead of dying under the rank that still needs them to finish its step).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _stop["pid"] = os.getpid()
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not _on_stop_signal:
            signal.signal(s, _on_stop_signal)


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _stop["signum"]
