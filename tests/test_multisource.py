"""Several sources, body regions, balance= and leave-one-value-out CV (issue 15, item 2). Real radiographs."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from fracfeat import ConfigError, FeatureStore, SourceError, extract, fit, join_features
from fracfeat._extract import _content_sha256
from fracfeat._fit import balance_weights, make_folds
from fracfeat._sources import load_records
from fracfeat._store import records_sha256

from conftest import REPO, TINY, manifest_rows

FAST = dict(n_trials=2, classifier="logreg")


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def two_sources(tmp_path, fracatlas, real_images):
    """{"atlas": a CSV manifest with hospital, body_part and view columns, "web": a class folder}."""
    rows = [r for r in manifest_rows() if r["use"] == "1"][:8]
    csv_path = _manifest(tmp_path / "atlas.csv", [
        {"path": str(fracatlas / r["path"]), "label": r["label"], "group": r["group"], "hospital": "ignored",
         "body_part": r["region"], "view": r["view"]} for r in rows])  # FracAtlas's view: the projection
    web = tmp_path / "web"
    for label in ("fractured", "not_fractured"):
        (web / label).mkdir(parents=True)
        for p in real_images[label][-2:]:
            shutil.copy(p, web / label / p.name)
    return {"atlas": csv_path, "web": web}, rows


def test_a_mapping_of_sources_tags_every_record_and_csv_columns_have_aliases(two_sources):
    sources, rows = two_sources
    records, description = load_records(sources)
    assert [r.source for r in records] == ["atlas"] * 8 + ["web"] * 4  # the mapping's name wins over a column
    assert [r.region for r in records] == [r["region"] for r in rows] + [""] * 4
    assert [r.projection for r in records] == [r["view"] for r in rows] + [""] * 4
    assert description.startswith("sources:atlas=csv:") and ";web=folder:" in description
    alone, _ = load_records(sources["atlas"])
    assert {r.source for r in alone} == {"ignored"}  # the hospital column, read as the source
    with pytest.raises(SourceError, match="non-empty name"):
        load_records({"": sources["web"]})
    with pytest.raises(SourceError, match="not to a mapping"):
        load_records(sources, labels=[1])


def test_a_projection_column_wins_over_view_and_a_view_column_of_augmentation_names_is_refused(tmp_path,
                                                                                                real_images):
    images = [str(p) for p in real_images["fractured"][:2]]
    both = _manifest(tmp_path / "both.csv", [{"path": images[0], "view": "frontal", "projection": "PA"},
                                             {"path": images[1], "view": "lateral", "projection": ""}])
    assert [r.projection for r in load_records(both)[0]] == ["PA", ""]
    aliased = _manifest(tmp_path / "vp.csv", [{"path": images[0], "view_position": "LL"}])
    assert load_records(aliased)[0][0].projection == "LL"
    augmented = _manifest(tmp_path / "aug.csv", [{"path": images[0], "view": "frontal"},
                                                 {"path": images[1], "view": "hflip"}])
    with pytest.raises(SourceError, match=r"aug\.csv, line 3: column 'view' holds 'hflip', an augmented view"):
        load_records(augmented)


def test_sources_and_regions_reach_the_store_and_every_feature_set(tmp_path, two_sources):
    sources, rows = two_sources
    fs = extract(sources, store=tmp_path / "store", **TINY)
    assert list(fs.sources) == ["atlas"] * 8 + ["web"] * 4
    assert list(fs.regions) == [r["region"] for r in rows] + [""] * 4
    assert list(fs.projections) == [r["view"] for r in rows] + [""] * 4
    with h5py.File(FeatureStore(tmp_path / "store")._version_path(fs.version)) as f:  # plain h5py reads them
        assert [v.decode() for v in f["sources"][:]] == list(fs.sources)
        assert [v.decode() for v in f["projections"][:]] == list(fs.projections)
    picked = fs.labeled().subset(np.array([0, 9, 10]))
    assert list(picked.sources) == ["atlas", "web", "web"] and picked.regions[0] == rows[0]["region"]
    assert list(picked.projections) == [rows[0]["view"], "", ""]
    assert list(join_features(fs, fs).projections) == list(fs.projections)
    # A source change is a change of the rows: a new version, not "nothing changed".
    renamed = extract({"other": sources["atlas"], "web": sources["web"]}, store=tmp_path / "store", **TINY)
    assert renamed.version != fs.version and renamed.provenance["new_version"]


def test_rows_without_sources_hash_as_before_so_old_versions_stay_unchanged(tmp_path, real_images):
    ids, paths, labels = ["a" * 64, "b" * 64], ["/x/1.jpg", "/x/2.jpg"], [1, 0]
    names, splits, groups = ["fractured", "not_fractured"], ["", "test"], ["g1", ""]
    import hashlib

    old = hashlib.sha256()  # the formula of fracfeat 0.3
    for row in zip(ids, paths, labels, names, splits, groups):
        old.update("\x1f".join(str(v) for v in row).encode("utf-8"))
        old.update(b"\x1e")
    assert records_sha256(ids, paths, labels, names, splits, groups) == old.hexdigest()
    assert records_sha256(ids, paths, labels, names, splits, groups, ["", ""], ["", ""]) == old.hexdigest()
    assert records_sha256(ids, paths, labels, names, splits, groups, ["a", ""], ["", ""]) != old.hexdigest()
    assert records_sha256(ids, paths, labels, names, splits, groups, [""] * 2, [""] * 2, [""] * 2) == old.hexdigest()
    with_source = hashlib.sha256()  # the formula of fracfeat 0.4: sources and regions after the 0.3 columns
    for row in zip(ids, paths, labels, names, splits, groups, ["a", ""], ["", "hip"]):
        with_source.update("\x1f".join(str(v) for v in row).encode("utf-8"))
        with_source.update(b"\x1e")
    assert records_sha256(ids, paths, labels, names, splits, groups, ["a", ""], ["", "hip"]) == with_source.hexdigest()
    assert records_sha256(ids, paths, labels, names, splits, groups, ["a", ""], ["", "hip"], ["", ""]) \
        == with_source.hexdigest()  # an empty projection column leaves 0.4's digest as it was
    assert len({records_sha256(ids, paths, labels, names, splits, groups, *meta) for meta in (
        [["a", ""], ["", "hip"], ["PA", ""]], [[""] * 2, [""] * 2, ["PA", ""]], [["PA", ""]])} | {old.hexdigest()}) == 4
    # Extracting the same paths again finds the version it wrote: nothing changed.
    paths = real_images["fractured"][:2] + real_images["not_fractured"][:2]
    first = extract(paths, labels=[1, 1, 0, 0], store=tmp_path / "s", **TINY)
    again = extract(paths, labels=[1, 1, 0, 0], store=tmp_path / "s", **TINY)
    assert again.version == first.version and not again.provenance["new_version"]


def test_a_version_written_before_sources_existed_reads_them_empty_and_keeps_its_content_hash():
    old_store = REPO / "tests" / "data" / "stores" / "fracfeat-0.3.0"
    if not (old_store / "versions").is_dir():
        pytest.skip(f"no store of fracfeat 0.3.0 at {old_store}")
    store = FeatureStore(old_store)
    n = store.version_numbers()[0]
    fs = store.open(n)
    assert set(fs.sources) == set(fs.regions) == set(fs.projections) == {""}
    with h5py.File(store._version_path(n)) as f:
        assert "sources" not in f and "projections" not in f
        table = {k: [v.decode() if isinstance(v, bytes) else v for v in f[k][:].tolist()]
                 for k in ("ids", "paths", "labels", "class_names", "splits", "groups")}
        failures = [{"path": p.decode(), "reason": r.decode()} for p, r in zip(f["failures/paths"][:],
                                                                              f["failures/reasons"][:])]
        stored = f.attrs["content_sha256"]
    table.update(sources=[""] * len(table["ids"]), regions=[""] * len(table["ids"]),
                 projections=[""] * len(table["ids"]))
    assert _content_sha256(table, failures) == stored


def test_the_0_3_0_store_verifies_and_extracting_its_images_again_reuses_its_version(tmp_path):
    old_store = REPO / "tests" / "data" / "stores" / "fracfeat-0.3.0"
    root = tmp_path / "old"
    shutil.copytree(old_store, root)
    store = FeatureStore(root)
    (report,) = store.verify()
    assert report.ok, report.problems
    fs = store.open(1)
    if not all(Path(p).is_file() for p in fs.paths):
        pytest.skip(f"the FracAtlas images the 0.3.0 store was made from are not at {fs.paths[0]}")
    manifest = _manifest(tmp_path / "m.csv", [
        {"path": p, "label": c, "split": s, "group": g} for p, c, s, g in zip(fs.paths, fs.class_names, fs.splits,
                                                                           fs.groups)]
        + [{"path": fs.failures[0]["path"], "label": "fractured", "split": "", "group": ""}])
    again = extract(manifest, store=root, backbone="vgg16", weights=None, image_size=32, progress=False)
    assert again.version == 1 and not again.provenance["new_version"] and store.version_numbers() == [1]
    with h5py.File(store._version_path(1)) as f:
        assert "projections" not in f  # the version was read, not rewritten


def test_balance_weights_equal_classes_within_each_value_and_values_alike():
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    values = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    w = balance_weights(y, values)
    assert np.isclose(w.sum(), len(y))
    for v in "ab":
        for c in (0, 1):
            assert np.isclose(w[(values == v) & (y == c)].sum(), len(y) / 4)
    one_class = balance_weights(np.array([1, 1, 0]), np.array(["a", "a", "b"]))
    assert np.allclose(one_class, [0.75, 0.75, 1.5])


@pytest.fixture(scope="module")
def with_regions(tiny_features):
    """The tiny set with three synthetic regions, assigned by group (so no group spans two)."""
    names = np.array(["arm", "leg", "hip"], dtype=object)
    regions = names[[int(g) % 3 for g in tiny_features.groups]]
    fs = replace(tiny_features, regions=regions, sources=np.where(regions == "leg", "b", "a").astype(object))
    for r in names:
        assert len(set(fs.y[fs.regions == r])) == 2
    return fs


@pytest.mark.parametrize("classifier", ["logreg", "svm", "xgboost"])
def test_balance_weighs_the_kept_classifier_and_turns_the_class_weight_search_off(with_regions, classifier):
    from sklearn.base import clone

    fs = with_regions
    result = fit(fs, classifier=classifier, n_trials=2, cv=3, balance="region", threshold="balanced_accuracy")
    assert result.balance == "region" and result.study.user_attrs["fracfeat"]["balance"] == "region"
    fixed = {"logreg": "logreg_class_weight", "svm": "svm_class_weight", "xgboost": "xgb_scale_pos_weight"}
    assert all(t.params[fixed[classifier]] == "none" for t in result.study.trials)
    # The kept classifier is the one a weighted fit of the same steps gives.
    head = result.pipeline[1:]
    inner = head.steps[-1][1].estimator_
    inner = getattr(inner, "estimator_", inner)  # the SVM's SigmoidCalibrated holds the SVC
    X = head[:-1].transform(np.asarray(fs.X, dtype=np.float32))
    again = clone(inner).fit(X, fs.y, sample_weight=balance_weights(fs.y, fs.regions))
    probe = X[:10]
    if classifier == "xgboost":
        np.testing.assert_allclose(inner.predict_proba(probe), again.predict_proba(probe), rtol=1e-5)
    else:
        np.testing.assert_allclose(inner.decision_function(probe), again.decision_function(probe), atol=1e-4)
        unweighted = clone(inner).fit(X, fs.y)
        assert not np.allclose(inner.decision_function(probe), unweighted.decision_function(probe), atol=1e-3)


def test_leave_one_region_out_holds_each_region_out_and_reports_it(with_regions):
    fs = with_regions
    folds, grouped = make_folds(fs, "region", seed=0)
    assert grouped and len(folds) == 3
    assert [set(fs.regions[te]) for _, te in folds] == [{"arm"}, {"hip"}, {"leg"}]
    result = fit(fs, cv="region", threshold="balanced_accuracy", **FAST)
    assert result.cv_by == "region" and list(result.cv_by_value) == ["arm", "hip", "leg"]
    for region, m in result.cv_by_value.items():
        assert m["n"] == int((fs.regions == region).sum())
        for k in ("roc_auc", "sensitivity", "specificity"):
            assert m[k]["low"] <= m[k]["value"] <= m[k]["high"]
    assert result.cv_score == pytest.approx(np.mean(result.fold_scores))
    assert "held out by region: mean ROC AUC" in repr(result)
    text = result.by_value_text()
    assert text.splitlines()[0].startswith("held-out region") and text.splitlines()[-1].startswith("mean")


def test_leave_one_value_out_refuses_what_it_cannot_score(with_regions):
    fs = with_regions
    with pytest.raises(ConfigError, match="at least 2"):
        fit(replace(fs, regions=np.full(len(fs), "arm", dtype=object)), cv="region", **FAST)
    one_class = fs.regions.copy()
    one_class[np.flatnonzero(fs.y == 1)[:1]] = "alone"
    grouped_alone = replace(fs, regions=one_class, groups=np.where(one_class == "alone", "solo", fs.groups))
    with pytest.raises(ConfigError, match="'alone' holds fractured images only"):
        fit(grouped_alone, cv="region", **FAST)
    spanning = fs.regions.copy()
    first_group = np.flatnonzero(fs.groups == fs.groups[0])
    spanning[first_group[0]] = "hip" if spanning[first_group[0]] != "hip" else "leg"
    if len(first_group) > 1:
        with pytest.raises(ConfigError, match="spans regions"):
            fit(replace(fs, regions=spanning), cv="region", **FAST)
    missing = fs.regions.copy()
    missing[0] = ""
    with pytest.raises(ConfigError, match="needs a region for every row"):
        fit(replace(fs, regions=missing), cv="region", **FAST)
    with pytest.raises(ConfigError, match="needs a source for every training row"):
        fit(replace(fs, sources=np.full(len(fs), "", dtype=object)), balance="source", **FAST)
    with pytest.raises(ConfigError, match="balance='sites'"):
        fit(fs, balance="sites", **FAST)
    with pytest.raises(ConfigError, match="cv='hospital'"):
        fit(fs, cv="hospital", **FAST)


def test_cli_fit_prints_the_per_region_table(tmp_path, fracatlas, capsys):
    from fracfeat.cli import main

    rows = [r for r in manifest_rows() if r["use"] == "1"]
    picked = [r for r in rows if r["label"] == "fractured"][:12] + [r for r in rows if r["label"] != "fractured"][:12]
    manifest = _manifest(tmp_path / "m.csv", [
        {"path": str(fracatlas / r["path"]), "label": r["label"], "group": r["group"],
         "region": ("upper", "lower")[int(r["group"]) % 2]} for r in picked])
    extract(manifest, store=tmp_path / "store", **TINY)
    code = main(["-q", "fit", str(tmp_path / "store"), "--out", str(tmp_path / "m.joblib"), "--trials", "2",
                 "--cv", "region", "--balance", "region", "--classifier", "logreg"])
    out = capsys.readouterr().out
    assert code == 0 and "held-out region" in out and "upper" in out and "lower" in out


def test_cli_run_takes_several_named_sources():
    from fracfeat.cli import build_parser

    args = build_parser().parse_args(["run", "a=data/one.csv", "b=data/two", "--out", "o", "--cv", "source",
                                      "--balance", "source"])
    assert args.source == {"a": "data/one.csv", "b": "data/two"} and args.cv == "source"
    assert build_parser().parse_args(["run", "data/x", "--out", "o", "--cv", "4"]).source == "data/x"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "a=x", "data/y", "--out", "o"])


# -- every file of a folder: a row, a failure row, or a logged skip (issue 19, item 9) ---------------

def test_a_damaged_dicom_file_becomes_a_failure_row_naming_the_reason(tmp_path, real_images):
    root = tmp_path / "dataset"
    for label in ("fractured", "not_fractured"):
        (root / label).mkdir(parents=True)
        shutil.copy(real_images[label][0], root / label / real_images[label][0].name)
    shutil.copy(real_images["fractured"][1], root / "fractured" / "copy.jpe")
    (root / "fractured" / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    fs = extract(root, store=tmp_path / "store", **TINY)
    assert len(fs) == 3 and any(p.endswith("copy.jpe") for p in fs.paths)
    assert [Path(f["path"]).name for f in fs.failures] == ["scan.dcm"]
    assert fs.failures[0]["reason"].startswith("damaged DICOM:")


def test_projection_is_held_out_and_balanced_like_source_and_region(with_regions):
    # Every row metadata field the store keeps (source, region, projection) can be held out and balanced.
    from fracfeat.cli import build_parser

    fs = replace(with_regions, projections=np.array([{"arm": "AP", "hip": "LAT", "leg": "PA"}[r]
                                                      for r in with_regions.regions], dtype=object))
    result = fit(fs, cv="projection", balance="projection", threshold="balanced_accuracy", **FAST)
    assert result.cv_by == "projection" and list(result.cv_by_value) == ["AP", "LAT", "PA"]
    assert result.balance == "projection"
    assert result.by_value_text().splitlines()[0].startswith("held-out projection")
    args = build_parser().parse_args(["fit", "store", "--out", "m", "--cv", "projection", "--balance", "projection"])
    assert args.cv == "projection" and args.balance == "projection"
