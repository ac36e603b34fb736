"""Reports of ``unlearn demo`` / ``unlearn run`` / ``unlearn mmu``: ``report.json``, PNG plots and a rich table."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from unlearn_ext.models.checkpoint import atomic_write_bytes

TABLE_COLUMNS = (
    ("forget_acc", "forget"),
    ("forget_class_test_acc", "fgt-cls test"),
    ("retain_acc", "retain"),
    ("retain_class_test_acc", "kept-cls test"),
    ("test_acc", "test"),
    ("mia", "MIA"),
    ("avg_gap", "gap"),
)
#: Deep-forgetting columns of the table (percent, except CKA printed as x100 too): (key, header).
DEEP_TABLE_COLUMNS = (
    ("fm_recovered_forget_acc", "FM-rec fgt"),
    ("fm_recovered_test_acc", "FM-rec test"),
    ("fm_linear_recovered_forget_acc", "FMlin fgt"),
    ("ft_recovered_forget_acc", "FT-rec fgt"),
    ("cka_original_forget", "CKA orig"),
)


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.json``, ``accuracy.png``, ``time.png`` and, with deep-forgetting metrics,
    ``deep.png`` into ``out_dir`` (atomically each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    atomic_write_bytes(written[0], (json.dumps(report, indent=2, default=_jsonable) + "\n").encode())
    written += _plots(report, out)
    return written


def _has_deep(rows: dict) -> bool:
    return any(k in r for r in rows.values() for k, _ in DEEP_TABLE_COLUMNS)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {k: v for k, v in report["methods"].items() if "error" not in v}
    names = list(rows)
    keys = [k for k, _ in TABLE_COLUMNS if k != "avg_gap" and any(k in r for r in rows.values())]
    labels = dict(TABLE_COLUMNS)
    paths = []

    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.5))
    width = 0.8 / max(len(keys), 1)
    x = np.arange(len(names))
    for i, k in enumerate(keys):
        ax.bar(x + i * width - 0.4 + width / 2, [rows[n].get(k, np.nan) for n in names], width, label=labels[k])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    forget = report["forget"]
    what = f"classes {forget['classes']}" if forget["kind"] == "class" else f"{forget['fraction']:.0%} of samples"
    ax.set_title(f"{report['dataset']['name']} / {report['model']['arch']}: forgetting {what}")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    paths.append(_save(fig, out / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4))
    ax.bar(names, [max(rows[n]["seconds"], 1e-4) for n in names], color="tab:gray")
    ax.set_yscale("log")
    ax.set_ylabel("wall time (s, log)")
    ax.set_title(f"wall time ({report.get('threads', '?')} threads)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(_save(fig, out / "time.png"))

    if _has_deep(rows):
        keys = [k for k, _ in DEEP_TABLE_COLUMNS if any(k in r for r in rows.values())]
        labels = dict(DEEP_TABLE_COLUMNS)
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.5))
        width = 0.8 / len(keys)
        for i, k in enumerate(keys):
            ax.bar(x + i * width - 0.4 + width / 2, [rows[n].get(k, np.nan) for n in names], width, label=labels[k])
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.22)  # headroom for the legend above the bars
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("accuracy after the attack / CKA")
        ax.set_title("deep forgetting: recovery attacks and CKA to the original on the forget set")
        ax.legend(fontsize=8, ncol=len(keys), loc="upper center")
        fig.tight_layout()
        paths.append(_save(fig, out / "deep.png"))
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def print_table(report: dict) -> None:
    """Print the methods table with rich (percentages; seconds; speed-up over retraining)."""
    from rich.console import Console
    from rich.table import Table

    forget = report["forget"]
    what = f"classes {forget['classes']}" if forget["kind"] == "class" else f"{forget['fraction']:.0%} of samples"
    table = Table(
        title=f"{report['dataset']['name']} / {report['model']['arch']}, forgetting {what}, seed {report['seed']}"
    )
    table.add_column("method", no_wrap=True)
    rows = report["methods"]
    cols = [(k, label) for k, label in TABLE_COLUMNS + DEEP_TABLE_COLUMNS if any(k in r for r in rows.values())]
    for _, label in cols:
        table.add_column(label, justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("x faster than retrain", justify="right")
    for name, r in rows.items():
        if "error" in r:
            table.add_row(name, f"[red]{r['error']}[/red]", *[""] * (len(cols) + 1))
            continue
        cells = [f"{100 * r[k]:.1f}" if r.get(k) is not None else "-" for k, _ in cols]
        speed = r.get("speedup_vs_retrain")
        cached = " (cached)" if r.get("cached") else ""
        table.add_row(name, *cells, f"{r['seconds']:.3g}{cached}", f"{speed:.3g}" if speed else "-")
    Console(width=max(Console().width, 172)).print(table)
    Console().print("accuracies and MIA in %, gap = mean |difference| to retrain (test, forget, MIA) in points")
    if _has_deep(rows):
        Console().print(
            "deep forgetting (x100): FM-rec = accuracy of the feature-mapping recovery attack (affine map fitted on "
            "retain features to the original's, then the original head) on the forget set / the whole test set; "
            "FMlin = the same with the paper's linear map (no intercept) on the forget set; "
            "FT-rec = forget accuracy after 50 SGD steps on 256 retain samples; CKA orig = linear CKA of the "
            "forget set's features to the original's"
        )


#: ``unlearn mmu`` table columns: (report key, header, higher is better).
MMU_COLUMNS = (
    ("efficacy", "efficacy", True),
    ("generality", "generality", True),
    ("specificity", "specificity", True),
    ("specificity_drop", "spec. drop", False),
    ("text_specificity", "text", True),
    ("text_drop", "text drop", False),
    ("fluency_ppl", "fluency (ppl)", False),
    ("diversity", "diversity", True),
    ("c_dis", "C-Dis", True),
    ("min_k", "Min-K%", False),
)


#: The per-digit table's columns (a subset of :data:`MMU_COLUMNS`).
MMU_DIGIT_COLUMNS = tuple(
    c for c in MMU_COLUMNS if c[0] in ("efficacy", "generality", "specificity_drop", "text_drop", "fluency_ppl")
)


def write_mmu_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.json`` and ``minimmu.png`` (efficacy/generality/specificity per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    atomic_write_bytes(written[0], (json.dumps(report, indent=2, default=_jsonable) + "\n").encode())
    summary = report["summary"]
    names = list(summary)
    keys = [k for k in ("efficacy", "generality", "specificity", "text_specificity") if k in summary[names[0]]]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(names)), 4.5))
    width = 0.8 / len(keys)
    x = np.arange(len(names))
    for i, k in enumerate(keys):
        ax.bar(x + i * width - 0.4 + width / 2, [summary[n][k] for n in names], width, label=k)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"MiniMMU, forgetting digits {report['spec']['digits']} (mean over digits)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    written.append(_save(fig, out / "minimmu.png"))
    plt.close("all")
    return written


def print_mmu_table(report: dict) -> None:
    """Print ``unlearn mmu``'s table: per method, the metrics' means over the forgotten digits."""
    from rich.console import Console
    from rich.table import Table

    spec = report["spec"]
    table = Table(title=f"MiniMMU, forgetting digits {spec['digits']} one at a time (means), {spec['steps']} steps")
    table.add_column("method", no_wrap=True)
    for _, label, _ in MMU_COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("seconds", justify="right")
    for name, r in report["summary"].items():
        cells = [f"{r[k]:.3g}" if k in r else "-" for k, _, _ in MMU_COLUMNS]
        table.add_row(name, *cells, f"{r['seconds']:.3g}")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    by_digit = report.get("by_digit")
    if by_digit:
        seeds = list(spec.get("seeds", []))
        per = Table(title=f"per digit: mean ± sd over seeds {seeds}")
        for name in ("digit", "method", "runs", *(label for _, label, _ in MMU_DIGIT_COLUMNS)):
            per.add_column(name, justify="right" if name not in ("method",) else "left")
        digits = sorted({d for rows in by_digit.values() for d in rows}, key=int)
        for d in digits:
            for name, rows in by_digit.items():
                if d in rows:
                    r = rows[d]
                    per.add_row(d, name, str(r["runs"]), *(_mean_sd(r, k) for k, _, _ in MMU_DIGIT_COLUMNS))
        console.print(per)
    Console().print(
        "efficacy, generality, specificity, text and diversity in % (higher is better); drops in points; "
        "fluency: perplexity of the original answers (lower is better)"
    )


def _mean_sd(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.3g}" + (f" ± {sd:.2g}" if sd is not None else "")
