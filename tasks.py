"""The project's two entry points, runnable with nothing but python3 and pip.

    python3 tasks.py demo [ARGS...]   set up .venv, then run `lightning-dropout demo ARGS`
    python3 tasks.py test [ARGS...]   set up .venv, then run the test suite (pytest ARGS)

Set-up is idempotent: the virtual environment is created once, torch is installed only
when missing (pinned by constraints.txt), and the package is reinstalled only when
pyproject.toml or constraints.txt change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".lightning-dropout-installed"


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if not PYTHON.exists():
        print("creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    pip = (PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", "constraints.txt")
    has_torch = subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        print("installing torch (pinned by constraints.txt)", flush=True)
        _run(*pip, "torch")
    print("installing lightning-dropout and its dev tools into .venv", flush=True)
    # compat mode: a plain path entry, so a checkout's own files always win on sys.path.
    _run(*pip, "-e", ".[dev,demo]", "--config-settings", "editable_mode=compat")
    # timm for the site tests, without its torchvision requirement: the registry's
    # torchvision is a CUDA build that fails to import beside the CPU torch and then
    # breaks `import lightning`. The tests import timm with a stand-in (tests/_models.py).
    _run(*pip, "--no-deps", "timm")
    STAMP.write_text(_fingerprint())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    command, rest = argv[0], argv[1:]
    if command == "demo":
        return subprocess.run([str(VENV / "bin" / "lightning-dropout"), "demo", *rest], cwd=ROOT).returncode
    if command == "test":
        return subprocess.run([str(PYTHON), "-m", "pytest", *rest], cwd=ROOT).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
