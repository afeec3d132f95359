"""docs/evaluation.md's results block and docs/evaluation.png, from benchmarks/kmeans.py's rows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1] / "docs"
BEGIN, END = "<!-- kmeans results: begin -->", "<!-- kmeans results: end -->"


def _name(row: dict[str, Any]) -> str:
    return str(row["name"])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def _usd(usd: float) -> str:
    return f"{usd:.2e}" if usd else "0"


def tables(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], setting: str) -> str:
    """The markdown of the results block."""
    lines = [
        f"Measured: {setting}.",
        "",
        "| pattern / channel | epoch, ms | in the reduction, ms | reduction after the last "
        "update, ms | comm. share | comm. $ / run | functions $ / run | requests and messages "
        "during the epochs |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        requests = ", ".join(
            f"{k} {v}" for k, v in sorted(r["requests"].items()) if not k.endswith("_units")
        )
        lines.append(
            f"| {_name(r)} | {_ms(r['epoch_s'])} | {_ms(r['comm_s'])} | {_ms(r['latency_s'])} | "
            f"{r['share']:.0%} | "
            f"{_usd(r['comm_usd'])} | {_usd(r['faas_usd'])} | {requests} |"
        )
    lines += [
        "",
        "LambdaML over fmi (how many times faster or cheaper the library is):",
        "",
        "| fmi on | against LambdaML on | in the reduction | reduction after the last update "
        "| epoch | communication $ |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for q in ratios:
        lines.append(
            f"| {q['fmi']} | {q['lambdaml']} | {q['comm_speedup']:.1f}x | "
            f"{q['latency_speedup']:.1f}x | "
            f"{q['epoch_speedup']:.2f}x | {q['comm_cheaper']:.1f}x |"
        )
    plans = {r["backend"]: r["plans"] for r in rows if r["pattern"] == "fmi"}
    lines += [
        "",
        "Plans the library ran (peer 0, during the epochs): "
        + ", ".join(
            f"{b}: {', '.join(f'{k} x{v}' for k, v in p.items()) or '-'}" for b, p in plans.items()
        )
        + ".",
    ]
    lines += ["", "![time per epoch and dollars per run](evaluation.png)"]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels: an epoch's time and the part in the reduction; a run's dollars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_name(r) for r in rows]
    palette = {"lambdaml": "#c44e52", "lambdaml-fast": "#e8a0a2", "fmi": "#4c72b0"}
    colours = [palette.get(r["pattern"], "#888888") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    y = list(range(len(rows)))
    epoch = [r["epoch_s"] * 1e3 for r in rows]
    reduce = [r["comm_s"] * 1e3 for r in rows]
    left.barh(y, epoch, height=0.8, color="#cccccc", label="epoch")
    left.barh(y, reduce, height=0.45, color=colours, label="in the reduction")
    left.set_xlim(min(reduce + epoch) / 2, max(epoch) * 1.5)
    left.set_xscale("log")
    left.set_xlabel("ms per epoch: whole (grey), in the reduction (median; log scale)")
    left.set_yticks(y, names)
    left.invert_yaxis()
    right.barh(y, [max(r["comm_usd"], 1e-12) for r in rows], color=colours)
    right.set_xscale("log")
    right.set_xlabel("communication dollars per run (list prices; log scale)")
    for ax in (left, right):
        ax.grid(axis="x", which="major", alpha=0.3)
    fig.suptitle("k-means: LambdaML's storage-only reduction (red; pale: 1 ms poll) and fmi (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], setting: str) -> None:
    """Replace the results block of docs/evaluation.md and redraw docs/evaluation.png."""
    doc = DOCS / "evaluation.md"
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no results block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{tables(rows, ratios, setting)}\n{END}{tail}")
    plot(rows, DOCS / "evaluation.png")
    print(f"\n  wrote {doc} and {DOCS / 'evaluation.png'}")
