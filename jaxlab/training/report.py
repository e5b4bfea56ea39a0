"""Run reports: a markdown table and plots from ``metrics.jsonl`` (what ``jaxlab report RUN_DIR`` writes)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from jaxlab.training.config import load_yaml
from jaxlab.training.metrics import read_metrics

__all__ = ["write_report", "markdown_table", "suspicious_values"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _plot_series(by_split, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, rows in by_split.items():
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float) and k not in ("step",)})
        keys = [k for k in keys if k not in ("steps_per_s", "loss_steps")]
        if not keys:
            continue
        n = len(keys)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
        for ax, k in zip(axes[0], keys):
            xs = [r["step"] for r in rows if isinstance(r.get(k), int | float)]
            ys = [r[k] for r in rows if isinstance(r.get(k), int | float)]
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
            if ys and min(ys) > 0 and max(ys) / max(min(ys), 1e-12) > 20:
                ax.set_yscale("log")
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        name = f"{split}_metrics.png"
        fig.savefig(plots / name, dpi=100)
        plt.close(fig)
        lines.append(f"![{split} metrics](plots/{name})")
    return lines


# metric names (substrings) whose values cannot be negative
NONNEGATIVE = ("sw2", "energy", "mmd", "fd", "grad_norm", "kl", "mse")


def suspicious_values(rows: list[dict]) -> list[str]:
    """One line per metric whose logged values are not finite, or negative where they cannot be."""
    bad: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if k in ("step", "split"):
                continue
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                bad[(f"{r['split']}/{k}", "not finite")].append(r["step"])
            elif isinstance(v, int | float) and v < 0 and any(n in k.lower() for n in NONNEGATIVE):
                bad[(f"{r['split']}/{k}", "negative (cannot be)")].append(r["step"])
    out = []
    for (name, what), steps in bad.items():
        shown = ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")
        out.append(f"`{name}` is {what} at {len(steps)} logged step(s): {shown}")
    return out


def write_report(run_dir, extra_lines: list[str] | None = None) -> Path:
    """Write ``run_dir/report.md`` (+ ``plots/{split}_metrics.png``) from ``run_dir/metrics.jsonl``.

    The report holds the run's name and config summary, the last train metrics, one row per
    evaluation, and every PNG under ``plots/``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run dir {run_dir}")
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl (not a run dir, or the run logged nothing yet)")
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no rows: nothing to report")
    by_split: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_split[r["split"]].append(r)
    cfg = {}
    if (run_dir / "config.yaml").exists():
        cfg = load_yaml((run_dir / "config.yaml").read_text()) or {}
    md = [f"# Run report: {cfg.get('name', run_dir.name)}", ""]
    if cfg:
        md += [
            f"task `{cfg.get('task', {}).get('name')}` on `{cfg.get('data', {}).get('name')}`, "
            f"model `{cfg.get('model', {}).get('name')}`, {cfg.get('train', {}).get('steps')} steps, "
            f"seed {cfg.get('seed')}; full config in `config.yaml`.",
            "",
        ]
    if by_split.get("train"):
        last = by_split["train"][-1]
        keys = [k for k in last if k not in ("step", "split")]
        md += ["## Final train metrics", "", markdown_table(["step"] + keys, [[last["step"]] + [last[k] for k in keys]]), ""]
    if by_split.get("eval"):
        keys = sorted({k for r in by_split["eval"] for k in r if k not in ("step", "split")})
        md += ["## Evaluations", ""]
        md += [markdown_table(["step"] + keys, [[r["step"]] + [r.get(k, "") for k in keys] for r in by_split["eval"]]), ""]
    flags = suspicious_values(rows)
    if flags:
        md += ["## Warnings", ""] + [f"- {f}" for f in flags] + [""]
    changes = run_dir / "config_changes.jsonl"
    if changes.is_file():
        md += ["## Config changes on resume", ""]
        for line in changes.read_text().splitlines():
            row = json.loads(line)
            md += [f"- from step {row['step']}: " + "; ".join(f"`{k}` {a!r} -> {b!r}" for k, (a, b) in row["changes"].items())]
        md += [""]
    md += ["## Plots", ""] + _plot_series(by_split, run_dir)
    for line in extra_lines or []:
        if line not in md:
            md.append(line)
    known = set("\n".join(md).split())
    for png in sorted((run_dir / "plots").glob("*.png")):
        ref = f"plots/{png.name}"
        if not any(ref in w for w in known):
            md.append(f"![{png.stem}]({ref})")
    path = run_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
