"""The migration report: RUN/evaluation.json -> four PNGs + report.md, and `puma-ray report RUN`.

`puma-ray migrate` writes evaluation.json (puma_ray.evaluate): every method's metrics and cost and,
when computed, the per-user statistics (``per_user``), the per-user gate (``gate``) and the retraining
of the users it flagged (``retrain``). :func:`write_report` draws from that dict alone:

    gate_change.png       the judged users' per-user error change (run vs reference) and the threshold
    activity_deciles.png  per-user error by training-activity decile, one line per method
    adapter_users.png     each method's metric on the adapter's training users vs the other users
    quality_cost.png      each method's metric against its LM sample-passes (training cost)
    report.md             a verdict, the methods, gate and decile tables, the plots above

A plot whose data the evaluation lacks is skipped, and report.md says why. A light module: it never
imports torch or transformers (puma_ray.LIGHT_MODULES).
"""

from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import PercentFormatter

from puma_ray import storage
from puma_ray.console import say
from puma_ray.errors import PumaError, user_errors

matplotlib.use("Agg")  # files only, never a window

PLOTS = ("gate_change.png", "activity_deciles.png", "adapter_users.png", "quality_cost.png")
BASELINES = ("global_mean", "user_mean", "bias")  # puma_ray.baselines' methods (that module imports Ray Data)
LABELS = {"rmse": "RMSE", "mae": "MAE", "auc": "AUC", "uauc": "uAUC", "logloss": "log loss"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
BASELINE_GRAYS = ("0.3", "0.5", "0.65", "0.75")
NO_VALUE = "—"


def format_table(report: dict) -> str:
    """A Markdown table of a report (methods x metrics + cost); subset columns when present."""
    task = report["task"]
    cols = ["rmse", "mae"] if task == "rating" else ["auc", "uauc"]
    methods = report["methods"]
    subs = sorted({k[len(cols[0]) + 4 :] for m in methods.values() for k in m if k.startswith(f"{cols[0]}_in_")})
    extra = [f"{cols[0]}_{side}_{sub}" for sub in subs for side in ("in", "out")]
    head = [c.upper() for c in cols] + [f"{cols[0].upper()} {side} {sub}" for sub in subs for side in ("in", "out")]
    lines = [
        f"| method | {' | '.join(head)} | LM sample-passes | wall s | unknown rows |",
        "|---|" + "---:|" * (len(head) + 3),
    ]
    for name, m in methods.items():
        vals = " | ".join(f"{m[c]:.4f}" if c in m else "" for c in cols + extra)
        cost = f"{int(m.get('lm_sample_passes', 0)):,} | {m.get('wall_s', 0):.1f} | {m.get('unknown_rows', 0)}"
        lines.append(f"| {name} | {vals} | {cost} |")
    table = "\n".join(lines)
    return f"{table}\n\n{holdout_table(report)}" if report.get("holdout") else table


def holdout_table(report: dict) -> str:
    """Every method's per-user metric on the rows held out of the gate (gate.holdout), and its ratio
    to full_retrain's when there is one: the comparison the gate's choice of users never saw."""
    held = report["holdout"]
    methods = held["methods"]
    label = _label(held.get("metric", "error"))
    ref = (methods.get("full_retrain") or {}).get("error")
    lines = [
        f"On the {held['share']:.0%} of validation rows held out of the gate (a hash of user and item):",
        "",
        f"| method | {label} on held-out rows | / full_retrain | held-out rows |",
        "|---|---:|---:|---:|",
    ]
    for name in dict.fromkeys([*report["methods"], *methods]):  # the report's order first
        if name in methods:
            m = methods[name]
            ratio = f"{m['error'] / ref:.4f}" if _finite(ref) and ref and _finite(m["error"]) else NO_VALUE
            lines.append(f"| {name} | {_f4(m['error'])} | {ratio} | {m['rows']:,} |")
    return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _f4(x) -> str:
    """A metric as report.md prints it: 4 decimals, a dash when absent."""
    return f"{x:.4f}" if _finite(x) else NO_VALUE


def _label(metric: str) -> str:
    return LABELS.get(metric, metric)


def main_metric(report: dict) -> str:
    """The metric a method is ranked by: RMSE (rating, lower is better) or AUC (ctr, higher is better)."""
    return "rmse" if report["task"] == "rating" else "auc"


def run_name(report: dict) -> str:
    """The migrated run: the gate's run, else "puma" (migrate's name for it), else the first method."""
    gate = report.get("gate") or {}
    return gate.get("run") or ("puma" if "puma" in report["methods"] else next(iter(report["methods"])))


def _retrained(report: dict) -> str | None:
    return (report.get("retrain") or {}).get("method")


def _style(report: dict, name: str, index: int) -> dict:
    """Line/marker style of a method: the migrated run and full_retrain prominent, baselines dashed gray."""
    if name == run_name(report):
        return {"color": "tab:red", "lw": 2.8, "ls": "-", "marker": "o", "zorder": 5}
    if name == "full_retrain":
        return {"color": "tab:blue", "lw": 2.8, "ls": "-", "marker": "D", "zorder": 4}
    if name == _retrained(report):
        return {"color": "tab:orange", "lw": 2.0, "ls": "-", "marker": "^", "zorder": 3}
    if name in BASELINES:
        color = BASELINE_GRAYS[BASELINES.index(name) % len(BASELINE_GRAYS)]
        return {"color": color, "lw": 1.3, "ls": "--", "marker": "s", "zorder": 1}
    return {"color": OTHER_COLORS[index % len(OTHER_COLORS)], "lw": 1.6, "ls": "-", "marker": "o", "zorder": 2}


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def _edge(x) -> str:
    return f"{x:g}" if _finite(x) else "?"


def decile_labels(edges: list, n: int) -> list[str]:
    """'lo–hi' training interactions per decile; the decile's number when the edges do not fit."""
    if len(edges) != n + 1:
        return [str(i + 1) for i in range(n)]
    return [f"{_edge(edges[i])}–{_edge(edges[i + 1])}" for i in range(n)]


def _deciles(report: dict) -> dict:
    return ((report.get("per_user") or {}).get("activity_deciles")) or {}


# --- plots: each returns None when drawn, else why it was skipped ------------------------------------


def _gate_titles(gate: dict) -> tuple[str, str, str]:
    """(title, x label, threshold label) of gate_change.png."""
    run, ref, metric = gate["run"], gate["reference"], _label(gate["metric"])
    share = gate["flagged_share"]
    title = (
        f"{run} vs {ref}: {gate['flagged']} of {gate['judged']} users flagged ({share:.1%}); "
        f"{gate['undecided']} undecided"
    )
    thr = gate["max_regression"]
    if gate["mode"] == "relative":
        return title, f"per-user {metric} change, relative ({run} / {ref} − 1)", f"threshold +{thr:.1%}"
    return title, f"per-user {metric} change ({run} − {ref}; {metric} units)", f"threshold +{thr:.4f} {metric}"


def plot_gate_change(report: dict, uri: str) -> str | None:
    """Histogram of the judged users' per-user error change, run vs reference (gate.histogram): green
    bins improved (< 0), red bins past the threshold (flagged), a line at 0 and one at the threshold."""
    gate = report.get("gate")
    if not gate:
        return "no per-user gate in evaluation.json"
    hist = gate.get("histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if not gate.get("judged") or not counts or len(edges) != len(counts) + 1:
        return f"no user had the {gate.get('min_rows')} valid rows the gate needs for a verdict"
    thr = gate["max_regression"]
    title, xlabel, thr_label = _gate_titles(gate)
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=110, layout="constrained")
    kinds = (("improved (< 0)", "tab:green"), ("within the threshold", "0.6"), ("flagged (> threshold)", "tab:red"))
    for kind, (label, color) in enumerate(kinds):
        bins = [i for i in range(len(counts)) if _bin_kind(edges[i], edges[i + 1], thr) == kind]
        if not bins:
            continue
        lefts = [edges[i] for i in bins]
        widths = [edges[i + 1] - edges[i] for i in bins]
        ax.bar(
            lefts, [counts[i] for i in bins], width=widths, align="edge", color=color, edgecolor="white", label=label
        )
    ax.axvline(0.0, color="black", lw=1.2, label="no change")
    ax.axvline(thr, color="tab:red", lw=1.6, ls="--", label=thr_label)
    ax.set_title(title, fontsize=10)
    full = hist.get("range")
    if full and (full[0] < edges[0] or full[1] > edges[-1]):  # the end bins also count the outliers
        fmt = "{:.0%}" if gate["mode"] == "relative" else "{:.3g}"
        xlabel += f"\nend bins include every change beyond them (all: {fmt.format(full[0])} to {fmt.format(full[1])})"
    ax.set_xlabel(xlabel)
    if gate["mode"] == "relative":
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("judged users")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, uri)
    return None


def _bin_kind(lo: float, hi: float, thr: float) -> int:
    """0: the bin lies below 0 (improved), 2: above the threshold (flagged), 1: between."""
    mid = (lo + hi) / 2
    return 0 if mid < 0 else 2 if mid > thr else 1


def plot_activity_deciles(report: dict, uri: str) -> str | None:
    """Per-user error by activity decile (users ranked by their training interactions; decile 1 the
    least active), one line per method: the error pooled over the decile's users' valid rows."""
    deciles = _deciles(report)
    methods = deciles.get("methods") or {}
    if not methods:
        return "no per-user statistics (per_user.activity_deciles) in evaluation.json"
    metric = _label(report["per_user"].get("metric", "error"))
    n = max(len(m.get("value") or []) for m in methods.values())
    x = list(range(1, n + 1))
    fig, ax = plt.subplots(figsize=(8.6, 4.8), dpi=110, layout="constrained")
    for i, (name, m) in enumerate(methods.items()):
        y = [v if _finite(v) else math.nan for v in m.get("value") or []]
        ax.plot(x[: len(y)], y, label=name, ms=5, **_style(report, name, i))
    labels = decile_labels(deciles.get("edges") or [], n)
    ax.set_xticks(x, labels=[f"{i}\n{label}" for i, label in zip(x, labels)], fontsize=8)
    ax.set_xlabel("activity decile (1 = least active)  /  training interactions per user")
    ax.set_ylabel(f"{metric} over the decile's users' valid rows")
    ax.set_title(f"Per-user {metric} by user activity", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, uri)
    return None


def _adapter_rows(report: dict) -> list[tuple[str, float, float]]:
    metric = main_metric(report)
    rows = []
    for name, m in report["methods"].items():
        inside, outside = m.get(f"{metric}_in_adapter_users"), m.get(f"{metric}_out_adapter_users")
        if _finite(inside) and _finite(outside):
            rows.append((name, inside, outside))
    return rows


def plot_adapter_users(report: dict, uri: str) -> str | None:
    """Grouped bars per method: its main metric (RMSE or AUC) on the users the adapter was trained on
    vs on every other user, each bar labelled with its value (the axis is zoomed onto the values)."""
    metric = main_metric(report)
    rows = _adapter_rows(report)
    if not rows:
        return f"no method has both {metric}_in_adapter_users and {metric}_out_adapter_users"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2.5), 4.6), dpi=110, layout="constrained")
    x = list(range(len(rows)))
    sides = ((1, "users the adapter trained on", "tab:blue", -0.2), (2, "all other users", "tab:orange", 0.2))
    for col, label, color, shift in sides:
        values = [r[col] for r in rows]
        bars = ax.bar([i + shift for i in x], values, width=0.4, color=color, label=label)
        ax.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize=7, rotation=90, padding=2)
    values = [v for r in rows for v in r[1:]]
    lo, hi = min(values), max(values)
    span = (hi - lo) or abs(hi) * 0.05 or 0.1
    ax.set_ylim(lo - 0.6 * span, hi + 0.6 * span)
    ax.set_xticks(x, labels=[r[0] for r in rows], rotation=25, ha="right")
    better = "lower" if metric == "rmse" else "higher"
    ax.set_ylabel(f"{_label(metric)} ({better} is better; axis zoomed)")
    ax.set_title(f"{_label(metric)} on the adapter's training users vs the others", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, uri)
    return None


def _cost_axis(ax, costs: list) -> dict:
    """A log x axis over the positive costs, and left of a dotted line a column labelled 0 for the
    methods that pass no sample through an LM (the baselines). Returns cost -> where it is drawn."""
    positive = [c for c in costs if c > 0]
    if not positive:
        ax.set_xticks([0], labels=["0"])
        return {c: 0 for c in costs}
    lo = math.floor(math.log10(min(positive)))
    hi = max(math.ceil(math.log10(max(positive))), lo + 1)
    zero = 10.0 ** (lo - 1)
    ax.set_xscale("log")
    ax.set_xlim(10.0 ** (lo - 1.5), 10.0 ** (hi + 0.5))
    ax.axvline(10.0 ** (lo - 0.5), color="0.6", ls=":", lw=1)
    decades = list(range(lo, hi + 1))
    ax.set_xticks([zero] + [10.0**k for k in decades], labels=["0"] + [f"$10^{{{k}}}$" for k in decades])
    ax.minorticks_off()
    return {c: c if c > 0 else zero for c in costs}


def _label_sides(points: list[tuple[str, float, float]]) -> dict[str, str]:
    """Which side of its point each name is written on: points of about the same cost (a decade)
    alternate left and right from the lowest up, so that close neighbours do not overwrite each other.
    The zero column writes to the right."""
    groups: dict = {}
    for name, y, x in points:
        groups.setdefault(round(math.log10(x)) if x > 0 else None, []).append((y, name))
    sides = {}
    for key, members in groups.items():
        for i, (_, name) in enumerate(sorted(members)):
            sides[name] = "right" if key is None or i % 2 else "left"
    return sides


def plot_quality_cost(report: dict, uri: str) -> str | None:
    """Each method's main metric (RMSE or AUC) against its LM sample-passes, the cost of training it
    (log x axis; the baselines, which pass no sample through an LM, in a column at 0), each point named."""
    metric = main_metric(report)
    points = [(name, m[metric], m.get("lm_sample_passes") or 0) for name, m in report["methods"].items()]
    points = [p for p in points if _finite(p[1])]
    if not points:
        return f"no method has a {_label(metric)}"
    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=110, layout="constrained")
    where = _cost_axis(ax, [p[2] for p in points])
    sides = _label_sides(points)
    for i, (name, y, x) in enumerate(points):
        style = _style(report, name, i)
        ax.scatter([where[x]], [y], color=style["color"], marker=style["marker"], s=70, zorder=style["zorder"])
        right = sides[name] == "right"
        offset = (7, 3) if right else (-7, 3)
        ha = "left" if right else "right"
        ax.annotate(name, (where[x], y), xytext=offset, textcoords="offset points", fontsize=8, ha=ha)
    better = "lower" if metric == "rmse" else "higher"
    ax.set_xlabel("LM sample-passes to train (log scale; 0: baselines, no LM)")
    ax.set_ylabel(f"{_label(metric)} ({better} is better)")
    ax.set_title(f"Quality vs training cost ({_label(metric)})", fontsize=11)
    ax.grid(alpha=0.3)
    _save(fig, uri)
    return None


PLOTTERS = dict(zip(PLOTS, (plot_gate_change, plot_activity_deciles, plot_adapter_users, plot_quality_cost)))


# --- report.md ------------------------------------------------------------------------------------


def _quality_line(report: dict) -> str:
    """'puma: RMSE 0.9480 vs full_retrain 0.9318 (1.017x) at 23% of its LM sample-passes'."""
    metric = main_metric(report)
    run = run_name(report)
    m = report["methods"].get(run, {})
    line = f"{run}: {_label(metric)} {_f4(m.get(metric))}"
    full = report["methods"].get("full_retrain")
    if full is None or run == "full_retrain":
        return line
    line += f" vs full_retrain {_f4(full.get(metric))}"
    if _finite(m.get(metric)) and _finite(full.get(metric)) and full[metric]:
        line += f" ({m[metric] / full[metric]:.3f}x)"
    passes, full_passes = m.get("lm_sample_passes") or 0, full.get("lm_sample_passes") or 0
    if full_passes:
        line += f" at {100 * passes / full_passes:.0f}% of its LM sample-passes"
    return line


def gate_line(report: dict) -> str:
    """'gate: 12 of 400 judged users (3.0%) worse by more than 0.0500 RMSE than under source; ...'."""
    gate = report.get("gate")
    if not gate:
        return "gate: not computed for this evaluation"
    thr = gate["max_regression"]
    by = f"{thr:.1%}" if gate["mode"] == "relative" else f"{thr:.4f}"
    return (
        f"gate: {gate['flagged']} of {gate['judged']} judged users ({gate['flagged_share']:.1%}) worse by more "
        f"than {by} {_label(gate['metric'])} than under {gate['reference']}; {gate['improved']} improved; "
        f"{gate['undecided']} undecided (fewer than {gate['min_rows']} valid rows)"
    )


def _retrain_line(report: dict) -> str | None:
    r = report.get("retrain")
    if not r:
        return None
    return (
        f"Retrained: the {r['users']} flagged users, as method {r['method']} (run `{r['run']}`), "
        f"{int(r['lm_sample_passes']):,} LM sample-passes, {r['wall_s']:.1f} s."
    )


def verdict(report: dict) -> str:
    """The report's first paragraph: the run against full retraining, and the gate's count."""
    lines = [_quality_line(report) + ";", gate_line(report) + "."]
    retrained = _retrained(report)
    if retrained in report["methods"]:
        metric = main_metric(report)
        m = report["methods"][retrained]
        extra = int(report["retrain"]["lm_sample_passes"])
        lines.append(f"after retraining the flagged users: {retrained} {_label(metric)} {_f4(m.get(metric))}")
        lines[-1] += f" (+{extra:,} LM sample-passes)"
        full = report["methods"].get("full_retrain")
        if full and _finite(m.get(metric)) and _finite(full.get(metric)) and full.get("lm_sample_passes"):
            share = (m.get("lm_sample_passes") or 0) / full["lm_sample_passes"]
            lines[-1] += f": {m[metric] / full[metric]:.3f}x full_retrain at {100 * share:.0f}% of its LM sample-passes"
        lines[-1] += "."
        held = (report.get("holdout") or {}).get("methods", {})
        if retrained in held and "full_retrain" in held:  # the comparison the gate's choice never saw
            ratio = held[retrained]["error"] / held["full_retrain"]["error"]
            lines.append(f"on the validation rows held out of the gate: {ratio:.3f}x full_retrain.")
    return "\n".join(lines)


def gate_table(gate: dict) -> str:
    """The gate's settings and counts, one row each."""
    mode = "relative (run / reference − 1)" if gate["mode"] == "relative" else "absolute (run − reference)"
    rows = [
        ("run", gate["run"]),
        ("reference", gate["reference"]),
        ("metric", _label(gate["metric"])),
        ("mode", mode),
        ("threshold (max_regression)", f"{gate['max_regression']:.4f}"),
        *(
            [("raised from, to flag at most max_share", f"{gate['max_regression_set']:.4f}, {gate['max_share']:.2%}")]
            if gate.get("max_regression_set", gate["max_regression"]) != gate["max_regression"]
            else []
        ),
        ("min valid rows per user", gate["min_rows"]),
        ("users (under both)", gate["users"]),
        ("judged", gate["judged"]),
        ("undecided", gate["undecided"]),
        ("flagged", gate["flagged"]),
        ("flagged share", f"{gate['flagged_share']:.2%}"),
        ("improved", gate["improved"]),
        ("mean change", f"{gate['mean_change']:+.4f}"),
        ("median change", f"{gate['median_change']:+.4f}"),
        ("flagged users listed in", f"`{gate.get('uri', '')}`"),
    ]
    lines = ["| gate | value |", "|---|---:|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def decile_tables(report: dict) -> str:
    """Two tables, methods x activity deciles: the per-user error (4 decimals), the users counted."""
    deciles = _deciles(report)
    methods = deciles["methods"]
    n = max(len(m.get("value") or []) for m in methods.values())
    labels = decile_labels(deciles.get("edges") or [], n)
    head = "| method | " + " | ".join(f"{i + 1}: {label}" for i, label in enumerate(labels)) + " |"
    rule = "|---|" + "---:|" * n
    values = [f"| {name} | " + " | ".join(_f4(v) for v in m.get("value") or []) + " |" for name, m in methods.items()]
    users = [f"| {name} | " + " | ".join(str(u) for u in m.get("users") or []) + " |" for name, m in methods.items()]
    metric = _label(report["per_user"].get("metric", "error"))
    return "\n".join(
        [
            f"{metric} per activity decile (column: decile: training interactions per user):",
            "",
            head,
            rule,
            *values,
            "",
            "Users per decile:",
            "",
            head,
            rule,
            *users,
        ]
    )


def _plot_md(name: str, caption: str, skipped: dict) -> str:
    if name in skipped:
        return f"_{name} skipped: {skipped[name]}._"
    return f"![{caption}]({name})"


def markdown(report: dict, skipped: dict[str, str]) -> str:
    """report.md: title, verdict, methods table, gate, retrain, deciles; plots embedded by relative links."""
    timings = report.get("timings") or {}
    wall = f"; evaluation took {timings['wall_s']:.1f} s" if _finite(timings.get("wall_s")) else ""
    parts = [
        f"# Migration report: {run_name(report)}",
        f"Task: {report['task']}; validation interactions: `{report.get('valid', '')}`{wall}.",
        "## Verdict",
        verdict(report),
        "## Methods",
        format_table(report),
        _plot_md("quality_cost.png", "quality vs training cost", skipped),
        _plot_md("adapter_users.png", "metric on the adapter's training users vs the others", skipped),
        "## Per-user gate",
        gate_table(report["gate"]) if report.get("gate") else "No per-user gate in this evaluation.",
    ]
    if _retrain_line(report):
        parts.append(_retrain_line(report))
    parts.append(_plot_md("gate_change.png", "per-user error change", skipped))
    parts.append("## Per-user error by activity decile")
    parts.append(decile_tables(report) if _deciles(report).get("methods") else "No per-user statistics.")
    parts.append(_plot_md("activity_deciles.png", "per-user error by activity decile", skipped))
    return "\n\n".join(parts) + "\n"


def in_order(report: dict) -> dict:
    """The methods in the report's order, whatever the JSON's (it is written with sorted keys): the
    gated run, its retrained variant, full_retrain, source, random_init, other runs, the baselines."""
    methods = report["methods"]
    first = [run_name(report), _retrained(report), "full_retrain", "source", "random_init"]
    runs = sorted(m for m in methods if m not in first and m not in BASELINES)
    names = [m for m in (*first, *runs, *BASELINES) if m in methods]
    return {m: methods[m] for m in dict.fromkeys(names)}


def write_report(report: dict, out: str) -> dict:
    """Write the plots (PLOTS) and report.md under ``out`` (a storage URI) from an evaluation report.

    A plot whose data is absent is skipped (an earlier one of that name deleted) and report.md says why.
    Returns {"uri": out, "files": the names written, "skipped": {name: why}}."""
    report = {**report, "methods": in_order(report)}
    deciles = (report.get("per_user") or {}).get("activity_deciles")
    if deciles:  # the same order in the decile tables and plot
        by = deciles["methods"]
        names = [*(m for m in report["methods"] if m in by), *(m for m in by if m not in report["methods"])]
        deciles = {**deciles, "methods": {m: by[m] for m in names}}
        report["per_user"] = {**report["per_user"], "activity_deciles": deciles}
    skipped = {}
    for name, plot in PLOTTERS.items():
        why = plot(report, storage.join(out, name))
        if why is not None:
            skipped[name] = why
            storage.delete_file(storage.join(out, name))
    storage.write_bytes(storage.join(out, "report.md"), markdown(report, skipped).encode())
    files = [name for name in PLOTS if name not in skipped] + ["report.md"]
    return {"uri": out, "files": files, "skipped": skipped}


# --- `puma-ray report RUN` ------------------------------------------------------------------------


def check_evaluation(ev, uri: str) -> dict:
    """``ev`` if it is an evaluation report (a task and a mapping of methods), else a one-line error."""
    if not isinstance(ev, dict) or not isinstance(ev.get("methods"), dict) or not ev["methods"]:
        raise PumaError(f'{uri}: not an evaluation report (no "methods")')
    if ev.get("task") not in ("rating", "ctr"):
        raise PumaError(f"{uri}: unknown task {ev.get('task')!r} (rating or ctr)")
    if not all(isinstance(m, dict) for m in ev["methods"].values()):
        raise PumaError(f'{uri}: not an evaluation report (a method of "methods" is not a mapping)')
    return ev


def load_evaluation(run: str) -> dict:
    """RUN/evaluation.json of a migrated run (RUN/summary.json's stage is "migrate"), checked."""
    if not storage.exists(run):
        raise PumaError(f"{run}: not found")
    summary_uri = storage.join(run, "summary.json")
    summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else None
    if not isinstance(summary, dict) or summary.get("stage") != "migrate":
        raise PumaError(f'{run}: not a migrated run (no summary.json with "stage": "migrate")')
    uri = storage.join(run, "evaluation.json")
    if not storage.exists(uri):
        raise PumaError(f"{run}: not a migrated run with an evaluation (no evaluation.json; migrate with evaluate on)")
    return check_evaluation(storage.read_json(uri), uri)


@user_errors
def report(run: str, output: str | None = None) -> dict:
    """Entry of `puma-ray report RUN [--out DIR]`: redraw the migration report from RUN/evaluation.json
    alone, under ``output`` (default RUN/report). Returns :func:`write_report`'s answer."""
    ev = load_evaluation(run)
    out = output or storage.join(run, "report")
    try:
        written = write_report(ev, out)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        uri = storage.join(run, "evaluation.json")
        raise PumaError(f"{uri}: malformed evaluation report ({type(exc).__name__}: {exc})") from None
    plots = len(written["files"]) - 1
    skipped = f"; skipped: {', '.join(written['skipped'])}" if written["skipped"] else ""
    say(f"report: {storage.join(out, 'report.md')} and {plots} plot(s){skipped}")
    return written
