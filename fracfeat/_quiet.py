"""Keep TensorFlow's own chatter off the user's terminal.

Importing TensorFlow 2.21 prints absl/oneDNN/CUDA lines from C++ straight to file descriptor 2
("All log messages before absl::InitializeLog() ...", "oneDNN custom operations are on", "Could not
find cuda drivers", and at the first device probe "failed call to cuInit ... (303)"). The ones
printed before absl's log is initialized ignore TF_CPP_MIN_LOG_LEVEL, so only redirecting the file
descriptor itself keeps them away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings

log = logging.getLogger("fracfeat")

# Python loggers of the libraries whose start-up notes are noise to our users ("WARNING:absl:...").
_CHATTY_LOGGERS = ("tensorflow", "absl", "keras")

# fd 2 is one per process: a second thread must wait, and a nested block leaves the outer one in charge.
_lock = threading.RLock()
_active = threading.local()


@contextlib.contextmanager
def quiet_native_output():
    """Discard what TensorFlow (and other native libraries) print during the block.

    Silenced: writes to file descriptor 2 (C++ logging, which bypasses ``sys.stderr``), Python
    warnings, and the ``tensorflow``/``absl``/``keras`` Python loggers. An exception in the block
    propagates unchanged, after stderr is restored.

    Nothing is hidden while the ``fracfeat`` logger is enabled for DEBUG (``fracfeat --verbose``, or
    in Python ``logging.getLogger("fracfeat").setLevel(logging.DEBUG)`` before the first
    extraction): TensorFlow's lines then go to stderr as it prints them, so even a crash inside
    TensorFlow's import shows its reason.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with _lock:
        if getattr(_active, "depth", 0):
            yield  # an outer block already silences this thread's calls
            return
        _active.depth = 1
        try:
            with _fd2_discarded(), warnings.catch_warnings(), _chatty_loggers_disabled():
                warnings.simplefilter("ignore")
                yield
        finally:
            _active.depth = 0


@contextlib.contextmanager
def _fd2_discarded():
    """Point file descriptor 2 at /dev/null during the block, then back where it was."""
    _flush_python_stderr()  # text Python already buffered belongs to the real stderr
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (closed stderr): nothing can reach a terminal anyway
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        _flush_python_stderr()
        os.dup2(saved, 2)
        os.close(saved)


def _flush_python_stderr() -> None:
    for stream in {id(s): s for s in (sys.stderr, sys.__stderr__) if s is not None}.values():
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to flush
            pass


@contextlib.contextmanager
def _chatty_loggers_disabled():
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was
