"""The public API: what README documents, and an import that stays cheap."""

from __future__ import annotations

import json
import re
import subprocess

import fracfeat

from conftest import REPO

HEAVY = ("tensorflow", "keras", "xgboost", "optuna", "matplotlib")


def _readme_public_names() -> list[str]:
    """Names on README's "Public names" line (the documented ``fracfeat.__all__``)."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^Public names \(`fracfeat\.__all__`[^)]*\):(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    assert match, "README.md needs a line 'Public names (`fracfeat.__all__`): `extract`, ...'"
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", match.group(1))


def test_all_is_what_readme_documents():
    documented = _readme_public_names()
    assert len(documented) == len(set(documented)), "README lists a name twice"
    assert sorted(fracfeat.__all__) == sorted(documented)


def test_every_public_name_exists_and_public_objects_have_docstrings():
    for name in fracfeat.__all__:
        obj = getattr(fracfeat, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"fracfeat.{name} has no docstring"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", fracfeat.__version__)


def test_errors_users_can_cause_share_one_base():
    for name in fracfeat.__all__:
        obj = getattr(fracfeat, name)
        if name.endswith("Error"):
            assert issubclass(obj, fracfeat.FracfeatError)


def _modules_after(code: str, python: str, env: dict) -> set[str]:
    done = subprocess.run([python, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_does_not_load_heavy_dependencies(python, subprocess_env):
    loaded = _modules_after("import fracfeat", python, subprocess_env)
    assert "fracfeat" in loaded
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)


def test_reading_a_store_does_not_load_keras(python, subprocess_env, tmp_path, real_images):
    """The store knows nothing of Keras: listing, opening and diffing versions stay light."""
    from fracfeat import extract

    from conftest import TINY

    extract(real_images["fractured"][:2], store=tmp_path / "store", **TINY)
    code = (f"from fracfeat import FeatureStore\n"
            f"s = FeatureStore({str(tmp_path / 'store')!r})\n"
            f"assert len(s.versions()) == 1 and len(s.open('latest')) == 2 and s.diff(1, 1).unchanged\n")
    loaded = _modules_after(code, python, subprocess_env)
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)
