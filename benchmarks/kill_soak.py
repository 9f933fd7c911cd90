"""Random-kill soak of the bulk rewrite: `puma-ray rewrite` killed at random points, resumed each time.

For each storage (local files; S3 = moto's server mode over HTTP, started here): one uninterrupted
rewrite (the reference), then rounds of the same rewrite into a fresh output. In a round the
driver (`puma-ray rewrite`, its own process group with the local Ray it starts) is started; at a
random point of its progress (a random share of the units still to do, polled from the staged
unit markers; now and then before the first unit, or after the last one, while it verifies and
publishes) either the driver's whole process group is SIGKILLed and the driver started again
(a resume), or ONE rewrite actor (a Ray Data map worker running ``UnitRewriter``) is SIGKILLed
and the run goes on (Ray restarts the actor and retries its unit). A round ends when a driver
exits 0; its output is then checked against the reference:

- every input user exactly once (user ids read back from OUT/prompts), none lost;
- the same files with the same bytes (sha256 per file) as the uninterrupted rewrite;
- the manifest's rows and files equal to the reference's; no staging left behind.

Rounds go on until ``--kills`` kills have landed in each storage. Prints one line per kill, then a
JSON summary; exits 1 if any round's output differs from the reference.

    python benchmarks/kill_soak.py [--kills 20] [--users 40000] [--storage local,s3] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import boto3
import numpy as np
import pyarrow.compute as pc
import yaml
from moto.server import ThreadedMotoServer

from puma_ray import outputs, storage
from puma_ray.schema import StoreMeta, prompt_store_schema, prompt_table

ACTOR = b"UnitRewriter"  # in a rewrite actor's process title (ray::MapWorker(MapBatches(UnitRewriter)))


def setup(work: str, users: int, unit_rows: int, seed: int) -> dict:
    """Tiny target model, a source store (one row group per ``unit_rows`` users) and an adapter, under ``work``."""
    import torch

    from puma_ray.adapter import MigrationAdapter, save_adapter
    from puma_ray.identity import model_info
    from puma_ray.models import build_tiny

    tgt = build_tiny(os.path.join(work, "models"), ["qwen2"], seed=seed)["qwen2"]
    tfp, td = model_info(tgt)
    d = 256
    meta = StoreMeta(
        model="soak-source",
        model_fingerprint="soak-source-d256",
        hidden_size=d,
        prompt_length=1,
        template="rating_v1",
        stage="prompts",
    )
    src = os.path.join(work, "source")
    rng = np.random.default_rng(seed)
    with storage.parquet_writer(storage.join(src, "part-00000.parquet"), prompt_store_schema(meta)) as w:
        for u0 in range(0, users, unit_rows):
            ids = [f"u{u:07d}" for u in range(u0, min(users, u0 + unit_rows))]
            w.write_table(prompt_table(meta, ids, rng.uniform(-0.1, 0.1, (len(ids), d))))

    torch.manual_seed(seed)
    side = {"model": meta.model, "model_fingerprint": meta.model_fingerprint, "hidden_size": d}
    adapter = os.path.join(work, "adapter")
    save_adapter(
        adapter,
        MigrationAdapter(d, td, width=512),
        [side],
        {"model": tgt, "model_fingerprint": tfp, "hidden_size": td},
        prompt_length=1,
        template="rating_v1",
    )
    return {"model": tgt, "source": src, "adapter": adapter}


def config(work: str, inputs: dict, output: str, unit_rows: int) -> str:
    """A `puma-ray rewrite` config file writing ``output``; its path."""

    body = {
        "model": {"path": inputs["model"]},
        "sources": [inputs["source"]],
        "adapter": inputs["adapter"],
        "output": output,
        "rewrite": {"batch_size": 256, "min_rows_per_file": unit_rows, "max_rows_per_file": unit_rows},
        "ray": {"num_cpus": 2},
    }
    path = os.path.join(work, f"rewrite-{hashlib.sha1(output.encode()).hexdigest()[:8]}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(body, f)
    return path


def start(cfg: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "puma_ray.cli", "rewrite", "--config", cfg],
        start_new_session=True,
        stdout=log,
        stderr=log,
    )


def units_done(output: str) -> int:

    state = outputs.staged(output, "rewrite_state")
    return sum(1 for u in storage.list_files(state, ".json") if u.rsplit("/", 1)[-1].startswith("unit-"))


def actor_pids(driver: int) -> list[int]:
    """Rewrite actors of the local Ray that the driver ``driver`` started (its session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != driver:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if ACTOR in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def digest(output: str) -> dict:
    """The output's files (relative name -> sha256) and its manifest's comparable part."""

    files = {
        u[len(output) + 1 :]: hashlib.sha256(storage.read_bytes(u)).hexdigest()
        for u in storage.list_files(output)
        if not u.endswith(".json") and "/source_joined/" not in u
    }
    m = storage.read_json(storage.join(output, "manifest.json"))
    rel = [{**f, "uri": f["uri"][len(output) + 1 :]} for f in m["output"]["files"]]
    return {"files": files, "rows": m["output"]["rows"], "manifest_files": rel}


def check(output: str, ref: dict, users: int) -> list[str]:
    """What differs between a soaked output and the reference (empty: nothing)."""

    problems = []
    ids = storage.read_table(storage.join(output, "prompts"), columns=["user_id"]).column("user_id")
    if len(ids) != users or pc.count_distinct(ids).as_py() != users:
        problems.append(f"{len(ids)} rows, {pc.count_distinct(ids).as_py()} distinct users, expected {users}")
    got = digest(output)
    if got["files"] != ref["files"]:
        diff = {k for k in set(got["files"]) | set(ref["files"]) if got["files"].get(k) != ref["files"].get(k)}
        problems.append(f"{len(diff)} file(s) differ from the uninterrupted rewrite, e.g. {sorted(diff)[:3]}")
    if (got["rows"], got["manifest_files"]) != (ref["rows"], ref["manifest_files"]):
        problems.append("the manifest differs from the uninterrupted rewrite's")
    if storage.exists(outputs.staged(output)):
        problems.append("staging left behind")
    return problems


def soak(kind: str, root: str, work: str, inputs: dict, args, rng: random.Random) -> dict:
    """The reference and the killed rounds on one storage (``root``: a directory or s3:// prefix)."""

    log = open(os.path.join(work, f"drivers-{kind}.log"), "ab")
    ref_out = storage.join(root, "reference")
    t0 = time.time()
    if start(config(work, inputs, ref_out, args.unit_rows), log).wait() != 0:
        raise SystemExit(f"kill_soak: the reference rewrite failed; see {log.name}")
    t_ref = time.time() - t0
    ref = digest(ref_out)
    n_units = len(ref["manifest_files"])
    kills, rounds, problems = [], 0, []
    while len(kills) < args.kills:
        rounds += 1
        out = storage.join(root, f"round-{rounds}")
        cfg = config(work, inputs, out, args.unit_rows)
        driver, starts = start(cfg, log), 1
        while True:
            done = units_done(out)
            r = rng.random()
            if len(kills) >= args.kills:
                goal = None  # enough kills: let this round finish
            elif r < 0.1:
                goal = 0  # during start-up (Ray, torch, the checks, planning)
            elif r < 0.2:
                goal = n_units  # after the last unit: the exactly-once check, publish, manifest
            else:
                goal = done + rng.randint(1, max(1, n_units - done))
            # the first kill of a storage hits the driver, so every run includes a resume
            target = "driver" if not kills or rng.random() < args.driver_share else "actor"
            wait_for = rng.uniform(0.5, 0.5 * t_ref) if goal == 0 else None
            t_start = time.time()
            if goal is None:
                driver.wait()
            while driver.poll() is None:
                if goal == 0 and time.time() - t_start >= wait_for:
                    break
                if goal and units_done(out) >= goal:
                    break
                time.sleep(0.02)
            if driver.poll() is not None:
                if driver.returncode != 0:
                    problems.append(f"round {rounds}: the driver exited {driver.returncode}; see {log.name}")
                break
            at = {"round": rounds, "storage": kind, "units_done": units_done(out), "units": n_units}
            pids = actor_pids(driver.pid) if target == "actor" else []
            if pids:
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                kills.append({**at, "killed": "actor", "pid": pid})
            else:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
                kills.append({**at, "killed": "driver"})
                driver, starts = start(cfg, log), starts + 1
            k = kills[-1]
            print(
                f"kill {len(kills):>2} ({kind}, round {rounds}, start {starts}): {k['killed']:<6} at "
                f"{k['units_done']}/{n_units} units",
                file=sys.stderr,
                flush=True,
            )
        driver.wait()
        wrong = check(out, ref, args.users)
        problems += [f"round {rounds}: {p}" for p in wrong]
        print(f"round {rounds} ({kind}): {'OK' if not wrong else '; '.join(wrong)}", file=sys.stderr, flush=True)
    return {
        "storage": kind,
        "kills": len(kills),
        "driver_kills": sum(k["killed"] == "driver" for k in kills),
        "actor_kills": sum(k["killed"] == "actor" for k in kills),
        "rounds": rounds,
        "units": n_units,
        "reference_wall_s": round(t_ref, 1),
        "kill_points": [k["units_done"] for k in kills],
        "problems": problems,
    }


def s3_root(work: str) -> tuple[str, object]:
    """A moto S3 server on loopback with a fresh bucket; its root URI and the server (to stop)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="soak")
    return "s3://soak", server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills per storage (default 20)")
    ap.add_argument("--users", type=int, default=40_000, help="users in the source store (default 40,000)")
    ap.add_argument("--unit-rows", type=int, default=500, help="users per unit / output file (default 500)")
    ap.add_argument("--storage", default="local,s3", help="comma-separated: local, s3 (default both)")
    ap.add_argument(
        "--driver-share",
        type=float,
        default=0.5,
        help="share of kills aimed at the driver after the first, which always is (0.5)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.storage.split(",") if k.strip()]
    if not kinds or set(kinds) - {"local", "s3"}:
        ap.error(f"--storage: local and/or s3, got {args.storage!r}")
    work = args.work or tempfile.mkdtemp(prefix="kill-soak-")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    inputs = setup(work, args.users, args.unit_rows, args.seed)
    results = []
    for kind in kinds:
        if kind == "local":
            results.append(soak(kind, os.path.join(work, "out"), work, inputs, args, rng))
        else:
            root, server = s3_root(work)
            try:
                on_s3 = {**inputs, "source": storage.join(root, "source"), "adapter": storage.join(root, "adapter")}
                for key in ("source", "adapter"):  # the inputs are read from S3 too
                    for f in storage.list_files(inputs[key]):
                        storage.write_bytes(on_s3[key] + f[len(inputs[key]) :], storage.read_bytes(f))
                results.append(soak(kind, root, work, on_s3, args, rng))
            finally:
                server.stop()
    summary = {"users": args.users, "wall_s": round(time.time() - t0, 1), "load": os.getloadavg(), "runs": results}
    print(json.dumps(summary))
    bad = [p for r in results for p in r["problems"]]
    for r in results:
        print(
            f"{r['storage']}: {r['kills']} kills ({r['driver_kills']} driver, {r['actor_kills']} actor) over "
            f"{r['rounds']} round(s) of {r['units']} units; outputs identical to the uninterrupted rewrite: "
            f"{'yes' if not r['problems'] else 'NO'}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
