"""`puma-ray tune`'s results: per-trial cost, the Pareto frontier (JSON, Markdown, PNG) and best/.

Outputs under ``cfg.output``:
    results.json        every trial: status, values, metric, cost, epochs run; the best; early-stopping totals
    pareto.json/.md     the non-dominated trials on (metric, cost), cheapest first
    frontier.png        metric vs cost, frontier drawn
    best/               the best COMPLETED trial: adapter/ (input of `puma-ray rewrite`), head.*, summary.json,
                        migrate.yaml (its full config: `puma-ray migrate` reuses its finished training run) and
                        rewrite.yaml (a ready `puma-ray rewrite` config)
"""

from __future__ import annotations

import io
import math
import os

import matplotlib
import matplotlib.pyplot as plt
import yaml

from puma_ray import outputs, storage
from puma_ray.config import TuneConfig, nest
from puma_ray.console import say
from puma_ray.errors import PumaError, find_user_error

matplotlib.use("Agg")  # files only, never a window


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(rows: list[dict], metric: str, mode: str, cost: str) -> list[dict]:
    """The rows no other row beats on both quality and cost, cheapest first.

    Row a dominates row b when a[cost] <= b[cost] and a[metric] is at least as good (``mode``: "min"
    or "max"), one of the two strictly. Rows with identical (cost, metric) do not dominate each other
    and are all kept. Rows lacking a finite metric or cost are left out."""
    sign = 1.0 if mode == "min" else -1.0
    pts = sorted(
        (r for r in rows if _finite(r.get(metric)) and _finite(r.get(cost))), key=lambda r: (r[cost], sign * r[metric])
    )
    front: list[dict] = []
    best = math.inf
    for r in pts:
        q = sign * r[metric]
        if q < best:
            front.append(r)
            best = q
        elif q == best and front and front[-1][cost] == r[cost]:
            front.append(r)
    return front


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def trial_row(result, cfg: TuneConfig) -> dict:
    """One finished (or stopped, errored, interrupted) trial's row of results.json, from its Tune
    result and the files its migration left in OUTPUT/trials/<id>/."""
    m = result.metrics or {}
    trial_id = os.path.basename(str(result.path).rstrip("/"))  # trial dirs are named by _trial_dirname
    out = storage.join(cfg.output, "trials", trial_id)
    # a trial stopped by the scheduler never publishes its output: its selection is still staged
    sel_uri = next(
        (
            u
            for u in (
                storage.join(out, "selection", "selection.json"),
                outputs.staged(out, "selection", "selection.json"),
            )
            if storage.exists(u)
        ),
        None,
    )
    done = storage.exists(storage.join(out, "summary.json")) and storage.exists(
        storage.join(out, "adapter", "adapter.json")
    )
    stopped = storage.exists(storage.join(out, "stopped.json"))
    # stopped before completed: a run stopped by the scheduler may still finish an epoch already under way
    # (and save its adapter) before the stop reaches it, but Tune never saw that result
    status = "error" if result.error else "stopped" if stopped else "completed" if done else "unfinished"
    row = {
        "trial_id": trial_id,
        "status": status,
        "values": _flat(result.config or {}),
        "epochs_done": m.get("epochs_done", 0),
        "epochs": cfg.base.train.epochs,
        cfg.metric: m.get(cfg.metric),
        "selected_users": storage.read_json(sel_uri)["selected"] if sel_uri else None,
        "lm_sample_passes": m.get("lm_sample_passes"),
        "wall_s": m.get("time_total_s"),
        "train_wall_s": m.get("wall_s"),
        "output": out,
    }
    if result.error:
        err = find_user_error(result.error)
        row["error"] = str(err) if err else str(result.error).strip().splitlines()[-1][:300]
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], metric: str, keys: list[str]) -> str:
    cols = ["trial", "status", "epochs", metric, "selected users", "LM sample-passes", "wall s", *keys]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [
            r["trial_id"],
            r["status"],
            f"{r['epochs_done']}/{r['epochs']}",
            _fmt(r.get(metric)),
            _fmt(r.get("selected_users")),
            _fmt(r.get("lm_sample_passes")),
            _fmt(r.get("wall_s")),
            *(_fmt(r["values"].get(k)) for k in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], front: list[dict], metric: str, cost: str, best: dict | None, uri: str) -> None:
    """PNG: every trial as a point (filled = completed, hollow = stopped early), the frontier as a step line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for status, style in (
        ("completed", {"color": "tab:blue"}),
        ("stopped", {"facecolors": "none", "edgecolors": "tab:gray"}),
    ):
        pts = [r for r in rows if r["status"] == status and _finite(r.get(metric)) and _finite(r.get(cost))]
        if pts:
            ax.scatter([r[cost] for r in pts], [r[metric] for r in pts], label=f"{status} ({len(pts)})", s=36, **style)
    if front:
        ax.step(
            [r[cost] for r in front],
            [r[metric] for r in front],
            where="post",
            color="tab:orange",
            label="Pareto frontier",
        )
    if best is not None and _finite(best.get(metric)) and _finite(best.get(cost)):
        ax.scatter(
            [best[cost]],
            [best[metric]],
            marker="*",
            s=200,
            color="tab:red",
            label=f"best ({best['trial_id']})",
            zorder=3,
        )
    ax.set_xlabel(cost.replace("_", " "))
    ax.set_ylabel(metric)
    ax.set_title("puma-ray tune: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def publish_best(cfg: TuneConfig, best: dict) -> str:
    """Copy the best trial's adapter + head + summary to OUTPUT/best and write ready migrate/rewrite configs."""
    src, dst = best["output"], storage.join(cfg.output, "best")
    for uri in storage.list_files(storage.join(src, "adapter")):
        storage.write_bytes(storage.join(dst, "adapter", uri.rsplit("/", 1)[-1]), storage.read_bytes(uri))
    for f in ("head.safetensors", "head.json", "summary.json"):
        storage.write_bytes(storage.join(dst, f), storage.read_bytes(storage.join(src, f)))
    trial = cfg.trial_config(nest(best["values"]), best["trial_id"])
    # The same run.name + storage_path: `puma-ray migrate` finds the finished Train run and does not retrain.
    migrate = trial.model_copy(update={"output": storage.join(dst, "migration")}).model_dump(mode="json")
    storage.write_bytes(
        storage.join(dst, "migrate.yaml"),
        (
            f"# The best trial ({best['trial_id']}) of `puma-ray tune`. Rewrite every prompt + evaluate, reusing\n"
            f"# the trial's finished training (same run.name/storage_path):\n"
            f"#   puma-ray migrate --config {storage.join(dst, 'migrate.yaml')}\n"
            + yaml.safe_dump(migrate, sort_keys=False)
        ).encode(),
    )
    rewrite = {
        "model": trial.model.model_dump(),
        "sources": trial.sources,
        "adapter": storage.join(dst, "adapter"),
        "output": storage.join(dst, "rewrite"),
        "template": trial.template,
        "task": trial.task,
        "rewrite": trial.rewrite.model_dump(),
        "ray": trial.ray.model_dump(),
        "storage": trial.storage.model_dump(),
    }
    storage.write_bytes(
        storage.join(dst, "rewrite.yaml"),
        (
            "# Apply the best trial's adapter to every source prompt:\n"
            f"#   puma-ray rewrite --config {storage.join(dst, 'rewrite.yaml')}\n"
            + yaml.safe_dump(rewrite, sort_keys=False)
        ).encode(),
    )
    return dst


def summarize(cfg: TuneConfig, rows: list[dict], wall_s: float) -> dict:
    """results.json, pareto.json/.md, frontier.png and best/ from the trial rows."""
    rows = sorted(rows, key=lambda r: r["trial_id"])
    errors = [r for r in rows if r["status"] == "error"]
    if errors and len(errors) == len(rows):
        raise PumaError(f"every trial failed; the first: {errors[0]['error']}")
    sign = 1.0 if cfg.mode == "min" else -1.0
    completed = [r for r in rows if r["status"] == "completed" and _finite(r.get(cfg.metric))]
    best = min(completed, key=lambda r: sign * r[cfg.metric]) if completed else None
    front = pareto_front(rows, cfg.metric, cfg.mode, cfg.cost)
    keys = sorted(cfg.search)
    ran = [r for r in rows if r["status"] != "error"]
    results = {
        "metric": cfg.metric,
        "mode": cfg.mode,
        "cost": cfg.cost,
        "scheduler": cfg.scheduler.name,
        "search_wall_s": wall_s,
        "trials": rows,
        "best": best,
        "early_stopping": {
            "trials": len(ran),
            "stopped": sum(r["status"] == "stopped" for r in ran),
            "epochs_run": sum(r["epochs_done"] for r in ran),
            "epochs_if_all_completed": sum(r["epochs"] for r in ran),
            "lm_sample_passes": sum(r["lm_sample_passes"] or 0 for r in ran),
        },
        "pareto": [r["trial_id"] for r in front],
    }
    out = cfg.output
    if best is not None:
        results["best_dir"] = publish_best(cfg, best)
    storage.write_json(storage.join(out, "results.json"), results)
    storage.write_json(
        storage.join(out, "pareto.json"), {"metric": cfg.metric, "mode": cfg.mode, "cost": cfg.cost, "frontier": front}
    )
    md = (
        f"# Quality vs cost ({cfg.metric}, {cfg.mode}; cost: {cfg.cost})\n\n## Pareto frontier\n\n"
        + markdown_table(front, cfg.metric, keys)
        + "\n## All trials\n\n"
        + markdown_table(rows, cfg.metric, keys)
    )
    storage.write_bytes(storage.join(out, "pareto.md"), md.encode())
    plot_frontier(rows, front, cfg.metric, cfg.cost, best, storage.join(out, "frontier.png"))
    print(markdown_table(rows, cfg.metric, keys), end="")
    if best is None:
        say(f"tune: no trial completed; nothing in {storage.join(out, 'best')}")
    else:
        values = ", ".join(f"{k}={_fmt(best['values'].get(k))}" for k in keys)
        say(f"tune: best {best['trial_id']} {cfg.metric}={best[cfg.metric]:.4f} ({values}) -> {results['best_dir']}")
    return results
