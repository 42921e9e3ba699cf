"""The ``fracfeat`` command line: parse, call the public API, print.

Results go to stdout; diagnostics go through the ``fracfeat`` logger to stderr. A user error (any
:class:`fracfeat.FracfeatError`) prints one line to stderr, ``fracfeat: error: <problem>; <fix>``, and
exits with status 1, without a traceback (``--verbose`` adds it, and debug logging); so does an error
of the operating system (a full disk, a permission refused). Usage errors (a missing argument, ``--seed
abc``) are argparse's: usage and exit status 2. What a command will write (``--out``, ``--report``) and
its tuning options are checked before it reads an image or tunes (:func:`check_arguments`).

Options of extraction and tuning default to None and are passed on only when given, so the API's
defaults apply, or a ``--preset``'s settings, which options given on the command line override.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import os
import sys
from dataclasses import asdict

from ._adapt import adapt
from ._backbones import backbone_table
from ._config import ExtractorSettings
from ._errors import ConfigError, FracfeatError, StoreError, UnreadableImagesError
from ._explain import METHODS as EXPLAIN_METHODS
from ._explain import OCCLUSION_GRID, explain_method, save_explanations
from ._extract import extract
from ._fit import check_storage, check_tuning, fit, quiet_optuna, tune_worker
from ._metrics import evaluate
from ._model_io import check_output_file, check_output_folder, load_model, save_model
from ._path_choice import DEFAULT_IMAGES, DEFAULT_REPEATS, MIN_COSINE, cache_file, calibrate
from ._plots import format_value
from ._predict import predict
from ._presets import presets
from ._quantize import DEFAULT_IMAGES as QUANTIZE_IMAGES
from ._quantize import NOT_SETTINGS as NOT_QUANTIZE_SETTINGS
from ._quantize import PRESETS as QUANTIZE_PRESETS
from ._quantize import quantize
from ._recalibrate import recalibrate
from ._report import report
from ._run import run
from ._store import FeatureStore, version_list
from ._validation import BY_VALUE
from ._version import __version__

log = logging.getLogger("fracfeat")

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130

# -- shared helpers --------------------------------------------------------------------------------

def split_store_ref(text: str) -> tuple[str, str]:
    """``"DIR@3"`` -> ``("DIR", "3")``; ``"DIR@2+3"`` -> ``("DIR", "2+3")`` (joined); ``"DIR"`` -> ``("DIR", "latest")``.

    Only a suffix that reads as a version (:func:`fracfeat._store.version_list`: ``3``, ``v3``, ``2+3``,
    ``latest``) is split off, so paths that contain ``@`` elsewhere keep working.
    """
    head, sep, tail = str(text).rpartition("@")
    if sep and head and version_list(tail) is not None:
        return head, tail
    return str(text), "latest"


def open_store(path):
    """The FeatureStore at ``path``, or a StoreError saying there is none."""
    store = FeatureStore(path)
    if not store.exists():
        if not os.path.exists(path):
            raise StoreError(f"no feature store at {path}: the folder does not exist (create one with `fracfeat extract SOURCE --store {path}`)")
        raise StoreError(f"{path} is not a fracfeat feature store (no fracfeat-store.json); give the --store folder that extract wrote")
    return store


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _given(**options) -> dict:
    """The options given on the command line: an argparse default (None) must not override a preset's value."""
    return {k: v for k, v in options.items() if v is not None}


def _add_preset_option(p: argparse.ArgumentParser, settings: str) -> None:
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"named {settings} settings measured by benchmarks/accuracy.py (`fracfeat presets` lists "
                        f"them); options given here win over the preset's")


def _add_extract_options(p: argparse.ArgumentParser, *, store_default: str | None = "fracfeat-store",
                         views: bool = True) -> None:
    """Options every command that computes features takes (extract, run): one per extractor setting
    (:class:`fracfeat.ExtractorSettings`, its help and spelling from the field), and extract's own.

    ``views=False`` leaves out the settings that make an augmented view (``run`` takes views as ``--augment``).
    """
    g = p.add_argument_group("feature extraction")
    _add_settings_options(g, skip=() if views else tuple(f.name for f in ExtractorSettings.options()
                                                          if f.metadata["view"]))
    if store_default is not None:
        g.add_argument("--store", default=store_default, help=f"feature store folder (default: {store_default})")
    g.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per forward pass (default: chosen for the hardware)")
    g.add_argument("--strict", action="store_true", default=None,
                   help="stop at the first unreadable image (default: record it as a failure and go on)")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786",
                   help="compute on this Dask cluster's workers (pip install 'fracfeat[dask]'; docs/scale.md)")


def _add_settings_options(g, skip: tuple = ()) -> None:
    """One option per extractor setting (help and spelling from :class:`fracfeat.ExtractorSettings`) but
    ``skip``, and --weights."""
    for f in ExtractorSettings.options():
        if f.name in skip:
            continue
        meta = f.metadata
        g.add_argument(f"--{f.name.replace('_', '-')}", default=None, type=meta["cli_type"], metavar=meta["metavar"],
                       choices=meta["choices"],
                       help=meta["help"] + ("" if f.default is None else f" (default: {f.default})"))
    g.add_argument("--weights", default=None,
                   help="'imagenet' (Keras' download), a Keras no-top weights file, 'none' for random weights, or "
                        "with --backbone keras your own .keras model file (default: imagenet)")


def _extract_kwargs(args) -> dict:
    settings = {name: getattr(args, name, None) for name in ExtractorSettings.names()}
    return {**_given(**settings, weights=args.weights, batch_size=args.batch_size, strict=args.strict,
                     preset=args.preset, client=args.scheduler),
            "progress": not args.quiet}


# -- extract -----------------------------------------------------------------------------------------

def cmd_extract(args) -> int:
    fs = _extract(args.source, args.store, args, description=args.description)
    for part in fs.parts:
        prov = part.provenance
        how = (f"{prov.get('n_computed', 0)} computed, {prov.get('n_reused', 0)} from cache" if prov["new_version"]
               else "unchanged: every image was in the cache")
        view = f"  view {prov['view']}" if prov.get("view") else ""
        print(f"{args.store}: v{part.version}{view}  {len(fs)} images x {part.n_features} features  ({how}, "
              f"{len(fs.failures)} failed)")
    if fs.is_joined:
        print(f"{args.store}: joined v{fs.version_label}  {len(fs)} images x {fs.n_features} features (fit it as "
              f"{args.store}@{fs.version_label})")
    if fs.failures:
        print("failed: " + ", ".join(f"{n} {kind}" for kind, n in fs.failure_summary().items()))
        for f in fs.failures[:5]:
            print(f"  {f['path']}: {f['reason']}")
        if len(fs.failures) > 5:
            print(f"  ... and {len(fs.failures) - 5} more (FeatureStore({args.store!r}).open({fs.version}).failures)")
    return 0


def _extract(source, store, args, **kwargs):
    """extract() with the CLI's options."""
    return extract(source, store=store, **_extract_kwargs(args), **kwargs)


# -- store ---------------------------------------------------------------------------------------------

def cmd_store_list(args) -> int:
    store = open_store(args.store)
    versions = store.versions()
    if args.json:
        _print_json([asdict(v) for v in versions])
        return 0
    if not versions:
        print(f"{args.store}: no versions yet")
    for v in versions:
        print(v.describe())
    return 0


def cmd_store_show(args) -> int:
    store = open_store(args.store)
    info = store.info(args.version)
    prov = store.provenance(args.version)
    if args.json:
        _print_json({"info": asdict(info), "provenance": prov})
        return 0
    print(info.describe())
    width = max(len(k) for k in prov) if prov else 0
    for k in sorted(prov):
        print(f"  {k:<{width}}  {prov[k]}")
    return 0


def cmd_store_diff(args) -> int:
    store = open_store(args.store)
    d = store.diff(args.a, args.b)
    print(d.summary())
    limit = None if args.all else 10
    for mark, items, show in (("+", d.added, str), ("-", d.removed, str),
                              ("~", d.relabeled, lambda r: f"{r[0]}  label {r[1]} -> {r[2]}"),
                              (">", d.moved, lambda r: f"{r[0]} -> {r[1]}")):
        for item in items[:limit]:
            print(f"{mark} {show(item)}")
        if limit is not None and len(items) > limit:
            print(f"{mark} ... and {len(items) - limit} more (--all lists every one)")
    return 0


def cmd_store_verify(args) -> int:
    store = open_store(args.store)
    reports = store.verify(args.version)
    bad = [r for r in reports if not r.ok]
    for r in reports:
        print(f"v{r.version}  {'ok' if r.ok else 'DAMAGED'}  {r.path}")
        for problem in r.problems:
            print(f"    {problem}")
        for note in r.notes:  # checks an older file cannot have: not damage
            print(f"    note: {note}")
    if bad:
        print(f"fracfeat: error: {len(bad)} of {len(reports)} versions of {args.store} are damaged "
              f"({', '.join(f'v{r.version}' for r in bad)}); re-extract them into a new store", file=sys.stderr)
        return EXIT_USER_ERROR
    if not reports:
        print(f"{args.store}: no versions to verify")
    return 0


# -- fit / evaluate / predict / run ------------------------------------------------------------------

def _add_tuning_options(p: argparse.ArgumentParser, api) -> None:
    """The tuning options of ``api`` (fit or run), their defaults read from its signature."""
    d = {name: param.default for name, param in inspect.signature(api).parameters.items()}
    threshold = d["threshold"]
    g = p.add_argument_group("tuning")
    g.add_argument("--classifier", default=None,
                   help=f"logreg, svm, xgboost, mlp (a dense head), or auto (searches them all) "
                        f"(default: {d['classifier']})")
    g.add_argument("--trials", type=int, default=None, metavar="N", help=f"Optuna trials (default: {d['n_trials']})")
    g.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S seconds")
    g.add_argument("--cv", type=_cv_arg, default=None, metavar="K|" + "|".join(BY_VALUE),
                   help=f"cross-validation folds, or source / region / projection: hold out one source (NAME=PATH "
                        f"sources, or a manifest's source column), body region (a region column) or projection (a "
                        f"projection or view column) per fold (default: {d['cv']})")
    g.add_argument("--balance", default=None, choices=("classes", *BY_VALUE),
                   help="weigh training rows so both classes weigh the same within each source (region, "
                        "projection), and every source the same; classes: class balance only (default: unweighted)")
    g.add_argument("--scoring", default=None, help=f"scikit-learn scorer to maximize (default: {d['scoring']})")
    g.add_argument("--seed", type=int, default=None,
                   help=f"seeds sampler, folds and classifiers (default: {d['seed']})")
    g.add_argument("--threshold", default=None,
                   help="decision threshold chosen on the training folds: balanced_accuracy, sensitivity:0.9, "
                        f"or none for the classifier's own rule (default: {threshold or 'none'})")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL, e.g. sqlite:///study.db (with --study-name, resumes a study)")
    g.add_argument("--study-name", default=None, help="name of the study in --storage")


def _cv_arg(text: str):
    """``--cv``: a number of folds, or a row metadata field (leave one value out)."""
    if text in BY_VALUE:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of folds or one of {', '.join(BY_VALUE)}") from None


class _SourcesAction(argparse.Action):
    """``run``'s sources: one PATH, or several NAME=PATH (a mapping {name: path}, in the order given)."""

    def __call__(self, parser, namespace, values, option_string=None):
        named = [v.partition("=") for v in values]
        if len(values) == 1 and (not named[0][1] or os.path.exists(values[0]) or "/" in named[0][0]):
            return setattr(namespace, self.dest, values[0])  # one PATH (which may hold a "=")
        if not all(sep and name and path for name, sep, path in named):
            parser.error("several sources are given as NAME=PATH each, e.g. fracatlas=data/fracatlas/manifest.csv "
                         "hbfmid=data/hbfmid")
        if len({name for name, _, _ in named}) < len(named):
            parser.error("two sources share one NAME: give each NAME=PATH its own name")
        setattr(namespace, self.dest, {name: path for name, _, path in named})


def _tuning_kwargs(args) -> dict:
    options = _given(classifier=args.classifier, n_trials=args.trials, timeout=args.timeout, cv=args.cv,
                     scoring=args.scoring, seed=args.seed, storage=args.storage, study_name=args.study_name,
                     preset=args.preset, balance=args.balance)
    if args.threshold is not None:  # given: "none" asks for no threshold, which is not the same as not given
        options["threshold"] = None if args.threshold.lower() in ("none", "") else args.threshold
    return {**options, "progress": not args.quiet}


_SHOWN_METRICS = ("n", "roc_auc", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "pr_auc",
                  "outside_training")


def _print_metrics(metrics: dict) -> None:
    """A metric-by-split table on stdout."""
    splits = list(metrics)
    print("metric".ljust(18) + "".join(s.rjust(10) for s in splits))
    for key in _SHOWN_METRICS:
        values = [metrics[s].get(key) for s in splits]
        print(key.ljust(18) + "".join(("n/a" if v is None else format_value(v)).rjust(10) for v in values))


def _view_version(store, ref: str):
    """``--augment`` item -> FeatureSet: a version of ``store`` (``3``, ``v3``) or ``OTHER_STORE@3``."""
    ref = ref.strip()
    if "@" in ref:
        path, version = split_store_ref(ref)
        return open_store(path).open(version)
    return store.open(ref)


def cmd_fit(args) -> int:
    path, version = split_store_ref(args.store)
    store = open_store(path)
    augment = [_view_version(store, ref) for ref in (args.augment or "").split(",") if ref.strip()]
    result = fit(store, version=version, augment=augment, **_tuning_kwargs(args))
    save_model(result.pipeline, args.out)
    held = "  ".join(f"{k} {result.scoring} {v:.4f}" for k, v in result.scores.items() if k != "cv" and v is not None)
    print(f"{result.classifier}: CV {result.scoring} {result.cv_score:.4f}{'  ' + held if held else ''}  "
          f"({result.trials.get('complete', 0)} trials complete, {result.trials.get('pruned', 0)} pruned; "
          f"trained on {path} v{result.version}, {result.n_train} images"
          f"{' with views ' + ', '.join(result.augment) if result.augment else ''})")
    print(f"best parameters: {json.dumps(result.best_params, default=str)}")
    if result.threshold is not None:
        print(f"decision threshold: {result.threshold:.4f}")
    if result.cv_by_value:
        print(result.by_value_text())
    print(f"model: {args.out}")
    return 0


def _data_arg(text: str):
    """A store reference (``DIR[@VERSION]`` of an existing store) or an image source, as evaluate takes it."""
    path, version = split_store_ref(text)
    if FeatureStore(path).exists():
        return path, version
    return text, "latest"


def cmd_evaluate(args) -> int:
    model = load_model(args.model)
    data, version = _data_arg(args.data)
    by = None if args.by is None else tuple(k for k in args.by.replace(" ", "").split(",") if k and k != "none")
    if args.report:
        study = None
        if args.storage:
            import optuna

            study = optuna.load_study(study_name=args.study_name, storage=args.storage)
        page, metrics = report(model, data, args.report, version=version, study=study, split=args.split,
                               title=f"fracfeat evaluation of {os.path.basename(args.model)}", by=by)
        log.info("report: %s", page)
    else:
        metrics = evaluate(model, data, version=version, by=by)
    if args.json:
        _print_json(metrics)
        return 0
    _print_metrics(metrics)
    # Then one table per split and grouping: each subgroup's figures with their 95% group-bootstrap intervals.
    columns = (("n", "n", 6, False), ("positives", "n_positive", 10, False), ("roc_auc", "roc_auc", 22, True),
               ("sensitivity", "sensitivity", 22, True), ("specificity", "specificity", 22, True),
               ("brier", "brier", 8, False), ("outside_training", "outside_training", 18, False))
    for split, m in metrics.items():
        for key, values in (m.get("subgroups") or {}).items():
            print(f"\nper {key}, {'every image' if split == 'all' else f'split {split}'} (95% group-bootstrap intervals)")
            print(key.ljust(18) + "".join(h.rjust(w) for h, _, w, _ in columns))
            for value, sub in values.items():
                cells = []
                for _, k, w, ci in columns:
                    v, iv = sub.get(k), (sub.get("intervals") or {}).get(k) if ci else None
                    text = "n/a" if v is None else format_value(v)
                    cells.append((f"{text} [{format_value(iv['low'])}, {format_value(iv['high'])}]" if iv
                                  else text).rjust(w))
                print((value or "(not given)")[:17].ljust(18) + "".join(cells))
    if args.report:
        print(f"report: {os.path.join(args.report, 'index.html')}")
    return 0


def cmd_predict(args) -> int:
    try:
        rows = predict(args.model, args.images)
    except UnreadableImagesError as e:  # the API's message names predict's list; here the arguments are the list
        raise e.with_fix("fix them or leave them out of the IMAGE arguments") from None
    if args.format == "json":
        _print_json(rows)
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=["path", "probability", "label", "outside_training"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return 0


def _share(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def cmd_adapt(args) -> int:
    data, version = _data_arg(args.source)
    adapted = adapt(args.model, data, method=args.method, min_images=args.min_images, version=version)
    save_model(adapted, args.out)
    info = adapted.adapted_to_
    if args.json:
        _print_json({**info, "model": args.out})
        return 0
    print(f"adapted to {info['n_images']} images ({info['n_failed']} unreadable), method {info['method']}, "
          f"training statistics from the {info['statistics']}")
    print("shift alarm".ljust(24) + "before".rjust(8) + "after".rjust(8))
    print("images flagged".ljust(24) + _share(info["outside_training_before"]).rjust(8)
          + _share(info["outside_training_after"]).rjust(8))
    print(f"model: {args.out}")
    return 0


def _interval(m: dict) -> str:
    return f"{format_value(m['value'], 2)} [{format_value(m['low'], 2)}-{format_value(m['high'], 2)}]"


def cmd_recalibrate(args) -> int:
    data, version = _data_arg(args.source)
    model = recalibrate(args.model, data, method=args.method, min_labels=args.min_labels,
                        min_per_class=args.min_per_class, force=args.force, version=version)
    save_model(model, args.out)
    r = model.recalibrated_to_
    if args.json:
        _print_json({**r, "model": args.out})
        return 0
    rows = [
        ("labeled images", f"{r['n_labels']} ({r['n_positive']} fractured, {r['n_negative']} not)"),
        ("Platt slope", f"{r['slope']:+.3f} [{r['slope_low']:+.3f} to {r['slope_high']:+.3f}]"),
        ("threshold", f"{r['threshold']:.3f} (bootstrap {r['threshold_low']:.3f}-{r['threshold_high']:.3f})"),
        ("ROC AUC (local)", _interval(r["roc_auc"])),
        ("sensitivity (oof)", _interval(r["sensitivity"])),
        ("specificity (oof)", _interval(r["specificity"])),
        ("Brier before / after", f"{r['brier_before']:.3f} / {r['brier_after']:.3f} (out of fold "
                                 f"{r['brier_out_of_fold']:.3f})"),
    ]
    for name, value in rows:
        print(name.ljust(22) + value)
    print(f"model: {args.out} ({r['method']}; intervals: 95%, {r['n_boot']} resamples of "
          f"{r['resampled']})")
    return 0


def cmd_run(args) -> int:
    options = {**_extract_kwargs(args), **_tuning_kwargs(args)}  # both carry progress=
    result = run(args.source, args.out, store=args.store, **options,
                 **_given(augment=args.augment, test_size=args.test_size))
    print(f"held out: {result.holdout}")
    if result.fit.cv_by_value:
        print(result.fit.by_value_text())
    _print_metrics(result.metrics)
    print(f"model: {result.model_path}")
    print(f"report: {result.report_path}")
    return 0


def cmd_tune_worker(args) -> int:
    path, version = split_store_ref(args.store)
    ran = tune_worker(open_store(path), version=version, storage=args.storage, study_name=args.study,
                      n_trials=args.trials, timeout=args.timeout, wait=args.wait, progress=not args.quiet)
    print(f"{ran} trials run into study {args.study!r}")
    return 0


def cmd_presets(args) -> int:
    table = presets()
    if args.json:
        _print_json([p.as_dict() for p in table.values()])
        return 0
    print("\n\n".join(p.describe() for p in table.values()))
    return 0


def cmd_backbones(args) -> int:
    rows = backbone_table()
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'backbone':<18} {'width':>5} {'default':>7} {'min':>4}  preprocessing")
    for r in rows:
        print(f"{r['name']:<18} {r['width']:>5} {r['default_size']:>7} {r['min_size']:>4}  {r['preprocessing']}")
    print("\nwidth: features per image with pooling avg or max. Your own model: --backbone keras --weights "
          "MODEL.keras --preprocessing MODE [--feature-layer NAME]")
    return 0


def cmd_explain(args) -> int:
    model = load_model(args.model)
    method, why = explain_method(model) if args.method == "auto" else (args.method, "")
    try:
        rows = save_explanations(model, args.images, args.out, method=args.method, grid=args.grid)
    except UnreadableImagesError as e:
        raise e.with_fix("fix them or leave them out of the IMAGE arguments") from None
    if args.json:
        _print_json(rows)
        return 0
    print(f"method: {rows[0]['method'] if rows else method}" + (f" ({why})" if why else ""))
    for r in rows:
        print(f"{r['path']}  p={r['probability']:.3f}  {r['png']}  {r['npy']}")
    return 0


def _given_settings(args, skip) -> tuple[object, dict]:
    """The weights and the extractor settings given to a command that takes `_add_settings_options` (less ``skip``)."""
    settings = _given(**{name: getattr(args, name, None) for name in ExtractorSettings.names() if name not in skip})
    return ("imagenet" if args.weights is None else args.weights), settings


def cmd_calibrate(args) -> int:
    weights, settings = _given_settings(args, CALIBRATED)
    decision = calibrate(weights=weights, n_images=args.images, repeats=args.repeats, **settings)
    if args.json:
        _print_json({**decision, "cache_file": str(cache_file())})
        return 0
    print_calibration(decision)
    return 0


def cmd_quantize(args) -> int:
    weights, settings = _given_settings(args, NOT_QUANTIZE_SETTINGS)
    record = quantize(args.images, args.out, weights=weights, n=args.n, preset=args.quantize_preset,
                      fast_bias_correction=not args.full_bias_correction, **settings)
    if args.json:
        _print_json(record)
        return 0
    cal = record["calibration"]
    print(f"{record['identity']}  {args.out}")
    print(f"{record['extractor']['backbone']} {record['extractor']['image_size']}px, calibrated on {cal['n_used']} "
          f"images ({cal['n_failed']} failed) with NNCF {record['nncf_version']} in {record['seconds']:.0f} s; "
          f"extract with --quantized {args.out}")
    return 0


def print_calibration(decision: dict) -> None:
    """The table `fracfeat calibrate` prints: each path's images/s and agreement, the chosen one starred."""
    backbone = decision["key"]["backbone"]
    print(f"{backbone['backbone']} at {backbone['image_size']} px, {decision['n_images']} synthetic images, "
          f"median of {decision['repeats']} (load average {' '.join(map(str, decision['load_avg']))})")
    print(f"{'path':<18} {'images/s':>9} {'min cosine':>11}  agrees  chosen")
    for r in decision["rows"]:
        chosen = "*" if r["path"] == decision["chosen"] else ""
        agrees = "yes" if r["agrees"] else "no"
        print(f"{r['path']:<18} {r['images_per_s']:>9.2f} {r['min_cosine']:>11.6f}  {agrees:<6}  {chosen}")
    machine = decision["key"]["machine"]
    use = ("\"auto\" does not use choices made with random weights" if backbone["weights"].startswith("random")
           else "\"auto\" uses this choice from now on")
    int8 = f" (int8: >= {MIN_COSINE['int8']})" if any(r["precision"] == "int8" for r in decision["rows"]) else ""
    print(f"\nagrees: cosine to float32/keras >= {MIN_COSINE['float32']}{int8} on every image. CPU: {machine['cpu']} "
          f"({machine['cores']} cores; {' '.join(machine['cpu_flags'])}). {use} (cached in {cache_file()})")


# -- the parser ------------------------------------------------------------------------------------

CALIBRATED = ("precision", "runtime")  # what `fracfeat calibrate` chooses, so not one of its options

def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--quiet/--verbose, accepted before or after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars and no info messages (warnings and errors still show)")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    return p


def _add_extract_command(sub, common) -> None:
    p = sub.add_parser("extract", parents=[common], help="compute CNN features of images into a store version",
                       description="Compute deep features of every image of SOURCE into a new version of the "
                                   "feature store (images already in the store's cache are not recomputed).")
    p.add_argument("source", help="folder of class folders (or train/val/test folders), CSV manifest, or image file")
    _add_extract_options(p)
    _add_preset_option(p, "extractor")
    p.add_argument("--description", default="", help="free text kept in the version's provenance")
    p.set_defaults(func=cmd_extract)


def _add_store_command(sub, common) -> None:
    ps = sub.add_parser("store", parents=[common], help="list, show, diff or verify a feature store",
                        description="Inspect a feature store.")
    store_sub = ps.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    store_actions = (
        ("list", cmd_store_list, "one line per version", "List every version.", [_json_option]),
        ("show", cmd_store_show, "a version's summary and full provenance",
         "Show one version: summary line and provenance.",
         [lambda q: q.add_argument("version", nargs="?", default="latest",
                                   help="version number, vN or latest (default: latest)"), _json_option]),
        ("diff", cmd_store_diff, "images added, removed, relabeled, moved between versions",
         "Compare two versions by image content hash.",
         [lambda q: q.add_argument("a", help="older version"),
          lambda q: q.add_argument("b", nargs="?", default="latest", help="newer version (default: latest)"),
          lambda q: q.add_argument("--all", action="store_true",
                                   help="list every changed image, not the first 10 of each kind")]),
        ("verify", cmd_store_verify, "recompute checksums; exit 1 if anything is damaged",
         "Check every dataset of every version (or one) against its checksum.",
         [lambda q: q.add_argument("--version", default=None, help="check only this version")]),
    )
    for name, func, help_text, description, options in store_actions:
        q = store_sub.add_parser(name, parents=[common], help=help_text, description=description)
        q.add_argument("store", help="feature store folder")
        for add_option in options:
            add_option(q)
        q.set_defaults(func=func)


def _add_fit_command(sub, common) -> None:
    p = sub.add_parser("fit", parents=[common], help="tune a classifier on a store version with Optuna; save it",
                       description="Tune a classifier on the labeled rows of a store version (grouped CV when the "
                                   "rows have groups; train split only when they have splits) and save the "
                                   "fitted Pipeline, which predicts from image paths.")
    p.add_argument("store", metavar="STORE[@VERSION]", help="feature store folder, optionally @version (default: latest)")
    p.add_argument("--out", required=True, metavar="MODEL", help="where to save the model (.joblib)")
    p.add_argument("--augment", default=None, metavar="V[,V...]",
                   help="store versions holding augmented views of the same images (made by `extract --view`), "
                        "as N, vN or STORE@N: each training row's views join the training side of every fold "
                        "and the kept model; validation uses the original images only")
    _add_tuning_options(p, fit)
    _add_preset_option(p, "tuning")
    p.set_defaults(func=cmd_fit)


def _add_evaluate_command(sub, common) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="metrics (and an HTML report) of a model on labeled data",
                       description="Score a saved model on labeled images or store rows: per-split metrics, and "
                                   "with --report an HTML page of plots.")
    p.add_argument("model", help="model file (.joblib)")
    p.add_argument("data", metavar="SOURCE|STORE[@VERSION]",
                   help="labeled image source (folder, CSV) or a feature store made with the model's extractor")
    p.add_argument("--report", metavar="DIR", default=None, help="write DIR/index.html with plots")
    p.add_argument("--split", default=None, help="split the report's plots show (default: test, else val, else all)")
    p.add_argument("--storage", default=None, metavar="URL", help="Optuna storage of the tuning study (adds its plots)")
    p.add_argument("--study-name", default=None, help="the study's name in --storage")
    p.add_argument("--by", default=None, metavar="KEYS",
                   help="break the figures down by these manifest columns, comma-separated: source, region, "
                        "projection (default: each the data has; 'none' for no subgroup tables)")
    _json_option(p)
    p.set_defaults(func=cmd_evaluate)


def _add_predict_command(sub, common) -> None:
    p = sub.add_parser("predict", parents=[common], help="probability of a fracture for each image",
                       description="Print path, probability of a fracture, and predicted label of each image.")
    p.add_argument("model", help="model file (.joblib)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    p.set_defaults(func=cmd_predict)


def _site_arguments(p: argparse.ArgumentParser, source_help: str, what: str) -> None:
    """MODEL, SOURCE and --out NEW.joblib of adapt and recalibrate."""
    p.add_argument("model", help="model file (.joblib)")
    p.add_argument("source", help=source_help)
    p.add_argument("--out", required=True, metavar="NEW.joblib", help=f"where to save the {what} model")


def _add_adapt_command(sub, common) -> None:
    d = {name: param.default for name, param in inspect.signature(adapt).parameters.items()}
    p = sub.add_parser("adapt", parents=[common], help="adapt a model to a new site's images (no labels needed)",
                       description="Re-standardize the features of a new site's images onto the model's "
                                   "training images' (per-feature mean and spread) and save the adapted model. "
                                   "It assumes the site's fracture rate is like the training images'; it "
                                   "repairs the operating point, not the ranking.")
    _site_arguments(p, "the site's images: a folder, a CSV manifest, or a store DIR[@VERSION] made with the "
                       "model's extractor", "adapted")
    p.add_argument("--method", choices=("standardize",), default=d["method"], help="(default: %(default)s)")
    p.add_argument("--min-images", type=int, default=d["min_images"],
                   help="refuse fewer readable images than this (default: %(default)s)")
    _json_option(p)
    p.set_defaults(func=cmd_adapt)


def _add_recalibrate_command(sub, common) -> None:
    d = {name: param.default for name, param in inspect.signature(recalibrate).parameters.items()}
    p = sub.add_parser("recalibrate", parents=[common],
                       help="refit a model's probabilities and threshold on labeled images of a new site",
                       description="Fit Platt scaling (or isotonic regression) on the model's log-odds of a "
                                   "site's labeled images, take the threshold from a class-balanced Platt fit, "
                                   "and save the model; refuses when the slope says the model does not rank "
                                   "these images.")
    _site_arguments(p, "labeled images: class folders, a CSV with labels, or a store DIR[@VERSION]", "recalibrated")
    p.add_argument("--method", choices=("platt", "isotonic"), default=d["method"], help="(default: %(default)s)")
    p.add_argument("--min-labels", type=int, default=d["min_labels"], help="(default: %(default)s)")
    p.add_argument("--min-per-class", type=int, default=d["min_per_class"], help="(default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="save the model even when it does not rank these images (slope <= 0)")
    _json_option(p)
    p.set_defaults(func=cmd_recalibrate)


def _add_run_command(sub, common) -> None:
    d = {name: param.default for name, param in inspect.signature(run).parameters.items()}
    p = sub.add_parser("run", parents=[common], help="the main job: extract, tune, evaluate on held-out images, report",
                       description="Extract features of SOURCE, tune a classifier on the training images, "
                                   "evaluate it on held-out images (the source's test split, else a grouped "
                                   "stratified hold-out), and save OUT/model.joblib and OUT/report/index.html. "
                                   f"The default budget, {d['n_trials']} trials of {d['classifier']}, tuned all "
                                   "4,083 FracAtlas images in under 7 minutes on 2 cores (50 trials of "
                                   "--classifier auto: 47 minutes; 30 of svm: under a minute); --trials, "
                                   "--timeout and --classifier go further.")
    p.add_argument("source", nargs="+", action=_SourcesAction, metavar="SOURCE|NAME=PATH",
                   help="labeled images: class folders, train/val/test folders, or a CSV manifest; several "
                        "sources as NAME=PATH each (rows keep their source's NAME: --cv source, --balance source)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_extract_options(p, store_default=None, views=False)
    p.add_argument("--store", default=None, help="feature store folder (default: OUT/store)")
    _add_tuning_options(p, run)
    p.add_argument("--test-size", type=float, default=None,
                   help=f"share held out when the source has no test split (default: {d['test_size']})")
    p.add_argument("--augment", default=None, metavar="VIEW[,VIEW]",
                   help="also extract these augmented views of every image (hflip, rot+N, rot-N, cropF) and train "
                        "on the training images' views too; held-out images and the model use the originals")
    _add_preset_option(p, "extractor and tuning")
    p.set_defaults(func=cmd_run)


def _add_presets_command(sub, common) -> None:
    p = sub.add_parser("presets", parents=[common], help="list the named presets (--preset NAME)",
                       description="List the named presets: settings measured by benchmarks/accuracy.py that "
                                   "extract, fit and run take as --preset NAME.")
    _json_option(p)
    p.set_defaults(func=cmd_presets)


def _add_tune_worker_command(sub, common) -> None:
    p = sub.add_parser("tune-worker", parents=[common], help="run trials of a stored study that fit started",
                       description="Join the Optuna study NAME in --storage (started by `fracfeat fit ... --storage "
                                   "URL --study-name NAME`) and run its trials until it holds N, on this machine. "
                                   "Classifier, scoring, seed and folds are the study's; STORE@V must hold the rows "
                                   "it was started on. The fit call builds the model, once.")
    p.add_argument("store", metavar="STORE[@VERSION]", help="the feature store version the study tunes on")
    p.add_argument("--storage", required=True, metavar="URL", help="the study's storage, e.g. postgresql://user@host/db")
    p.add_argument("--study-name", "--study", dest="study", required=True, metavar="NAME",
                   help="the study's name, as fit's --study-name")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials the study holds when done (all workers)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--wait", type=float, default=600.0, metavar="S",
                   help="wait up to S seconds for the study to be started (default: 600)")
    p.set_defaults(func=cmd_tune_worker)


def _add_explain_command(sub, common) -> None:
    p = sub.add_parser("explain", parents=[common], help="heatmaps: where the model looks in each image",
                       description="Write a heatmap per image: DIR/NAME.png (the radiograph with the regions that "
                                   "pushed P(fracture) up in colour) and DIR/NAME.npy (the raw map, in log-odds, at "
                                   "the image's own pixel size). Exact for logistic regression, the SVM and XGBoost "
                                   "on average-pooled features; occlusion otherwise.")
    p.add_argument("model", help="model file (.joblib)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG overlays and .npy maps")
    p.add_argument("--method", choices=EXPLAIN_METHODS, default="auto",
                   help="auto (exact where the model allows, else occlusion), exact, or occlusion")
    p.add_argument("--grid", type=int, default=OCCLUSION_GRID, metavar="N",
                   help=f"occlusion patches per side (default {OCCLUSION_GRID}: N x N forward passes an image)")
    _json_option(p)
    p.set_defaults(func=cmd_explain)


def _add_backbones_command(sub, common) -> None:
    p = sub.add_parser("backbones", parents=[common], help="list the backbones --backbone takes",
                       description="List every backbone --backbone takes (the keras.applications CNNs): its "
                                   "feature width, default and minimum input size, and input preprocessing.")
    _json_option(p)
    p.set_defaults(func=cmd_backbones)


def _add_calibrate_command(sub, common) -> None:
    p = sub.add_parser("calibrate", parents=[common], help="measure the fastest extraction path on this machine",
                       description="Time every extraction path this CPU has (Keras and OpenVINO, float32 and "
                                   "bfloat16 where the CPU does it in hardware) for a backbone, keep the fastest "
                                   "whose features agree with float32 Keras (cosine >= 0.999 per image), and cache "
                                   "the choice: precision and runtime \"auto\" use it from then on. With --quantized "
                                   "DIR the int8 model is timed beside them (bound 0.98); \"auto\" never picks it.")
    _add_settings_options(p.add_argument_group("the extractor to calibrate (as extract's options)"), skip=CALIBRATED)
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES, metavar="N",
                   help=f"synthetic images per timed batch (default {DEFAULT_IMAGES})")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                   help=f"timed batches per path; the median counts (default {DEFAULT_REPEATS})")
    _json_option(p)
    p.set_defaults(func=cmd_calibrate)


def _add_quantize_command(sub, common) -> None:
    p = sub.add_parser("quantize", parents=[common], help="quantize a backbone to int8 from your images (NNCF)",
                       description="Quantize the float32 OpenVINO feature model to int8 with NNCF, calibrated on "
                                   "up to N of IMAGES (no labels used), into the folder --out: model.xml, model.bin "
                                   "and quantization.json. Extract with --quantized DIR (precision int8).")
    p.add_argument("images", help="folder, CSV manifest, or image file: images of the kind you will extract")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the int8 model")
    p.add_argument("--n", type=int, default=QUANTIZE_IMAGES, metavar="N",
                   help=f"calibration images: the N of smallest content sha256 that decode (default {QUANTIZE_IMAGES})")
    p.add_argument("--quantize-preset", default="performance", choices=QUANTIZE_PRESETS,
                   help="NNCF's preset: performance (symmetric activations) or mixed (default: performance)")
    p.add_argument("--full-bias-correction", action="store_true",
                   help="NNCF's full bias correction instead of its fast one (slower)")
    _add_settings_options(p.add_argument_group("the extractor to quantize (as extract's options)"),
                          skip=NOT_QUANTIZE_SETTINGS)
    _json_option(p)
    p.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="fracfeat", parents=[_common_options(suppress=False)],
        description="Fracture classification on bone radiographs: deep CNN features in a versioned store, "
                    "Optuna-tuned scikit-learn classifiers, reports.",
    )
    parser.add_argument("--version", action="version", version=f"fracfeat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (_add_extract_command, _add_store_command, _add_fit_command, _add_evaluate_command,
                        _add_predict_command, _add_run_command, _add_presets_command, _add_adapt_command,
                        _add_recalibrate_command, _add_tune_worker_command, _add_explain_command,
                        _add_backbones_command, _add_calibrate_command, _add_quantize_command):
        add_command(sub, common)
    return parser


# -- entry point -------------------------------------------------------------------------------------

class _Formatter(logging.Formatter):
    def format(self, record):
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def configure_logging(quiet: bool, verbose: bool) -> None:
    """fracfeat's log to stderr: info by default, warnings only with --quiet, debug with --verbose."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    if not verbose:
        # TensorFlow's C++ notes are noise on a CLI. Those printed before its log is set up (oneDNN,
        # "no CUDA driver") ignore this variable and fracfeat._quiet discards them; it silences the
        # ones TensorFlow prints later, while features are computed.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _one_line(message) -> str:
    return " ".join(str(message).split())


# The option naming what each command writes, and whether it is a file or a folder.
OUTPUT_OPTIONS = {"fit": ("out", "file"), "adapt": ("out", "file"), "recalibrate": ("out", "file"),
                  "explain": ("out", "folder"),
                  "run": ("out", "folder"), "evaluate": ("report", "folder")}


def check_arguments(args) -> None:
    """Check what a command will write, and its tuning options, before it reads or computes anything:
    a mistake there must not surface after an hour of tuning. Each check raises a FracfeatError."""
    option, kind = OUTPUT_OPTIONS.get(args.command, (None, None))
    if option and getattr(args, option, None) is not None:
        (check_output_file if kind == "file" else check_output_folder)(getattr(args, option), f"--{option}")
    if args.command in ("fit", "run"):
        api = run if args.command == "run" else fit
        defaults = {name: p.default for name, p in inspect.signature(api).parameters.items()}
        given = {**defaults, **_tuning_kwargs(args)}  # the API's defaults (a preset's values are valid ones)
        check_tuning(given["classifier"], given["n_trials"], given["cv"], given["scoring"], given["threshold"],
                     seed=given["seed"], storage=given["storage"])
    if args.command == "evaluate" and args.storage:
        check_study(args.storage, args.study_name)


def check_study(storage: str, study_name: str | None) -> None:
    """The study ``--storage``/``--study-name`` name exists, or a ConfigError naming the studies there."""
    import optuna
    from sqlalchemy.engine import make_url

    check_storage(storage)
    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database and not os.path.isfile(url.database):
        raise ConfigError(f"--storage {storage}: there is no SQLite file {url.database}; give the storage that "
                          f"`fracfeat fit --storage` (or run) tuned in")
    try:
        with quiet_optuna():
            names = optuna.get_all_study_names(storage)
    except Exception as e:  # a database of another program, an unreachable server
        raise ConfigError(f"--storage {storage} cannot be read as an Optuna storage ({type(e).__name__}: "
                          f"{_one_line(e)}); give the storage `fracfeat fit --storage` tuned in") from None
    held = ", ".join(names) or "no study at all"
    if study_name is None and len(names) != 1:
        raise ConfigError(f"--storage {storage} holds {held}: give --study-name")
    if study_name is not None and study_name not in names:
        raise ConfigError(f"no study {study_name!r} in {storage} (it holds {held}); give --study-name one of those")


def main(argv=None) -> int:
    """Run the ``fracfeat`` command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    try:
        check_arguments(args)
        return int(args.func(args) or 0)
    except FracfeatError as e:
        if args.verbose:
            log.debug("traceback of the error below", exc_info=True)
        print(f"fracfeat: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # the file system's refusal, not fracfeat's: name the file and the reason
        if isinstance(e, BrokenPipeError):  # `fracfeat store list DIR | head`
            sys.stderr.close()
            return 0
        log.debug("traceback of the error below", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        print(f"fracfeat: error: {where}{_one_line(e.strerror or e)} (--verbose shows where it happened)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fracfeat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
