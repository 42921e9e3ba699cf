"""A test hook: hold a run at a named point so that a crash test can SIGKILL it exactly there.

Inert in normal use: :func:`pause_point` returns at once unless the environment variable
``FRACFEAT_PAUSE_AT`` is set. Crash tests (tests/test_crash.py) set, for a child process::

    FRACFEAT_PAUSE_AT=<point>:<n>      # hold at the n-th arrival (1-based) at <point>
    FRACFEAT_PAUSE_FILE=/some/path     # created when the run is held there

and SIGKILL the child once the file appears (or delete the file: the run then goes on). The file appears
whole (written under another name, then renamed), so a watcher that sees it can read the held pid. A
run is held at most ``FRACFEAT_PAUSE_MAX_S`` seconds (default 600), then goes on and says so on stderr:
a test whose watcher never comes fails instead of hanging. The points, in the order a run meets them:

- ``batch``: a batch of features computed, not yet checkpointed (decoding and computing);
- ``worker_chunk``: a Dask worker inside a chunk of images (tests/test_distributed.py kills it there);
- ``checkpoint``: a checkpoint file half written in ``tmp/``;
- ``version``: the new version file half written in ``tmp/`` (some feature rows in);
- ``commit``: the version file complete in ``tmp/``, not yet renamed into ``versions/``;
- ``committed``: the version renamed into ``versions/``, its checkpoints not yet removed.

A second hook makes a store write fail as a full disk does, for tests that cannot fill a real one::

    FRACFEAT_FAULT=<kind>:<n>          # the n-th file of <kind> written ("checkpoint" or "version") fails

The writer's flush of that file, after HDF5 has closed it, then raises ``OSError(ENOSPC)``: what a full
disk does to HDF5, which reports a failed write only when the file is flushed or closed.
"""

from __future__ import annotations

import errno
import os
import sys
import time

_arrivals: dict[str, int] = {}


def _arrived(spec: str | None, name: str, counts: dict) -> bool:
    """Whether this arrival at ``name`` is the one ``spec`` (``<name>:<n>``) names; counts the arrivals."""
    if not spec:
        return False
    point, _, nth = spec.partition(":")
    if point != name:
        return False
    counts[name] = counts.get(name, 0) + 1
    return counts[name] == int(nth or 1)


def pause_point(name: str) -> None:
    if not _arrived(os.environ.get("FRACFEAT_PAUSE_AT"), name, _arrivals):
        return
    path = os.environ["FRACFEAT_PAUSE_FILE"]
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        f.write(f"{name}:{_arrivals[name]} pid={os.getpid()}\n")
    os.replace(f.name, path)  # whole or absent: a watcher never reads a half-written file
    deadline = time.monotonic() + float(os.environ.get("FRACFEAT_PAUSE_MAX_S", 600))
    while os.path.exists(path):  # until killed, or released by deleting the file
        if time.monotonic() > deadline:
            print(f"fracfeat: held at {name} for FRACFEAT_PAUSE_MAX_S without being killed or released; going on",
                  file=sys.stderr)
            if os.path.exists(path):
                os.remove(path)
            return
        time.sleep(0.05)


_faulted: dict[str, int] = {}


def write_fault(kind: str) -> None:
    """Raise ``OSError(ENOSPC)`` if ``FRACFEAT_FAULT`` names this write (``<kind>:<n>``); else return at once."""
    spec = os.environ.get("FRACFEAT_FAULT")
    if _arrived(spec, kind, _faulted):
        raise OSError(errno.ENOSPC, f"No space left on device (injected by FRACFEAT_FAULT={spec})")


def reset() -> None:
    """Forget the arrivals counted so far (a test that sets FRACFEAT_FAULT or FRACFEAT_PAUSE_AT in-process)."""
    _arrivals.clear()
    _faulted.clear()
