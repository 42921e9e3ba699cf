"""FeatureSet: one store version in memory, the object ``extract`` returns and ``fit`` consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._config import ExtractorConfig
from ._errors import ConfigError
from ._images import failure_kind
from ._sources import ROW_METADATA, UNLABELED

# The FeatureSet attribute of each record metadata field (sources, regions, projections): a str array per row.
METADATA_ATTRS = tuple(name + "s" for name in ROW_METADATA)

DEFAULT_CLASSES = ("not_fractured", "fractured")

log = logging.getLogger("fracfeat")


@dataclass(frozen=True)
class FeaturePart:
    """One extractor's columns of a feature set: how they were made and the store version that holds them.

    A plain feature set has one part (itself); joined features (:func:`join_features`) one per extractor,
    in column order.
    """

    provenance: dict
    store: str | None
    version: int | None
    n_features: int

    @property
    def fingerprint(self) -> str | None:
        return self.provenance.get("fingerprint")

    @property
    def has_extractor(self) -> bool:
        """True when the provenance says how the features were made (a store version's)."""
        return bool(self.provenance.get("backbone"))

    @property
    def config(self) -> ExtractorConfig:
        """The exact extractor (ConfigError when the provenance is not a store version's)."""
        return ExtractorConfig.from_provenance(self.provenance)

    def describe(self) -> str:
        """``vgg16 224px avg``."""
        p = self.provenance
        return f"{p.get('backbone')} {p.get('image_size')}px {p.get('pooling')}"


@dataclass
class FeatureSet:
    """Feature rows plus what is known of each image.

    Attributes
    ----------
    X : ndarray of shape (n_images, n_features), float32
        Where the set came from a store version with ``x_loader``, read on first access (so a
        100k-image extraction does not hold its feature matrix until someone asks for it).
    y : ndarray of shape (n_images,), int, or None
        1 = fractured, 0 = not fractured, -1 = unlabeled row in a partly labeled set.
        None when no row has a label.
    ids : ndarray of str
        sha256 of each image file's bytes.
    paths, groups, splits, class_names : ndarray of str
        Per row; empty strings where the source said nothing.
    sources, regions, projections : ndarray of str
        Per row: the source (hospital, dataset), the body region and the radiographic projection (AP, PA,
        lateral...) of the image, "" where unknown (always "" in store versions written before they existed).
    classes : tuple of str
        Display names of label 0 and label 1 (the source's own names when it had them).
    version : int or None
        Store version the rows come from.
    provenance : dict
        How the features were made (backbone, weights identity, sizes, versions...).
    failures : list of dict
        Files that could not be used: ``{"path", "id", "reason"}``.
    truncated : ndarray of bool
        Rows decoded from truncated files (read as far as they go).
    """

    X: np.ndarray
    y: np.ndarray | None
    ids: np.ndarray
    paths: np.ndarray
    groups: np.ndarray
    splits: np.ndarray
    class_names: np.ndarray
    classes: tuple = DEFAULT_CLASSES
    version: int | None = None
    provenance: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    truncated: np.ndarray | None = None
    store: str | None = None
    x_loader: Any = field(default=None, repr=False, compare=False)
    sources: np.ndarray | None = None
    regions: np.ndarray | None = None
    projections: np.ndarray | None = None

    def __post_init__(self):
        for name in METADATA_ATTRS:
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self.ids), "", dtype=object))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        n_pos = int((self.y == 1).sum()) if self.y is not None else None
        lab = f", {n_pos} fractured" if n_pos is not None else ", unlabeled"
        made = (f"backbone={self.provenance.get('backbone')!r}, version={self.version}"
                if not self.is_joined else f"joined versions {self.version_label}")
        return (f"FeatureSet({len(self)} images x {self.n_features} features{lab}, {made}, "
                f"failures={len(self.failures)})")

    @property
    def n_features(self) -> int:
        if self._X is None and self.x_loader is not None:
            return int(self.x_loader.n_features)
        return int(self.X.shape[1]) if self.X.ndim == 2 else 0

    @property
    def version_label(self) -> str | None:
        """The store version as text: ``"3"``, or ``"1+2"`` for joined features (their parts' versions)."""
        if self.is_joined:
            return "+".join(str(p.version) for p in self.parts)
        return None if self.version is None else str(self.version)

    @property
    def parts(self) -> tuple[FeaturePart, ...]:
        """The extractors whose features these are, in column order: one, or one per part of joined features."""
        joined = self.provenance.get("parts")
        if joined:
            return tuple(FeaturePart(p, p.get("store"), p.get("version"), int(p.get("n_features", 0))) for p in joined)
        return (FeaturePart(self.provenance, self.store, self.version, self.n_features),)

    @property
    def is_joined(self) -> bool:
        return bool(self.provenance.get("parts"))

    @property
    def fingerprint(self) -> str | None:
        """The extractor fingerprint; for joined features the parts' joined by ``+`` (see :attr:`fingerprints`)."""
        return self.provenance.get("fingerprint")

    @property
    def fingerprints(self) -> tuple:
        """Each part's fingerprint."""
        return tuple(p.fingerprint for p in self.parts)

    @property
    def has_groups(self) -> bool:
        return bool(len(self.groups)) and all(g != "" for g in self.groups)

    @property
    def split_names(self) -> list[str]:
        return sorted({s for s in self.splits if s}, key=lambda s: ("train", "val", "test").index(s)
                      if s in ("train", "val", "test") else 3)

    def failure_summary(self) -> dict[str, int]:
        """How many files failed, per kind of failure (most frequent first).

        Kinds are short and stable ("not an image", "truncated image", "file not found", ...); each
        failure row's full ``reason`` names the exact problem and the fix.
        """
        from collections import Counter


        return dict(Counter(failure_kind(f["reason"]) for f in self.failures).most_common())

    def rows_of(self, ids) -> tuple[np.ndarray, int]:
        """(the row of each image id in ``ids``, -1 where this set lacks it; how many it lacks).

        An image held twice (same bytes under two paths) maps to its first row: their features are equal.
        """
        where = {}
        for i, image_id in enumerate(self.ids):
            where.setdefault(str(image_id), i)
        rows = np.array([where.get(str(image_id), -1) for image_id in ids], dtype=np.int64)
        return rows, int((rows < 0).sum())

    def subset(self, rows) -> "FeatureSet":
        """A FeatureSet of the selected rows (boolean mask or integer indices)."""
        rows = np.asarray(rows)
        tr = None if self.truncated is None else self.truncated[rows]
        return replace(
            self, X=self.X[rows], y=None if self.y is None else self.y[rows], ids=self.ids[rows],
            paths=self.paths[rows], groups=self.groups[rows], splits=self.splits[rows],
            class_names=self.class_names[rows], truncated=tr, failures=[],
            **{name: getattr(self, name)[rows] for name in METADATA_ATTRS},
        )

    def split(self, name: str) -> "FeatureSet":
        """Rows of one split ("train", "val", "test")."""
        if name not in set(self.splits):
            raise KeyError(f"no split {name!r} in this feature set; it has {self.split_names or 'no splits'}")
        return self.subset(self.splits == name)

    def labeled(self) -> "FeatureSet":
        """Only rows with a label."""
        if self.y is None:
            return self.subset(np.zeros(len(self), dtype=bool))
        return self.subset(self.y != UNLABELED)


def _get_X(self) -> np.ndarray:
    if self._X is None and self.x_loader is not None:
        self._X = self.x_loader()
    return self._X


def _set_X(self, value) -> None:
    self._X = value


# A property over the dataclass field: ``FeatureSet(X=None, x_loader=...)`` defers reading the rows.
FeatureSet._X = None
FeatureSet.X = property(_get_X, _set_X, doc="Feature rows, (n_images, n_features) float32; loaded on first access.")


def _shown(names, k: int = 5) -> str:
    names = list(names)
    return ", ".join(map(str, names[:k])) + (f" and {len(names) - k} more" if len(names) > k else "")


def labeled_for_training(fs: FeatureSet) -> FeatureSet:
    """The labeled rows a model may learn from and be scored on, made safe (each step warns when it acts).

    - An image (same bytes, so the same id) under both classes is left out, every copy of it, with a
      warning naming its files: no label of it can be trusted, and keeping both would teach the model
      that the image is both. Fix the labels to get it back.
    - When some rows have a group and others have none, each of those gets a group of its own (its image
      id, so byte-identical copies stay together): grouped folds and hold-outs then stay on for the rest.
    """
    data = fs.labeled()
    labels_of: dict[str, set] = {}
    for image_id, label in zip(data.ids, data.y if data.y is not None else ()):
        labels_of.setdefault(str(image_id), set()).add(int(label))
    both = {image_id for image_id, labels in labels_of.items() if len(labels) > 1}
    if both:
        mask = np.array([str(i) in both for i in data.ids], dtype=bool)
        log.warning("%d image%s under both classes (the same bytes in %d files: %s): left out of training and "
                    "scoring; correct the label of each copy", len(both), "s are" if len(both) > 1 else " is",
                    int(mask.sum()), _shown(sorted(map(str, data.paths[mask])), 6))
        data = data.subset(~mask)
    empty = np.asarray([g == "" for g in data.groups], dtype=bool)
    if empty.any() and not empty.all():
        groups = np.asarray(data.groups, dtype=object).copy()
        groups[empty] = [f"image:{i}" for i in data.ids[empty]]
        n = int(empty.sum())
        log.warning("%d row%s no group (%s): each gets a group of its own, its image id, so the other rows stay "
                    "grouped; give %s group to keep near-duplicates together", n, "s have" if n > 1 else " has",
                    _shown(data.paths[empty], 3), "them their" if n > 1 else "it its")
        data = replace(data, groups=groups)
    return data


def classes_from_rows(labels: np.ndarray, class_names: np.ndarray) -> tuple[str, str]:
    """The source's own names for label 0 and 1, falling back to the defaults."""
    names = list(DEFAULT_CLASSES)
    for label in (0, 1):
        seen = sorted({n for n, l in zip(class_names, labels) if l == label and n})
        if len(seen) == 1:
            names[label] = seen[0]
    return tuple(names)


def join_features(*sets: FeatureSet) -> FeatureSet:
    """Feature sets of the same images side by side: one row per image, the sets' features concatenated.

    Features of different extractors complement each other (intermediate layers at 224 px beside the
    final layer at 448 px, say). Each part keeps its own store version and provenance, and
    :func:`fracfeat.fit` on the joined set gives a Pipeline whose feature step (a
    :class:`~fracfeat._transformer.JoinedFeatures`) makes every part from the image, so it still
    takes image paths.

    Parameters
    ----------
    *sets : FeatureSet
        Two or more, e.g. from :func:`fracfeat.extract` or ``FeatureStore.open``. Rows are matched by
        image id (sha256 of the file); the first set's rows, labels and groups are kept, and every
        other set must hold each of its images.

    Returns
    -------
    FeatureSet
        ``provenance["parts"]`` holds each part's provenance (with its ``store`` and ``version``);
        its fingerprint is the parts' joined by ``+``.

    Examples
    --------
    >>> from fracfeat import FeatureStore, join_features
    >>> store = FeatureStore("fracfeat-store")                               # doctest: +SKIP
    >>> both = join_features(store.open(2), store.open(3))                   # doctest: +SKIP
    """
    if len(sets) < 2 or not all(isinstance(s, FeatureSet) for s in sets):
        raise ConfigError(f"join_features takes two or more FeatureSets, got "
                          f"{', '.join(type(s).__name__ for s in sets) or 'none'}")
    first = sets[0]
    parts, blocks = [], []
    for n, part in enumerate(sets, 1):
        if part.is_joined:
            raise ConfigError(f"feature set {n} is already joined: pass its parts to join_features instead")
        rows, missing = part.rows_of(first.ids)
        if missing:
            raise ConfigError(f"feature set {n} ({part!r}) lacks {missing} of the {len(first)} images of the first; "
                              f"extract the same images with both settings")
        blocks.append(np.asarray(part.X, dtype=np.float32)[rows])
        parts.append({**part.provenance, "store": part.store, "version": part.version, "n_features": part.n_features})
    provenance = {"parts": parts, "fingerprint": "+".join(str(p.get("fingerprint")) for p in parts),
                  "source": first.provenance.get("source", ""), "n_features": int(sum(b.shape[1] for b in blocks))}
    stores = {p["store"] for p in parts}
    return replace(first, X=np.hstack(blocks), version=None, provenance=provenance, x_loader=None,
                   store=stores.pop() if len(stores) == 1 else None)
