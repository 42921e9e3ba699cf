"""Extraction in a real child process, held at a named point (fracfeat/_faults.py) to be killed or released."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, manifest_rows

# Tiny and fast, and several checkpoints' worth of rows: 4 images per batch, a checkpoint every 8.
SETTINGS = dict(backbone="vgg16", weights=None, image_size=32, progress=False, batch_size=4, checkpoint_every=8)

CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from fracfeat import extract
args = json.load(open(sys.argv[1]))
fs = extract(args.pop("paths"), **args)
print(json.dumps({"version": fs.version, "n_computed": fs.provenance["n_computed"],
                  "n_reused": fs.provenance["n_reused"]}))
"""


def clean_images(fracatlas: Path, n: int) -> list[str]:
    """n distinct real radiographs (use=1 rows, so no duplicates and no truncated files)."""
    rows = [r for r in manifest_rows() if r["use"] == "1"]
    return [str(fracatlas / r["path"]) for r in rows[:n]]


@dataclass
class Child:
    proc: subprocess.Popen
    pause_file: Path
    log_path: Path

    def wait_held(self, timeout: float = 150) -> None:
        """Block until the child is held at its pause point (fail if it exits or takes too long)."""
        deadline = time.monotonic() + timeout
        while not self.pause_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"child exited ({self.proc.returncode}) before its pause point:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"child not held within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def release(self) -> None:
        self.pause_file.unlink(missing_ok=True)

    def result(self, timeout: float = 150) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"child failed ({self.proc.returncode}):\n{self.log()}"
        return json.loads(out.strip().splitlines()[-1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_child(workdir: Path, name: str, paths, store: Path, pause_at: str | None = None, **overrides) -> Child:
    """Start ``extract(paths, store=store, **SETTINGS)`` in a child; ``pause_at`` = "<point>:<n>"."""
    workdir.mkdir(parents=True, exist_ok=True)
    args_file = workdir / f"{name}.json"
    args_file.write_text(json.dumps({"paths": list(paths), "store": str(store), **SETTINGS, **overrides}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    pause_file = workdir / f"{name}.held"
    env.pop("FRACFEAT_PAUSE_AT", None)
    if pause_at:
        env["FRACFEAT_PAUSE_AT"] = pause_at
        env["FRACFEAT_PAUSE_FILE"] = str(pause_file)
    log_path = workdir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(args_file)], env=env, cwd=workdir,
                                stdout=subprocess.PIPE, stderr=log, text=True)
    return Child(proc, pause_file, log_path)


def as_user(user: str, fn) -> str:
    """``fn()``'s result (or 'ERROR <type>: <message>') in a forked child that dropped root for ``user``."""
    account = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            try:
                result = str(fn())
            except BaseException as e:
                result = f"ERROR {type(e).__name__}: {e}"
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out
