"""Batches of image files (or images in memory) -> feature rows, as fast as the hardware allows.

The one code path every feature goes through: ``extract`` (into the store) and ``DeepFeatures``
(inside a fitted Pipeline) both call :meth:`FeatureEngine.iter_features`, or for uint8 arrays
:meth:`FeatureEngine.iter_array_features`, which shares its decode-ahead and batching.

The engine knows nothing of HDF5, nor of how a runtime runs the model (:mod:`fracfeat._runtimes`;
the runners compute every image at one fixed batch shape, so ``batch_size`` never changes a
feature). Decoding runs in a thread pool ahead of the model (Pillow and TensorFlow both release the
GIL), so the CPU decodes the next batch while the backbone runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ._backbones import MODEL_IDENTITY, ResolvedWeights, backbone_spec, kept_model_file, resolve_weights
from ._config import ExtractorConfig
from ._errors import ImageError, WeightsError
from ._images import DecodedImage, PixelRecipe, load_image, pixels_from_array
from ._runtimes import build_runner


def _digest(identity: str) -> str:
    # "file:sha256:<hex>" and "imagenet:sha256:<hex>" name the same bytes when the hex agrees.
    return identity.rsplit(":", 1)[-1] if ":sha256:" in identity else identity


def verified_weights(config: ExtractorConfig, weights) -> ResolvedWeights:
    """Resolve ``weights`` ("imagenet", a path, None, or already resolved) and check they are the ones ``config``
    names.

    Raises :class:`WeightsError` when the file's sha256 differs from the recorded identity, because
    other weights give other features and every prediction would silently be wrong. A Keras model object's
    file is verified by its content when it is loaded (any save of that model has other bytes).
    """
    if config.weights.startswith(MODEL_IDENTITY) and not isinstance(weights, ResolvedWeights):
        return kept_model_file(weights, config.weights)
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(backbone_spec(config.backbone),
                                                                                     weights)
    if _digest(resolved.identity) != _digest(config.weights):
        raise WeightsError(
            f"weights {resolved.path or weights!r} ({resolved.identity}) are not the weights these features were "
            f"made with ({config.weights}). Pass the original file, e.g. "
            f"pipeline.set_params(features__weights='/path/to/original.h5')"
        )
    return ResolvedWeights(resolved.kind, resolved.path, config.weights)


@dataclass
class FeatureBatch:
    """Features for ``indices`` (positions in the input list), plus files that failed."""

    indices: np.ndarray
    features: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)


def tile_origins(size: int, tiles: int) -> list[tuple[int, int]]:
    """(top, left) of each of ``tiles`` x ``tiles`` tiles of ``size`` px overlapping by half, in the row-major
    order :meth:`FeatureEngine.forward` cuts and pools them in (heatmaps place each tile's map there)."""
    stride = size // 2
    return [(i * stride, j * stride) for i in range(tiles) for j in range(tiles)]


class FeatureEngine:
    """A lazily built feature model plus the decode pipeline feeding it."""

    def __init__(self, config: ExtractorConfig, weights: ResolvedWeights):
        self.config = config
        self.weights = weights
        self._runners: dict[int, object] = {}

    def runner_for(self, size: int):
        """The backbone + pooling at one input size (a plain extractor: no tiles, no scales)."""
        if size not in self._runners:
            # The view is applied to pixels before the graph: every view shares one graph (and OpenVINO cache entry).
            unit = dataclasses.replace(self.config, image_size=size, tiles=1, scales=(), view="")
            self._runners[size] = build_runner(unit, self.weights)
        return self._runners[size]

    @property
    def runner(self):
        return self.runner_for(self.config.image_size if not self.config.scales else self.config.scales[0])

    @property
    def n_features(self) -> int:
        c = self.config
        if c.scales:
            return sum(self.runner_for(s).n_features for s in c.scales)
        return self.runner.n_features * (2 if c.tiles > 1 else 1)

    def versions(self) -> dict:
        """Versions of the software computing the features (for provenance)."""
        return self.runner.versions()

    def _run(self, runner, batch: np.ndarray) -> np.ndarray:
        # Runners compute each image at one fixed batch shape (see fracfeat._runtimes), so the rows do
        # not depend on how many images a call gets: batch_size can never change a feature.
        out = runner(np.ascontiguousarray(batch, dtype=np.uint8))
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Features of already decoded uint8 images, shape (n, d, d, 3) with d = ``config.decode_size``."""
        c = self.config
        if c.tiles > 1:
            s, n = c.image_size, c.tiles
            tiles = np.stack([batch[:, top:top + s, left:left + s] for top, left in tile_origins(s, n)],
                             axis=1)  # (b, n*n, s, s, 3)
            feats = self._run(self.runner, tiles.reshape(-1, s, s, 3)).reshape(len(batch), n * n, -1)
            return np.concatenate([feats.mean(axis=1), feats.max(axis=1)], axis=1)
        if c.scales:
            parts = []
            for size in c.scales:
                # Smaller scales are resized from the decoded largest one with the decoder's own filter.
                scaled = batch if size == c.decode_size else np.stack([pixels_from_array(im, size) for im in batch])
                parts.append(self._run(self.runner_for(size), scaled))
            return np.concatenate(parts, axis=1)
        return self._run(self.runner, batch)

    def iter_decoded(self, paths: Sequence[str], workers: int | None = None, lookahead: int = 64,
                     sha256s: Sequence[str] | None = None) -> Iterator[tuple[int, DecodedImage]]:
        """Decode files in a thread pool, yielding results in input order.

        ``sha256s``: the hash each file had when it was looked up in the cache; a file whose bytes
        differ now is a failure (its features would otherwise be stored under the old hash).
        """
        recipe, policy = PixelRecipe.of(self.config), self.config.truncated

        def decode(i: int, path: str) -> DecodedImage:
            return load_image(path, recipe, policy, None if sha256s is None else sha256s[i])

        yield from _decode_ahead(paths, decode, workers, lookahead)

    def iter_decoded_arrays(self, images: Sequence[np.ndarray], workers: int | None = None,
                            lookahead: int = 64) -> Iterator[tuple[int, DecodedImage]]:
        """As :meth:`iter_decoded` for uint8 images in memory; a malformed one raises ``ValueError``."""
        recipe = PixelRecipe.of(self.config)
        yield from _decode_ahead(images, lambda i, image: DecodedImage(pixels_from_array(image, recipe)),
                                 workers, lookahead)

    def iter_features(
        self, paths: Sequence[str], batch_size: int = 32, strict: bool = False, workers: int | None = None,
        sha256s: Sequence[str] | None = None,
    ) -> Iterator[FeatureBatch]:
        """Yield a :class:`FeatureBatch` per ``batch_size`` decoded images, in input order."""
        decoded = self.iter_decoded(paths, workers=workers, lookahead=max(2 * batch_size, 16), sha256s=sha256s)
        yield from self._batches(decoded, batch_size, strict, paths)

    def iter_array_features(self, images: Sequence[np.ndarray], batch_size: int = 32,
                            workers: int | None = None) -> Iterator[FeatureBatch]:
        """As :meth:`iter_features` for uint8 images in memory ((h, w), (h, w, 1), (h, w, 3) or (h, w, 4)).

        Each image is resized (and given the config's view) as a decoded file is, then goes through
        the same batching and forward chunks, so an image and its file give the same features.
        """
        decoded = self.iter_decoded_arrays(images, workers=workers, lookahead=max(2 * batch_size, 16))
        yield from self._batches(decoded, batch_size, True, None)

    def _batches(self, decoded: Iterator[tuple[int, DecodedImage]], batch_size: int, strict: bool,
                 paths: Sequence[str] | None) -> Iterator[FeatureBatch]:
        # The one batching loop: files and arrays alike (``paths`` names the files in errors; None for arrays,
        # whose malformed images raise while decoding instead of coming back as failures).
        size = self.config.decode_size
        buf = np.empty((batch_size, size, size, 3), dtype=np.uint8)
        idx: list[int] = []
        failures: list[tuple[int, str]] = []
        truncated: list[int] = []
        for i, image in decoded:
            if image.pixels is None:
                if strict:
                    name = paths[i] if paths is not None else f"image {i}"
                    raise ImageError(f"{name}: {image.error} (strict mode stops at the first bad file; "
                                     f"without strict (API strict=False, CLI without --strict) it is recorded as a "
                                     f"failure row and the run goes on)")
                failures.append((i, image.error))
                continue
            if image.truncated:
                truncated.append(i)
            buf[len(idx)] = image.pixels
            idx.append(i)
            if len(idx) == batch_size:
                yield FeatureBatch(np.array(idx), self.forward(buf), failures, truncated)
                idx, failures, truncated = [], [], []
        if idx or failures:
            feats = self.forward(buf[: len(idx)]) if idx else np.empty((0, 0), np.float32)
            yield FeatureBatch(np.array(idx, dtype=np.int64), feats, failures, truncated)


def _decode_ahead(items: Sequence, decode, workers: int | None, lookahead: int) -> Iterator[tuple[int, DecodedImage]]:
    """``(i, decode(i, item))`` in input order, decoding up to ``lookahead`` items ahead in a thread pool
    (Pillow and TensorFlow both release the GIL, so the CPU decodes the next batch while the backbone runs)."""
    workers = workers or min(32, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fracfeat-decode") as pool:
        pending: deque = deque()
        it = iter(enumerate(items))
        for i, item in it:
            pending.append((i, pool.submit(decode, i, item)))
            if len(pending) >= lookahead:
                break
        while pending:
            i, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(decode, *nxt)))
            yield i, fut.result()
