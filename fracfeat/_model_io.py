"""Model files: save a fitted Pipeline atomically, load one back with checks."""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import tempfile

import numpy as np

from ._errors import ConfigError, ModelError
from ._faults import pause_point

log = logging.getLogger("fracfeat")


def save_model(pipeline, path) -> str:
    """Save a fitted model to ``path`` with joblib, atomically; :func:`load_model` reads it back.

    The model is written to a temporary file in the same folder, flushed to disk, then renamed over
    ``path``: a save that fails or is killed never leaves a half-written model under that name, and a
    model already there stays intact until the new one is complete. A failed save removes its
    temporary file.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline or FitResult
        The model (a :class:`FitResult` saves its ``pipeline``).
    path : str or Path
        The ``.joblib`` file to write; its folder is made if missing.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> from fracfeat import fit, save_model
    >>> save_model(fit("store/", classifier="logreg"), "models/model.joblib")   # doctest: +SKIP
    'models/model.joblib'
    """
    import joblib

    model = getattr(pipeline, "pipeline", pipeline)  # a FitResult
    path = check_output_file(path, "the model path")
    folder = os.path.dirname(os.path.abspath(path))
    # Unique per save, so concurrent saves to one path do not share a file; hidden, so a folder listing
    # of models does not show it. Mode "xb" creates it as joblib.dump would (0o666 less the umask).
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporaries(folder, os.path.basename(path))
        with open(tmp, "xb") as f:
            joblib.dump(model, f)
            f.flush()
            os.fsync(f.fileno())
        pause_point("model")
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: never leave the temporary file behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, pickle.PicklingError, TypeError, AttributeError)):
            # a full disk, a folder gone read-only, a model holding something pickle cannot take (a lambda)
            raise ModelError(f"cannot save the model to {path}: {_reason(e)}; nothing was written there (give "
                             f"another location, or free space)") from e
        raise
    _sync_folder(folder)
    return path


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


def _remove_stale_temporaries(folder: str, name: str) -> None:
    """Remove the temporary files of saves to ``name`` whose process is gone (killed before its rename)."""
    prefix = f".{name}."
    for entry in os.listdir(folder):
        pid = entry[len(prefix):].split("-", 1)[0]
        if not (entry.startswith(prefix) and entry.endswith(".tmp") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue  # alive: a save in progress
        except ProcessLookupError:
            pass
        except OSError:  # alive, another user's
            continue
        try:
            os.remove(os.path.join(folder, entry))
        except OSError:
            pass


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_writable(folder: str, option: str, path: str) -> None:
    """``folder`` (which will hold ``path``) and each folder above it that exists is a folder, and the
    nearest existing one can be written in (the missing ones are made there)."""
    existing = _nearest_existing(os.path.abspath(folder))
    if not os.path.isdir(existing):
        raise ConfigError(f"{option} {path}: {existing} is a file, not a folder; give a path inside a folder")
    try:  # a real write: os.access says yes to root where the file system (read-only, /sys) says no
        fd, probe = tempfile.mkstemp(prefix=".fracfeat-write-check-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write in {existing} ({_reason(e)}); give a location you can "
                          f"write to") from None


def check_output_file(path, option: str = "path") -> str:
    """``path`` (as a str) where a file can be written, or a ConfigError naming the problem and the fix.

    Checked before any work, so a long tuning never ends in a location that cannot take its result: the
    path must not be a folder, each folder above it that exists must be a folder, and the nearest one
    must be writable (folders still missing are made when the file is written).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a folder: give a file path, e.g. "
                          f"{os.path.join(path, 'model.joblib')}")
    _check_writable(os.path.dirname(os.path.abspath(path)), option, path)
    return path


def check_output_folder(path, option: str = "path") -> str:
    """``path`` (as a str) where a folder can be made or written in, or a ConfigError naming the problem."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file, not a folder: give a folder path (it is made if missing)")
    _check_writable(path, option, path)
    return path


def _sync_folder(folder: str) -> None:
    """Flush the folder's entry of the renamed file to disk (POSIX; elsewhere a rename is as far as it goes)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


def load_model(path):
    """Load a model saved by :func:`save_model` (by :func:`fit`'s result, ``fracfeat fit`` or ``fracfeat run``).

    Parameters
    ----------
    path : str or Path
        The ``.joblib`` file.

    Returns
    -------
    sklearn.pipeline.Pipeline

    Raises
    ------
    fracfeat.ModelError
        The file is missing, is not a joblib file, or holds no classifier with ``predict_proba``.
    """
    import joblib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"model file {path!r} not found: give the .joblib file that `fracfeat fit --out` "
                         f"or `fracfeat run` wrote")
    try:
        model = joblib.load(path)
    except Exception as e:  # pickle raises many types on foreign or damaged files
        raise ModelError(f"{path!r} cannot be loaded as a saved model ({type(e).__name__}: {e}); "
                         f"give a .joblib file written by fracfeat") from None
    model = getattr(model, "pipeline", model)  # a pickled FitResult
    if not hasattr(model, "predict_proba"):
        raise ModelError(f"{path!r} holds a {type(model).__name__}, not a classifier with predict_proba; "
                         f"give a .joblib file written by fracfeat")
    _check_libsvm_probabilities(model, path)
    return model


def pipeline_of(model):
    """The Pipeline of ``model``: a path to a saved model (loaded), a FitResult, or the Pipeline itself."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    return getattr(model, "pipeline", model)


def _check_libsvm_probabilities(model, path: str) -> None:
    """Warn about an SVM saved by fracfeat 0.1 (``SVC(probability=True)``), and say when its
    probabilities are inverted: libsvm's internal Platt scaling can fit its sigmoid with the wrong sign.

    Exact and cheap: on the SVM's own support vectors, P(fractured) must rise with the decision function.
    """
    from sklearn.svm import SVC

    clf = model.steps[-1][1] if hasattr(model, "steps") else model
    while not isinstance(clf, SVC) and hasattr(clf, "estimator_"):  # inside FixedThresholdClassifier
        clf = clf.estimator_
    # True only in 0.1's SVMs; scikit-learn 1.9 defaults it to "deprecated".
    if not isinstance(clf, SVC) or getattr(clf, "probability", None) is not True:
        return
    sv = clf.support_vectors_
    inverted = np.corrcoef(clf.decision_function(sv), clf.predict_proba(sv)[:, 1])[0, 1] < 0
    log.warning("%s", f"{path}: an SVM saved by fracfeat 0.1, whose probabilities come from libsvm's internal Platt "
                      f"scaling" + (": they are INVERTED (P(fractured) falls as the SVM's decision value rises), "
                                    "and so are its threshold and every metric built on them." if inverted else
                                    ", which can come out inverted on small training sets.")
                + " Fit it again with this version (fracfeat fit / fracfeat run) to get calibrated probabilities.")
