"""extract(): records -> content hashes -> cache lookup -> engine (misses only) -> new store version."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ._config import ExtractorSettings, settings_doc, signature_with_settings
from ._distributed import distributed_batches
from ._engine import FeatureEngine
from ._errors import ConfigError, ImageError, SourceError
from ._faults import pause_point
from ._featureset import METADATA_ATTRS, FeatureSet, join_features
from ._hardware import preferred_batch_size
from ._images import UnreadableFileError, failure_kind, sha256_of_file
from ._presets import preset_defaults
from ._progress import progress_bar
from ._runtimes import keras_versions, kept_quantized
from ._sources import ROW_METADATA, load_records
from ._store import FeatureStore, StoreWriter, records_sha256, utc_now
from ._version import __version__

log = logging.getLogger("fracfeat")


def _sha256_or_reason(path: str) -> tuple[str | None, str | None]:
    try:
        return sha256_of_file(path), None
    except UnreadableFileError as e:
        return None, e.reason


def hash_files(paths, workers: int = 4, progress: bool = False):
    """sha256 of each file's bytes (or the reason it cannot be read), in input order."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fracfeat-hash") as pool:
        results = pool.map(_sha256_or_reason, paths, chunksize=16)
        return list(progress_bar(results, total=len(paths), desc="hashing", unit="img", enabled=progress, leave=False))


def _runtime_versions(engine_versions: dict | None, writer: StoreWriter, fingerprint: str) -> dict:
    """Versions of the software that made the rows: the engine's when this run computed rows, else the parent's."""
    keys = ("keras_version", "keras_backend", "tensorflow_version", "openvino_version")
    if engine_versions is None:
        parent = writer.latest_with_fingerprint(fingerprint)
        if parent:
            prov = writer.store.provenance(parent)
            return {k: prov.get(k, "") for k in keys}
        engine_versions = keras_versions()
    return {k: engine_versions.get(k, "") for k in keys}


def join_settings() -> tuple[str, ...]:
    """Extractor settings a part of extract(join=...) may change; the rest (weights, view, store...) is the call's."""
    return tuple(f.name for f in ExtractorSettings.options() if f.metadata["per_part"])


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
        unknown = sorted(set(part) - set(join_settings()))
        if unknown:
            raise ConfigError(f"join part {n} sets {', '.join(unknown)}: a part may change only "
                              f"{', '.join(join_settings())}; pass the others to the call itself")
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
    store="fracfeat-store",
    weights="imagenet",
    join=None,
    batch_size: int | None = None,
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
    client=None,
    **settings,
) -> FeatureSet:
    """Turn every image of ``source`` into a feature vector and save them as a new store version.

    Rows already computed under the same extractor settings (same backbone, weights, input size,
    pooling, preprocessing, precision, runtime) are reused from the store by the sha256 of the image
    bytes, so only new or changed images reach the CNN.

    Parameters
    ----------
    source : str, Path, list of paths, or mapping
        A folder of class subfolders (``fractured/``, ``not_fractured/``), a folder of split folders
        (``train/``, ``val/``, ``test/``) each holding class folders, a folder of images (unlabeled), a CSV
        manifest with a path column (optional label, split, group, source, region and projection columns), or
        a list of image paths. Several sources together: ``{"fracatlas": "data/fracatlas/manifest.csv",
        "hbfmid": "data/hbfmid"}``, each row tagged with its source's name (``FeatureSet.sources``).
    preset : str or Preset, optional
        A named preset (:func:`fracfeat.presets`): its extractor settings fill every one this call does
        not pass (keywords given win), so :func:`fracfeat.fit` with the same preset accepts the features.
    store : str or Path
        Feature store directory; created if missing.
    weights : "imagenet", path, or None
        Keras' ImageNet weights (downloaded and cached by Keras), a Keras weights file of the no-top
        model, or None for seeded random weights (tests).
    join : sequence of dict, optional
        Features of several extractors side by side: each dict changes some of this call's extractor
        settings (any but ``truncated`` and ``view``), e.g. ``[dict(layers=("block3_pool", "block4_pool")),
        dict(image_size=448)]``. Each part is extracted as its own store version (cached like any
        other) and the result is :func:`fracfeat.join_features` of them, in this order.
    batch_size : int, optional
        Images per forward pass; None lets the engine choose (256 on a GPU, 32 on CPUs).
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
        Seconds to wait for another process committing to the same store (the lock is held only to save a
        checkpoint and to commit: extractions into one store compute side by side).
    description : str
        Free text kept in the version's provenance.
    progress : bool
        Show progress bars (the extraction's shows the images/s of the whole cluster with ``client``).
    client : dask.distributed.Client or str, optional
        Compute the cache misses on a Dask cluster (``pip install fracfeat[dask]``): a ``Client`` or a
        scheduler address (``"tcp://host:8786"``). Each worker builds the backbone once; workers read the
        images from a shared filesystem, or get their bytes from this process where they cannot see
        them; rows come back here, where this process alone writes the store. Workers started with
        ``--resources GPU=1`` take one GPU each. Features equal a local run's (same fingerprint).
    **settings
        The extractor settings, the fields of :class:`fracfeat.ExtractorSettings`:
{settings}

    Returns
    -------
    FeatureSet
        The rows of the new (or identical existing) version, in source order, failures excluded.
        Its ``X`` is read from the store version on first access: extracting a 100k-image source
        streams rows to disk and never holds the whole feature matrix unless asked to.
        Its ``provenance`` is the version's, except ``n_computed``, ``n_reused`` and
        ``compute_seconds``, which describe this call (0 computed when every row came from the cache),
        and ``new_version``: True when this call wrote the version, False when an identical one was there.

    Examples
    --------
    >>> from fracfeat import extract
    >>> fs = extract("data/fracatlas", backbone="vgg16", store="fracfeat-store")  # doctest: +SKIP
    >>> fs.X.shape, fs.version                                                    # doctest: +SKIP
    ((4083, 512), 1)
    """
    chosen = ExtractorSettings.from_kwargs("extract", **settings)
    if join is not None:
        return _extract_joined(source, join, chosen, dict(
            store=store, weights=weights, batch_size=batch_size, strict=strict, labels=labels,
            groups=groups, splits=splits, class_map=class_map, checkpoint_every=checkpoint_every, workers=workers,
            lock_timeout=lock_timeout, description=description, progress=progress, client=client))
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r}: give a positive integer")
    if not isinstance(checkpoint_every, (int, np.integer)) or checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every!r}: give a positive integer")
    t_start = time.perf_counter()
    records, source_desc = load_records(source, labels=labels, groups=groups, splits=splits, class_map=class_map)
    config, resolved_weights = chosen.resolve(weights)
    feature_store = store if isinstance(store, FeatureStore) else FeatureStore(store, lock_timeout=lock_timeout)
    return _extract_resolved(records, source_desc, config, resolved_weights, feature_store, batch_size=batch_size,
                             strict=strict, workers=workers, checkpoint_every=checkpoint_every,
                             description=description, progress=progress, t_start=t_start, client=client)


extract.__doc__ = extract.__doc__.replace("{settings}", settings_doc(indent=8))
extract.__signature__ = signature_with_settings(extract)


def _extract_joined(source, join, settings: ExtractorSettings, call: dict) -> FeatureSet:
    """extract(join=...): each part's settings over the call's, extracted in turn, joined."""
    parts = join_parts(join)
    given = settings.given()
    clash = sorted({k for part in parts for k in part if k in given})
    if clash:
        raise ConfigError(f"{', '.join(f'{k}={given[k]!r}' for k in clash)} is given beside join parts that set "
                          f"{', '.join(clash)}; set it in each part instead")
    return join_features(*(extract(source, **call, **vars(settings.replace(**part))) for part in parts))


def _extract_resolved(records, source_desc, config, resolved_weights, feature_store: FeatureStore, *, batch_size,
                      strict, workers, checkpoint_every, description, progress, t_start, client=None) -> FeatureSet:
    """extract() once its records and extractor are known: hashes -> plan -> compute -> commit.

    The writer lock is held only to save a checkpoint and to commit, so two extractions into one store
    compute side by side. The commit re-reads the cache under the lock (:func:`_replan`): rows another
    writer committed meanwhile are taken from its version, and rows it can no longer find are computed there.
    """
    ids, failed = _content_hashes(records, strict, progress)
    cached = _cached_version(feature_store, records, source_desc, config, ids, failed)
    if cached is not None:
        return cached
    with feature_store.writer():
        pass  # a read-only or foreign store= is refused before any image is computed, not after
    plan = _plan(feature_store, records, source_desc, config, ids, failed)
    compute = dict(batch_size=batch_size, strict=strict, workers=workers, checkpoint_every=checkpoint_every,
                   progress=progress, client=client)
    engine_versions, run_counts = _compute(checkpoint_saver(feature_store), plan, config, resolved_weights, **compute)
    with feature_store.writer() as writer:
        more_versions = _replan(writer, plan, config, resolved_weights, run_counts, compute)
        n, existed = _commit(writer, plan, config, resolved_weights, engine_versions or more_versions, run_counts,
                             description)
    fs = feature_store.open(n, lazy=True)
    fs.provenance["new_version"] = not existed  # what this call did, like the counts below: not on disk
    if existed:
        fs.provenance.update(run_counts)  # what this call did; the existing version keeps its own counts on disk
        return fs
    log.info("store %s: wrote v%d (%d images x %d features) in %.1fs", feature_store.root, n, len(fs),
             fs.n_features, time.perf_counter() - t_start)
    return fs


def checkpoint_saver(feature_store: FeatureStore):
    """``save(fingerprint, run_id, seq, ids, rows, flags) -> path`` that takes the writer lock for one checkpoint."""

    def save(*args):
        with feature_store.writer() as writer:
            return writer.write_checkpoint(*args)

    return save


def _replan(writer: StoreWriter, plan: "_Plan", config, resolved_weights, run_counts: dict, compute: dict):
    """Under the lock, before the commit: the cache as it is now, and the rows it lacks computed.

    Another writer may have committed since this run planned (its rows now sit in a version) and then
    removed the checkpoints its version covers; a checkpoint may have been set aside as damaged. Returns
    the engine's versions when rows had to be computed here, else None.
    """
    fresh = writer.cache_index(config.fingerprint)
    todo: dict[str, int] = {}
    for i, digest in enumerate(plan.ids):
        if digest is not None and i not in plan.failed and digest not in fresh and digest not in todo:
            todo[digest] = i
    plan.index = fresh
    if not todo:
        return None
    log.info("%d rows are no longer in the store's cache; computing them again", len(todo))
    again = _Plan(plan.records, plan.source_desc, plan.paths, plan.ids, plan.failed, fresh, todo, 0)
    versions, counts = _compute(writer.write_checkpoint, again, config, resolved_weights, **compute)
    run_counts["n_computed"] += counts["n_computed"]
    run_counts["compute_seconds"] = round(run_counts["compute_seconds"] + counts["compute_seconds"], 3)
    return versions


def _cached_version(feature_store: FeatureStore, records, source_desc: str, config, ids, failed):
    """The existing version that holds exactly these rows, found without the writer lock, or None.

    An extraction with nothing to write takes no lock, so a read-only store (another user's, a
    read-only mount) serves it, and readers of a busy store never queue behind its writer.
    """
    if not feature_store.exists():
        return None
    if feature_store.has_checkpoints(config.fingerprint) and os.access(feature_store.root, os.W_OK):
        return None  # a writer is to remove what a killed run left, once its rows are in a version
    index = feature_store.cache_index(config.fingerprint)
    if any(d is not None and d not in index for d in ids):
        return None
    plan = _Plan(records, source_desc, [r.path for r in records], ids, dict(failed), index, {},
                 sum(1 for d in ids if d is not None))
    table, failures = _version_rows(plan)
    n = feature_store.identical_version(config.fingerprint, _content_sha256(table, failures))
    if n is None:
        return None
    log.info("nothing changed: store version v%d already holds these %d images", n, len(table["ids"]))
    fs = feature_store.open(n, lazy=True)
    fs.provenance.update(new_version=False, n_computed=0, n_reused=plan.n_reused, compute_seconds=0.0)
    return fs


@dataclass
class _Plan:
    """What one extract call works on, planned without the lock and re-read under it to commit. Rows are keyed by
    content hash."""

    records: list
    source_desc: str
    paths: list  # each record's path
    ids: list  # each record's sha256; None where the file cannot be read
    failed: dict  # record index -> why it cannot be used (hashing, then computing adds to it)
    index: dict  # id -> (file, row, truncated): every row held under the fingerprint (computing adds to it)
    todo: dict  # id -> its first record's index: the rows to compute, once per distinct content
    n_reused: int


def _content_hashes(records, strict: bool, progress: bool) -> tuple[list, dict[int, str]]:
    """Each record's sha256 (None where unreadable), and record index -> reason for the unreadable ones."""
    paths = [r.path for r in records]
    hashed = hash_files(paths, progress=progress)
    failed: dict[int, str] = {}
    for i, (digest, error) in enumerate(hashed):
        if error is not None:
            if strict:
                raise ImageError(f"{paths[i]}: {error} (strict mode stops here; without strict "
                                 f"(API strict=False, CLI without --strict) it becomes a failure row)")
            failed[i] = error
    return [h for h, _ in hashed], failed


def _plan(feature_store: FeatureStore, records, source_desc: str, config, ids, failed) -> _Plan:
    """Look every id up in the store's cache (without the lock); what no cache file holds is to compute."""
    index = feature_store.cache_index(config.fingerprint)  # damaged checkpoints skipped: their rows are computed again
    # One computation per distinct content, first occurrence in source order.
    todo: dict[str, int] = {}
    for i, digest in enumerate(ids):
        if digest is not None and digest not in index and digest not in todo:
            todo[digest] = i
    n_reused = sum(1 for d in ids if d is not None and d in index)
    log.info("%s: %d images, %d cached, %d to compute (%s %spx %s)", source_desc, len(records), n_reused,
             len(todo), config.backbone, config.image_size, config.pooling)
    return _Plan(records, source_desc, [r.path for r in records], ids, failed, index, todo, n_reused)


def _compute(save, plan: _Plan, config, resolved_weights, *, batch_size, strict, workers, checkpoint_every,
             progress, client=None) -> tuple[dict | None, dict]:
    """Compute the plan's misses into checkpoints (``save``: :func:`checkpoint_saver`); images that fail to
    decode join ``plan.failed``. ``client``: a Dask client or scheduler address (:mod:`fracfeat._distributed`).

    Returns the engine's software versions (None when nothing was computed) and this call's counts.
    """
    t_compute = time.perf_counter()
    bad_content: dict[str, str] = {}
    engine_versions = None
    if plan.todo:
        batch_size = batch_size or preferred_batch_size(config)
        miss_ids = list(plan.todo)
        miss_paths = [plan.paths[plan.todo[d]] for d in miss_ids]
        bar = progress_bar(total=len(miss_paths), desc=f"extract {config.backbone}", unit="img", enabled=progress)
        try:
            if client is None:
                engine = FeatureEngine(config, resolved_weights)
                batches = engine.iter_features(miss_paths, batch_size=batch_size, strict=strict, workers=workers,
                                               sha256s=miss_ids)
                _save_batches(save, config.fingerprint, batches, miss_ids, plan.index, bad_content, checkpoint_every,
                              bar)
                engine_versions = engine.versions()
            else:
                with distributed_batches(client, config, resolved_weights, miss_paths, miss_ids, batch_size=batch_size,
                                         strict=strict, workers=workers) as run:
                    _save_batches(save, config.fingerprint, run.batches(), miss_ids, plan.index, bad_content,
                                  checkpoint_every, bar)
                    engine_versions = run.versions()
        finally:
            bar.close()
    compute_seconds = time.perf_counter() - t_compute
    for i, digest in enumerate(plan.ids):
        if digest in bad_content:
            plan.failed[i] = bad_content[digest]
    run_counts = {
        "n_computed": len(plan.todo) - len(bad_content),
        "n_reused": plan.n_reused,
        "compute_seconds": round(compute_seconds, 3),
    }
    return engine_versions, run_counts


def _commit(writer: StoreWriter, plan: _Plan, config, resolved_weights, engine_versions, run_counts: dict,
            description: str) -> tuple[int, bool]:
    """Write the plan's rows as a new version, unless one holds them already.

    Returns the version's number and whether it existed before this call.
    """
    fingerprint = config.fingerprint
    table, failures = _version_rows(plan)
    content = _content_sha256(table, failures)
    existing = writer.find_identical(fingerprint, content)
    if existing is not None:
        log.info("nothing changed: store version v%d already holds these %d images", existing, len(table["ids"]))
        writer.remove_checkpoints(fingerprint, set(table["ids"]))
        return existing, True
    provenance = {
        "fracfeat_version": __version__,
        "created": utc_now(),
        "source": plan.source_desc,
        "description": description,
        **config.as_dict(),
        "weights_kind": resolved_weights.kind,
        "weights_path": resolved_weights.path or "",
        # An int8 extractor: how its model was quantized (quantization.json: calibration images, NNCF options).
        **({"quantization": kept_quantized(config.quantized)[1]} if config.quantized else {}),
        "fingerprint": fingerprint,
        **_runtime_versions(engine_versions, writer, fingerprint),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "n_records": len(plan.records),
        "n_images": len(table["ids"]),
        "n_failed": len(failures),
        **run_counts,
    }
    n = writer.write_version(fingerprint, table, failures, provenance, content, plan.index)
    pause_point("committed")
    writer.remove_checkpoints(fingerprint, set(table["ids"]))
    return n, False


def _version_rows(plan: _Plan) -> tuple[dict, list[dict]]:
    """The row table of the records that can be used, in source order, and the failures of the others."""
    records, paths, ids, index = plan.records, plan.paths, plan.ids, plan.index
    # A record the source knew to be unusable (DICOM) fails with the source's reason, whatever decoding said.
    failed = {**plan.failed, **{i: r.failure for i, r in enumerate(records) if r.failure}}
    keep = [i for i in range(len(records)) if i not in failed]
    failures = [{"path": paths[i], "id": ids[i] or "", "reason": failed[i]} for i in sorted(failed)]
    if failures:
        reasons = Counter(failure_kind(f["reason"]) for f in failures)
        log.warning("%d of %d images could not be used: %s", len(failures), len(records),
                    "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))
    if not keep:
        raise SourceError(f"none of the {len(records)} images of {plan.source_desc} could be read; first failure: "
                          f"{failures[0]['path']}: {failures[0]['reason']}")
    table = {
        "ids": [ids[i] for i in keep],
        "paths": [os.path.abspath(paths[i]) for i in keep],
        "labels": [records[i].label for i in keep],
        "class_names": [records[i].class_name for i in keep],
        "splits": [records[i].split for i in keep],
        "groups": [records[i].group for i in keep],
        "truncated": [int(index[ids[i]][2]) for i in keep],
        **{attr: [getattr(records[i], name) for i in keep] for name, attr in zip(ROW_METADATA, METADATA_ATTRS)},
    }
    return table, failures


def _content_sha256(table: dict, failures: list[dict]) -> str:
    """The version's ``content_sha256``: its row table and its failures (equal: an identical version)."""
    content = records_sha256(table["ids"], table["paths"], table["labels"], table["class_names"],
                             table["splits"], table["groups"], *(table[name] for name in METADATA_ATTRS))
    failure_key = records_sha256([f["path"] for f in failures], [f["reason"] for f in failures],
                                 *[[""] * len(failures)] * 4)
    return records_sha256([content], [failure_key], [0], [""], [""], [""])


def _save_batches(save, fingerprint: str, batches, miss_ids: list, index: dict, bad_content: dict,
                  checkpoint_every: int, bar) -> None:
    """Checkpoint rows as batches come (``batch.indices`` index ``miss_ids``), adding them to ``index``."""
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # private to this run: no two runs share a file
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
        p = save(fingerprint, run_id, seq, pending_ids, rows, flags)
        for r, (d, t) in enumerate(zip(pending_ids, flags)):
            index[d] = (p, r, t)
        seq += 1
        pending_ids, pending_rows = [], []
        last_flush = time.monotonic()

    for batch in batches:
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
