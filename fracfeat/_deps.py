"""Heavy dependencies load lazily, with messages that say what to install."""

from __future__ import annotations

import importlib
import logging
import sys

from ._errors import MissingDependencyError
from ._quiet import quiet_native_output

log = logging.getLogger("fracfeat")

_INSTALL_HINT = {
    "keras": "pip install 'tensorflow>=2.16' (it brings Keras 3)",
    "tensorflow": "pip install 'tensorflow>=2.16'",
    "openvino": "pip install 'fracfeat[openvino]' (or: pip install openvino)",
    "xgboost": "pip install xgboost",
    "matplotlib": "pip install matplotlib",
    "optuna": "pip install optuna",
    "cv2": "pip install 'fracfeat[clahe]' (or: pip install opencv-python-headless)",
    "pydicom": "pip install 'fracfeat[dicom]' (pydicom and its JPEG, JPEG 2000 and RLE decoders)",
    "nncf": "pip install 'fracfeat[int8]' (or: pip install nncf)",
}


def require(module: str, *, why: str = ""):
    """Import ``module`` or raise an error naming the install command.

    The import runs inside :func:`fracfeat._quiet.quiet_native_output`, and so does TensorFlow's
    first device probe, which is where it prints its CUDA complaints.
    """
    top = module.split(".")[0]
    try:
        with quiet_native_output():
            imported = importlib.import_module(module)
            _probe_tensorflow_devices()
        return imported
    except ImportError as e:
        hint = _INSTALL_HINT.get(top, f"pip install {top}")
        reason = f" for {why}" if why else ""
        raise MissingDependencyError(f"{top} is needed{reason} but cannot be imported ({e}). Install it: {hint}") from None


def require_keras():
    keras = require("keras", why="feature extraction")
    major = int(str(keras.__version__).split(".")[0])
    if major < 3:
        raise MissingDependencyError(
            f"fracfeat needs Keras 3, found Keras {keras.__version__}. Install it: pip install -U 'tensorflow>=2.16' 'keras>=3'"
        )
    return keras


def _probe_tensorflow_devices() -> None:
    """Let TensorFlow look for GPUs now, inside the caller's quiet block, not at the first model
    call: the probe is what prints "failed call to cuInit" on a machine without a GPU."""
    tf = sys.modules.get("tensorflow")
    config = getattr(tf, "config", None)  # None while tensorflow itself is still importing
    if config is None:
        return
    try:
        config.list_physical_devices()  # cached by TensorFlow after the first call
    except Exception as e:  # only moves the messages earlier; the real first call reports any failure
        log.debug("TensorFlow device probe failed (%s: %s)", type(e).__name__, e)
