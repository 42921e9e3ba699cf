"""extract(): records -> content hashes -> cache lookup -> engine (misses only) -> new store version."""

from __future__ import annotations

import inspect
import logging
import os
import platform
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._engine import FeatureEngine, preferred_batch_size, resolve_extractor
from ._errors import ConfigError, ImageError, SourceError
from ._faults import pause_point
from ._featureset import FeatureSet, join_features
from ._images import failure_kind, read_file
from ._presets import preset_defaults
from ._sources import load_records
from ._store import FeatureStore, records_sha256, utc_now
from ._version import __version__

log = logging.getLogger("fracfeat")

ASSEMBLY_CHUNK = 1024


def _hash_one(path: str):
    import hashlib

    data, error = read_file(path)
    if error is not None:
        return None, error
    return hashlib.sha256(data).hexdigest(), None


def hash_files(paths, workers: int = 4, progress: bool = False):
    """sha256 of each file's bytes (or the reason it cannot be read), in input order."""
    from ._progress import progress_bar

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fracfeat-hash") as pool:
        results = pool.map(_hash_one, paths, chunksize=16)
        return list(progress_bar(results, total=len(paths), desc="hashing", unit="img", enabled=progress, leave=False))


def _runtime_versions(engine_versions: dict | None, store: FeatureStore, fingerprint: str) -> dict:
    """Versions of the software that made the rows: the engine's when this run computed rows, else the parent's."""
    keys = ("keras_version", "keras_backend", "tensorflow_version", "openvino_version")
    if engine_versions is None:
        parent = store.latest_with_fingerprint(fingerprint)
        if parent:
            prov = store.provenance(parent)
            return {k: prov.get(k, "") for k in keys}
        from ._engine import keras_versions

        engine_versions = keras_versions()
    return {k: engine_versions.get(k, "") for k in keys}


# Extractor settings a part of extract(join=...) may change; the rest (weights, view, store...) is the call's.
JOIN_SETTINGS = ("backbone", "image_size", "pooling", "tiles", "scales", "layers", "precision", "runtime")


def join_parts(join) -> list[dict]:
    """extract's ``join=``, checked: two or more dicts of extractor settings, no two alike."""
    from collections.abc import Mapping

    if isinstance(join, Mapping) or isinstance(join, (str, bytes)) or not all(isinstance(p, Mapping) for p in join):
        raise ConfigError(f"join={join!r}: give a list of dicts of extractor settings, one per part, e.g. "
                          f"[dict(layers=('block3_pool', 'block4_pool')), dict(image_size=448)]")
    parts = [dict(p) for p in join]
    if len(parts) < 2:
        raise ConfigError(f"join= needs two or more parts (got {len(parts)}); for one, pass its settings directly")
    for n, part in enumerate(parts, 1):
        unknown = sorted(set(part) - set(JOIN_SETTINGS))
        if unknown:
            raise ConfigError(f"join part {n} sets {', '.join(unknown)}: a part may change only "
                              f"{', '.join(JOIN_SETTINGS)}; pass the others to the call itself")
    for n, part in enumerate(parts, 1):
        if part in parts[:n - 1]:
            raise ConfigError(f"join part {n} repeats part {parts.index(part) + 1} ({part}): it would add the same "
                              f"features twice")
    return parts


@preset_defaults("extract")
def extract(
    source,
    *,
    preset=None,
    backbone: str = "vgg16",
    store="fracfeat-store",
    weights="imagenet",
    image_size: int | None = None,
    pooling: str = "avg",
    tiles: int = 1,
    scales=None,
    layers=None,
    view=None,
    join=None,
    batch_size: int | None = None,
    precision: str = "auto",
    runtime: str = "auto",
    truncated: str = "read",
    strict: bool = False,
    labels=None,
    groups=None,
    splits=None,
    class_map: dict | None = None,
    checkpoint_every: int = 1024,
    workers: int | None = None,
    lock_timeout: float = 600.0,
    description: str = "",
    progress: bool = True,
) -> FeatureSet:
    """Turn every image of ``source`` into a feature vector and save them as a new store version.

    Rows already computed under the same extractor settings (same backbone, weights, input size,
    pooling, preprocessing, precision, runtime) are reused from the store by the sha256 of the image
    bytes, so only new or changed images reach the CNN.

    Parameters
    ----------
    source : str, Path, or list of paths
        A folder of class subfolders (``fractured/``, ``not_fractured/``), a folder of split folders
        (``train/``, ``val/``, ``test/``) each holding class folders, a folder of images (unlabeled), a CSV
        manifest with a path column (optional label, split and group columns), or a list of image paths.
    preset : str or Preset, optional
        A named preset (:func:`fracfeat.presets`): its extractor settings fill every one this call does
        not pass (keywords given win), so :func:`fracfeat.fit` with the same preset accepts the features.
    backbone : {"vgg16", "resnet50", "efficientnetb2"}
    store : str or Path
        Feature store directory; created if missing.
    weights : "imagenet", path, or None
        Keras' ImageNet weights (downloaded and cached by Keras), a Keras weights file of the no-top
        model, or None for seeded random weights (tests).
    image_size : int, optional
        Square input size; the backbone's default (224, 224, 260) when None.
    pooling : {"avg", "max", "none"}
        Global pooling of the last convolution map; "none" flattens it.
    tiles : int
        Keep small detail: ``n`` >= 2 cuts the image, resized to ``image_size * (n + 1) / 2`` px, into
        n x n tiles of ``image_size`` px overlapping by half, and pools the tiles' features by mean and
        by max (concatenated: twice the backbone's width). 1 (default) runs the whole image once.
    scales : sequence of int, optional
        Multi-scale: run the whole image at each of these input sizes and concatenate the features,
        e.g. ``(224, 448)``. Cannot be combined with ``tiles``.
    layers : sequence of str or str, optional
        Multi-layer: globally pool these intermediate layers of the backbone with ``pooling`` and put
        them, in this order, before the final features, e.g. ``("block3_pool", "block4_pool")`` for
        VGG16 (256 + 512 + 512 features), or ``"all"`` for every tap point the backbone offers. Needs
        ``pooling`` "avg" or "max"; combines with ``tiles`` and ``scales`` (each view gets them all).
    view : str, optional
        An augmented view of every image, made after decoding and before resizing: ``"hflip"``,
        ``"rot+10"``/``"rot-10"`` (degrees, 1-45), ``"cropF"`` (central fraction F of each side, 0.5-0.95,
        decoded at full detail). Its own store entry (the view is in the fingerprint and provenance);
        rows keep the original's id, path and group, so :func:`fracfeat.fit` can train on them with
        ``augment=`` without a view ever crossing a fold.
    join : sequence of dict, optional
        Features of several extractors side by side: each dict changes some of this call's extractor
        settings (``backbone``, ``image_size``, ``pooling``, ``tiles``, ``scales``, ``layers``,
        ``precision``, ``runtime``), e.g. ``[dict(layers=("block3_pool", "block4_pool")),
        dict(image_size=448)]``. Each part is extracted as its own store version (cached like any
        other) and the result is :func:`fracfeat.join_features` of them, in this order.
    batch_size : int, optional
        Images per forward pass; None lets the engine choose (256 on a GPU, 32 on CPUs).
    precision : {"auto", "float32", "bfloat16", "float16"}
    runtime : {"auto", "keras", "openvino"}
        "auto" picks the fastest correct path for the backbone and hardware.
    truncated : {"read", "reject"}
        Truncated image files: decode what is there (flagged per row) or report them as failures.
    strict : bool
        Stop at the first unreadable image instead of recording it as a failure.
    labels, groups, splits : sequences, optional
        Per-path metadata when ``source`` is a list of paths.
    class_map : dict, optional
        Class folder/label names -> 1 (fractured) or 0 (not fractured), for names fracfeat does not know.
    checkpoint_every : int
        Computed rows are saved to the store every this many images, so a killed run resumes.
    workers : int, optional
        Decoding threads.
    lock_timeout : float
        Seconds to wait for another process writing the same store.
    description : str
        Free text kept in the version's provenance.
    progress : bool
        Show progress bars.

    Returns
    -------
    FeatureSet
        The rows of the new (or identical existing) version, in source order, failures excluded.
        Its ``X`` is read from the store version on first access: extracting a 100k-image source
        streams rows to disk and never holds the whole feature matrix unless asked to.
        Its ``provenance`` is the version's, except ``n_computed``, ``n_reused`` and
        ``compute_seconds``, which describe this call (0 computed when every row came from the cache).

    Examples
    --------
    >>> from fracfeat import extract
    >>> fs = extract("data/fracatlas", backbone="vgg16", store="fracfeat-store")  # doctest: +SKIP
    >>> fs.X.shape, fs.version                                                    # doctest: +SKIP
    ((4083, 512), 1)
    """
    if join is not None:
        call = {k: v for k, v in locals().items() if k not in ("source", "preset", "join")}
        parts = join_parts(join)
        given = sorted({k for part in parts for k in part if call[k] != _DEFAULTS[k]})
        if given:
            raise ConfigError(f"{', '.join(f'{k}={call[k]!r}' for k in given)} is given beside join parts that set "
                              f"{', '.join(given)}; set it in each part instead")
        return join_features(*(extract(source, **{**call, **part}) for part in parts))
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r}: give a positive integer")
    if not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every!r}: give a positive integer")
    t_start = time.perf_counter()
    records, source_desc = load_records(source, labels=labels, groups=groups, splits=splits, class_map=class_map)
    config, resolved_weights = resolve_extractor(backbone, weights, image_size, pooling, precision, runtime, truncated,
                                                 tiles=tiles, scales=scales, layers=layers, view=view)
    fingerprint = config.fingerprint
    feature_store = store if isinstance(store, FeatureStore) else FeatureStore(store, lock_timeout=lock_timeout)

    paths = [r.path for r in records]
    hashed = hash_files(paths, progress=progress)
    failed: dict[int, str] = {}  # record index -> reason
    for i, (digest, error) in enumerate(hashed):
        if error is not None:
            if strict:
                raise ImageError(f"{paths[i]}: {error} (strict=True; pass strict=False to skip it)")
            failed[i] = error
    ids = [h for h, _ in hashed]

    with feature_store.write_lock():
        # Under the lock: two first writers creating one store at once must not see each other's
        # half-made layout as a foreign directory, nor delete each other's marker file from tmp/.
        feature_store.create()
        feature_store.clean_tmp()
        index = feature_store.cache_index(fingerprint)
        # One computation per distinct content, first occurrence in source order.
        todo: dict[str, int] = {}
        for i, digest in enumerate(ids):
            if digest is not None and digest not in index and digest not in todo:
                todo[digest] = i
        n_reused = sum(1 for i, d in enumerate(ids) if d is not None and d in index)
        log.info("%s: %d images, %d cached, %d to compute (%s %spx %s)", source_desc, len(records), n_reused,
                 len(todo), config.backbone, config.image_size, config.pooling)

        t_compute = time.perf_counter()
        bad_content: dict[str, str] = {}
        engine_versions = None
        if todo:
            engine_versions = _compute_missing(feature_store, config, resolved_weights, todo, paths, index, bad_content,
                             batch_size, strict, workers, checkpoint_every, progress)
        compute_seconds = time.perf_counter() - t_compute
        for i, digest in enumerate(ids):
            if digest in bad_content:
                failed[i] = bad_content[digest]

        keep = [i for i in range(len(records)) if i not in failed]
        failures = [{"path": paths[i], "id": ids[i] or "", "reason": failed[i]} for i in sorted(failed)]
        if failures:
            reasons = Counter(failure_kind(f["reason"]) for f in failures)
            log.warning("%d of %d images could not be used: %s", len(failures), len(records),
                        "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))
        if not keep:
            raise SourceError(f"none of the {len(records)} images of {source_desc} could be read; first failure: "
                              f"{failures[0]['path']}: {failures[0]['reason']}")

        table = {
            "ids": [ids[i] for i in keep],
            "paths": [os.path.abspath(paths[i]) for i in keep],
            "labels": [records[i].label for i in keep],
            "class_names": [records[i].class_name for i in keep],
            "splits": [records[i].split for i in keep],
            "groups": [records[i].group for i in keep],
        }
        table["truncated"] = [int(index[ids[i]][2]) for i in keep]
        content = records_sha256(table["ids"], table["paths"], table["labels"], table["class_names"],
                                 table["splits"], table["groups"])
        failure_key = records_sha256([f["path"] for f in failures], [f["reason"] for f in failures], *[[""] * len(failures)] * 4)
        content = records_sha256([content], [failure_key], [0], [""], [""], [""])
        # What this call did; an identical existing version keeps its own counts on disk.
        run_counts = {
            "n_computed": len(todo) - len(bad_content),
            "n_reused": n_reused,
            "compute_seconds": round(compute_seconds, 3),
        }
        existing = feature_store.find_identical(fingerprint, content)
        if existing is not None:
            log.info("nothing changed: store version v%d already holds these %d images", existing, len(keep))
            feature_store.remove_checkpoints(fingerprint, set(table["ids"]))
            fs = feature_store.open(existing, lazy=True)
            fs.provenance.update(run_counts)
            return fs

        provenance = {
            "fracfeat_version": __version__,
            "created": utc_now(),
            "source": source_desc,
            "description": description,
            **config.as_dict(),
            "weights_kind": resolved_weights.kind,
            "weights_path": resolved_weights.path or "",
            "fingerprint": fingerprint,
            **_runtime_versions(engine_versions, feature_store, fingerprint),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "n_records": len(records),
            "n_images": len(keep),
            "n_failed": len(failures),
            **run_counts,
        }
        n = _write_version(feature_store, fingerprint, table, failures, provenance, content, index)
        pause_point("committed")
        feature_store.remove_checkpoints(fingerprint, set(table["ids"]))
    fs = feature_store.open(n, lazy=True)
    log.info("store %s: wrote v%d (%d images x %d features) in %.1fs", feature_store.root, n, len(fs),
             fs.n_features, time.perf_counter() - t_start)
    return fs


# extract's own defaults: a setting that differs from them was given (by the caller or a preset).
_DEFAULTS = {name: p.default for name, p in inspect.signature(extract).parameters.items()}


def _compute_missing(store, config, resolved_weights, todo, paths, index, bad_content,
                     batch_size, strict, workers, checkpoint_every, progress) -> dict:
    """Run the engine on the cache misses, checkpointing rows into the store as they come.

    Returns the versions of the software that computed them (:meth:`FeatureEngine.versions`).
    """
    from ._progress import progress_bar

    engine = FeatureEngine(config, resolved_weights)
    batch_size = batch_size or preferred_batch_size(config)
    miss_ids = list(todo)
    miss_paths = [paths[todo[d]] for d in miss_ids]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    pending_ids: list[str] = []
    pending_rows: list[np.ndarray] = []
    truncated_ids: set[str] = set()
    seq = 0
    last_flush = time.monotonic()

    def flush():
        nonlocal seq, pending_ids, pending_rows, last_flush
        if not pending_ids:
            return
        rows = np.concatenate(pending_rows)
        flags = [d in truncated_ids for d in pending_ids]
        p = store.write_checkpoint(config.fingerprint, run_id, seq, pending_ids, rows, flags)
        for r, (d, t) in enumerate(zip(pending_ids, flags)):
            index[d] = (p, r, t)
        seq += 1
        pending_ids, pending_rows = [], []
        last_flush = time.monotonic()

    bar = progress_bar(total=len(miss_paths), desc=f"extract {config.backbone}", unit="img", enabled=progress)
    try:
        for batch in engine.iter_features(miss_paths, batch_size=batch_size, strict=strict, workers=workers,
                                          sha256s=miss_ids):
            pause_point("batch")
            for k, reason in batch.failures:
                bad_content[miss_ids[k]] = reason
            for k in batch.truncated:
                truncated_ids.add(miss_ids[k])
            if len(batch.indices):
                pending_ids.extend(miss_ids[k] for k in batch.indices)
                pending_rows.append(batch.features)
            bar.update(len(batch.indices) + len(batch.failures))
            if len(pending_ids) >= checkpoint_every or time.monotonic() - last_flush > 120:
                flush()
        flush()
    finally:
        bar.close()
    return engine.versions()


def _write_version(store, fingerprint, table, failures, provenance, content, index) -> int:
    """Stream rows from the cache into a new version file and commit it atomically."""
    import json

    locations = [index[d] for d in table["ids"]]
    first = store.gather(locations[:1])
    n_features = first.shape[1]
    writer = store.begin_version(len(locations), n_features)
    try:
        for start in range(0, len(locations), ASSEMBLY_CHUNK):
            rows = store.gather(locations[start:start + ASSEMBLY_CHUNK])
            if rows.shape[1] != n_features:
                raise ConfigError(f"cached rows disagree on feature width ({rows.shape[1]} vs {n_features}); "
                                  f"the store at {store.root} is damaged: run verify")
            writer.write(start, rows)
        provenance["n_features"] = int(n_features)
        attrs = {
            "provenance": json.dumps(provenance, sort_keys=True, default=str),
            "fingerprint": fingerprint,
            "content_sha256": content,
            "created": provenance["created"],
            "source": provenance["source"],
        }
        for k in ("backbone", "image_size", "pooling", "preprocessing", "weights", "precision", "runtime",
                  "fracfeat_version", "keras_version", "keras_backend"):
            attrs[k] = provenance[k]
        writer.finish(table, failures, attrs)
        return store.commit(writer, fingerprint)
    except BaseException:
        writer.abort()
        raise
