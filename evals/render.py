"""Write a suite report three ways: JSON (machine-readable), Markdown (for a review), PNG (a chart).

Files are written atomically next to each other as ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraplane.common.files import atomic_write_bytes, atomic_write_text
from loraplane.evals.metrics import FIGURES
from loraplane.evals.report import Estimate, SuiteReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    png: Path


def _cell(e: Estimate | None, *, ci: bool = True) -> str:
    if e is None or e.value is None:
        return "n/a"
    text = f"{e.value:.3f}"
    if ci and e.ci_low is not None and e.ci_high is not None:
        text += f" [{e.ci_low:.3f}, {e.ci_high:.3f}]"
    return text


def _delta(e: Estimate, verdict: str) -> str:
    if e.value is None:
        return "n/a"
    text = f"{e.value:+.3f}"
    if e.ci_low is not None and e.ci_high is not None:
        text += f" [{e.ci_low:+.3f}, {e.ci_high:+.3f}]"
    return f"{text} ({verdict})" if verdict != "n/a" else text


def to_markdown(report: SuiteReport) -> str:
    roles = report.roles()
    lines = [f"# Eval report: {report.suite}", ""]
    if not report.complete:
        lines += [f"> **INCOMPLETE**: {report.error}", ""]
    lines += [f"- endpoint: `{report.endpoint}`", f"- run: {report.created_at} → {report.finished_at or '-'}"]
    lines += [f"- {role}: `{report.models[role]}`" for role in roles]
    conf = f"{report.confidence:.0%}"
    for d in report.datasets:
        lines += ["", f"## {d.name} ({d.n} examples, `{d.path}`)", ""]
        present = [r for r in roles if r in d.runs]
        others = [r for r in present if r != "candidate"]
        header = ["metric", *(f"{r} (`{report.models[r]}`)" for r in present)]
        header += [f"Δ vs {r} ({conf} CI)" for r in others if "candidate" in d.runs]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for figure in d.figures:
            info = FIGURES[figure]
            row = [f"{figure} {'↑' if info.higher_is_better else '↓'}"]
            row += [_cell(d.runs[r].metrics.get(figure), ci=info.kind != "latency") for r in present]
            for r in others:
                comp = next((c for c in d.comparisons if c.metric == figure and c.baseline == r), None)
                row.append(_delta(comp.delta, comp.verdict) if comp else "n/a")
            lines.append("| " + " | ".join(row) + " |")
        failures = [(r, x) for r in present for x in d.runs[r].examples if x.error or x.perplexity_error]
        lines += [
            "",
            "failed requests: " + ", ".join(f"{r} {d.runs[r].failures}/{d.runs[r].n}" for r in present),
        ]
        for role, x in failures[:5]:
            lines.append(f"- {role}, line {x.line}: {x.error or x.perplexity_error}")
    if report.gate is not None:
        verdict = "PASS" if report.gate.passed else "FAIL"
        lines += ["", f"## Promotion gate: {verdict}", "", "| rule | result | detail |", "|---|---|---|"]
        for c in report.gate.checks:
            result = {True: "pass", False: "**FAIL**", None: "skipped"}[c.passed]
            lines.append(f"| {c.rule} | {result} | {c.message} |")
    return "\n".join(lines) + "\n"


def chart(report: SuiteReport) -> Figure:
    """One row per dataset; panels for scores (with CI error bars), perplexity, latency, throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = report.roles()
    groups = [
        ("score", "scores, higher is better"),
        ("perplexity", "perplexity, lower is better (log)"),
        ("latency", "latency in s, lower is better"),
        ("throughput", "output tokens/s per request"),
    ]

    def panel(figure: str) -> str:
        if figure == "output_tokens_per_s":
            return "throughput"
        return FIGURES[figure].kind

    rows = report.datasets or []
    fig, axes = plt.subplots(
        max(len(rows), 1), len(groups), figsize=(5 * len(groups), 3.6 * max(len(rows), 1)), squeeze=False
    )
    width = 0.8 / max(len(roles), 1)
    for i, d in enumerate(rows):
        for j, (kind, title) in enumerate(groups):
            ax = axes[i][j]
            figures = [f for f in d.figures if panel(f) == kind and f != "nll"]
            ax.set_title(f"{d.name}: {title}", fontsize=10)
            if not figures:
                ax.axis("off")
                continue
            for k, role in enumerate(roles):
                run = d.runs.get(role)
                if run is None:
                    continue
                xs = [x + k * width for x in range(len(figures))]
                ests = [run.metrics.get(f) for f in figures]
                vals = [e.value if e and e.value is not None else 0.0 for e in ests]
                err_lo = [
                    v - e.ci_low if e and e.ci_low is not None else 0.0
                    for v, e in zip(vals, ests, strict=True)
                ]
                err_hi = [
                    e.ci_high - v if e and e.ci_high is not None else 0.0
                    for v, e in zip(vals, ests, strict=True)
                ]
                bars = ax.bar(
                    xs, vals, width, yerr=[err_lo, err_hi], capsize=3, label=f"{role}: {report.models[role]}"
                )
                ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
            if kind == "perplexity" and any(b.get_height() > 0 for b in ax.patches):
                ax.set_yscale("log")
            ax.set_xticks([x + width * (len(roles) - 1) / 2 for x in range(len(figures))])
            ax.set_xticklabels(figures, rotation=20, fontsize=8)
            ax.legend(fontsize=7)
    status = "" if report.complete else " (INCOMPLETE)"
    fig.suptitle(f"{report.suite}{status}: {report.endpoint}", fontsize=11)
    fig.tight_layout()
    return fig


def to_png(report: SuiteReport) -> bytes:
    import matplotlib.pyplot as plt

    fig = chart(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: SuiteReport, directory: Path, stem: str) -> ReportFiles:
    files = ReportFiles(directory / f"{stem}.json", directory / f"{stem}.md", directory / f"{stem}.png")
    atomic_write_text(files.json, report.model_dump_json(indent=2) + "\n")
    atomic_write_text(files.markdown, to_markdown(report))
    atomic_write_bytes(files.png, to_png(report))
    return files
