"""Heavy dependencies load lazily, with messages that say what to install."""

from __future__ import annotations

import importlib

from ._errors import MissingDependencyError

_INSTALL_HINT = {
    "keras": "pip install 'tensorflow>=2.16' (it brings Keras 3)",
    "tensorflow": "pip install 'tensorflow>=2.16'",
    "openvino": "pip install 'fracfeat[openvino]' (or: pip install openvino)",
    "xgboost": "pip install xgboost",
    "matplotlib": "pip install matplotlib",
    "optuna": "pip install optuna",
}


def require(module: str, *, why: str = ""):
    """Import ``module`` or raise an error naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
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
