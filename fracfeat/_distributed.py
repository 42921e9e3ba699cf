"""Cache misses computed on a Dask cluster (``extract(..., client=...)``); the store stays single-writer.

The process that called ``extract`` plans, submits chunks of image paths (or, where the workers cannot
see the files, the files' bytes) to the cluster, and checkpoints the rows that come back; it alone
writes the store. Each worker process builds the backbone once (:func:`worker_engine` keeps it per
process, per fingerprint) and runs the very same :class:`fracfeat._engine.FeatureEngine` as a local run,
so the rows are a local run's. A worker that dies loses only its running chunks: Dask's scheduler runs
them again elsewhere, and each chunk's result is taken once, so nothing is lost or duplicated.

At most a few chunks per worker thread are in flight, so neither the scheduler nor this process holds
more than that of a 10^6-image source (paths or bytes) at a time.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from ._deps import require
from ._engine import FeatureBatch, FeatureEngine
from ._errors import ConfigError
from ._faults import pause_point

log = logging.getLogger("fracfeat")

CHUNKS_PER_THREAD = 3  # chunks in flight per worker thread: enough to keep it busy while results travel
_ENGINES: dict = {}  # this worker process's engines: (fingerprint, weights identity) -> FeatureEngine


def worker_engine(config, weights) -> FeatureEngine:
    """The engine of ``config`` in this process, built on first use and kept (a worker builds its backbone once)."""
    key = (config.fingerprint, weights.identity)
    if key not in _ENGINES:
        _ENGINES[key] = FeatureEngine(config, weights)
    return _ENGINES[key]


def paths_readable(paths) -> bool:
    """Whether this process (a worker) sees every one of ``paths`` (a shared filesystem)."""
    return all(os.path.isfile(p) for p in paths)


def compute_chunk(config, weights, start: int, paths, sha256s, batch_size: int, strict: bool, decode_threads,
                  payload=None) -> tuple[int, FeatureBatch, dict]:
    """On a worker: the features of one chunk (``payload``: the files' bytes, when the worker cannot read ``paths``).

    Returns ``(start, batch, versions)``, the batch's indices counted from the chunk's ``start``.
    """
    pause_point("worker_chunk")
    engine = worker_engine(config, weights)
    if payload is None:
        batches = list(engine.iter_features(paths, batch_size=batch_size, strict=strict, workers=decode_threads,
                                            sha256s=sha256s))
    else:
        with tempfile.TemporaryDirectory(prefix="fracfeat-chunk-") as tmp:
            local = [os.path.join(tmp, f"{k}{os.path.splitext(p)[1]}") for k, p in enumerate(paths)]
            for q, data in zip(local, payload):
                with open(q, "wb") as f:
                    f.write(data)
            batches = list(engine.iter_features(local, batch_size=batch_size, strict=strict, workers=decode_threads,
                                                sha256s=sha256s))
        batches = [FeatureBatch(b.indices, b.features, [(k, r.replace(local[k], paths[k])) for k, r in b.failures],
                                b.truncated) for b in batches]
    rows = [b.features for b in batches if len(b.indices)]
    merged = FeatureBatch(
        np.concatenate([b.indices for b in batches]).astype(np.int64) + start if batches else np.empty(0, np.int64),
        np.concatenate(rows) if rows else np.empty((0, 0), np.float32),
        [(start + k, r) for b in batches for k, r in b.failures],
        [start + k for b in batches for k in b.truncated],
    )
    return start, merged, engine.versions()


def connect(client):
    """``(client, owned)``: a ``distributed.Client`` as given, or one connected to a scheduler address."""
    distributed = require("distributed", why="extraction on a Dask cluster (client=, --scheduler)")
    if isinstance(client, distributed.Client):
        return client, False
    if not isinstance(client, str):
        raise ConfigError(f"client={client!r}: give a dask.distributed.Client or a scheduler address such as "
                          f"tcp://host:8786")
    try:
        return distributed.Client(client, timeout=30), True
    except (OSError, TimeoutError) as e:
        raise ConfigError(f"cannot reach the Dask scheduler at {client} ({type(e).__name__}: {e}); start one "
                          f"(`dask scheduler`, then `dask worker {client}` on each machine) or fix the address") from None


def task_resources(client) -> dict | None:
    """``{"GPU": 1}`` when the cluster has workers declaring GPUs (``dask worker --resources GPU=1``): chunks
    then run on those, one per GPU at a time; None on a cluster of CPU workers."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


class DistributedRun:
    """The chunks of one extraction on a cluster, submitted a few at a time; :meth:`batches` yields their rows."""

    def __init__(self, client, owned: bool, config, weights, paths, sha256s, *, batch_size: int, strict: bool,
                 workers, send: str):
        self.client, self.owned = client, owned
        # decode_threads, not workers: Client.submit's own workers= names the machines a task may run on
        self.task = dict(config=config, weights=weights, batch_size=batch_size, strict=strict, decode_threads=workers)
        self.paths, self.sha256s = list(paths), list(sha256s)
        self.chunk = batch_size
        self.send = send
        self._versions: dict = {}

    def __enter__(self) -> "DistributedRun":
        n_threads = sum(self.client.nthreads().values())
        if not n_threads:
            raise ConfigError(f"the Dask cluster at {self.client.scheduler.address} has no workers; start some "
                              f"(`dask worker {self.client.scheduler.address}`) and re-run")
        self.in_flight = CHUNKS_PER_THREAD * n_threads
        self.resources = task_resources(self.client)
        if self.send == "auto":
            sample = self.paths[:: max(1, len(self.paths) // 8)][:8]
            seen = self.client.run(paths_readable, sample)
            self.send = "paths" if all(seen.values()) else "bytes"
        log.info("Dask cluster %s: %d workers, %d threads%s; workers get image %s", self.client.scheduler.address,
                 len(self.client.nthreads()), n_threads, ", GPU resources" if self.resources else "", self.send)
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.client.close()

    def _submit(self, start: int):
        stop = min(start + self.chunk, len(self.paths))
        paths = self.paths[start:stop]
        payload = None
        if self.send == "bytes":
            payload = []
            for p in paths:
                with open(p, "rb") as f:
                    payload.append(f.read())
        return self.client.submit(compute_chunk, start=start, paths=paths, sha256s=self.sha256s[start:stop],
                                  payload=payload, resources=self.resources, pure=False, **self.task)

    def batches(self):
        """Each chunk's :class:`FeatureBatch` (indices into the paths), in the order chunks finish."""
        distributed = require("distributed", why="extraction on a Dask cluster")
        starts = iter(range(0, len(self.paths), self.chunk))
        pending = distributed.as_completed([self._submit(s) for s, _ in zip(starts, range(self.in_flight))])
        t0, done = time.perf_counter(), 0
        try:
            for future in pending:
                _, batch, self._versions = future.result()
                future.release()
                nxt = next(starts, None)
                if nxt is not None:
                    pending.add(self._submit(nxt))
                done += len(batch.indices) + len(batch.failures)
                yield batch
        finally:
            for future in pending.futures:
                future.cancel()
        seconds = time.perf_counter() - t0
        log.info("cluster: %d images in %.1fs (%.1f images/s)", done, seconds, done / max(seconds, 1e-9))

    def versions(self) -> dict:
        return self._versions


def distributed_batches(client, config, weights, paths, sha256s, *, batch_size: int, strict: bool, workers=None,
                        send: str = "auto") -> DistributedRun:
    """The run that computes ``paths`` on the cluster of ``client`` (a Client or scheduler address).

    ``send``: "paths" (workers read a shared filesystem), "bytes" (this process reads the files and
    sends their bytes), or "auto" (paths when every worker sees a sample of them, else bytes).
    """
    if send not in ("auto", "paths", "bytes"):
        raise ConfigError(f"send={send!r}: choose auto, paths or bytes")
    client, owned = connect(client)
    return DistributedRun(client, owned, config, weights, paths, sha256s, batch_size=batch_size, strict=strict,
                          workers=workers, send=send)
