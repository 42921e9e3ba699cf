"""A test hook: hold a run at a named point so that a crash test can SIGKILL it exactly there.

Inert in normal use: :func:`pause_point` returns at once unless the environment variable
``FRACFEAT_PAUSE_AT`` is set. Crash tests (tests/test_crash.py) set, for a child process::

    FRACFEAT_PAUSE_AT=<point>:<n>      # hold at the n-th arrival (1-based) at <point>
    FRACFEAT_PAUSE_FILE=/some/path     # created when the run is held there

and SIGKILL the child once the file appears (or delete the file: the run then goes on). The points, in the order a run meets them:

- ``batch``: a batch of features computed, not yet checkpointed (decoding and computing);
- ``checkpoint``: a checkpoint file half written in ``tmp/``;
- ``version``: the new version file half written in ``tmp/`` (some feature rows in);
- ``commit``: the version file complete in ``tmp/``, not yet renamed into ``versions/``;
- ``committed``: the version renamed into ``versions/``, its checkpoints not yet removed.
"""

from __future__ import annotations

import os
import time

_arrivals: dict[str, int] = {}


def pause_point(name: str) -> None:
    spec = os.environ.get("FRACFEAT_PAUSE_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] != int(nth or 1):
        return
    with open(os.environ["FRACFEAT_PAUSE_FILE"], "w") as f:
        f.write(f"{name}:{_arrivals[name]} pid={os.getpid()}\n")
    while os.path.exists(os.environ["FRACFEAT_PAUSE_FILE"]):  # until killed, or released by deleting the file
        time.sleep(0.05)
