"""Did pretraining pay off? The statistics, report and plot of pretrained-vs-scratch comparisons.

Modality-agnostic: an *arm* is any result with `seeds`, `main_metric` and `test` (metric -> one score
per seed), and optionally `seconds`, `steps` and `to_dict()` -- `textssl.finetune.FinetuneResult`,
and the speech and vision probes alike. A modality runs the two arms (same model config, same
budget, same seeds; one from the checkpoint, one from fresh weights) and hands them here:

    from sslcore.compare import Comparison, write_report
    rows = [Comparison("movie-sentiment", "probe", pretrained_result, scratch_result)]
    print(write_report(rows, "runs/x/RESULTS.md", command="...", checkpoint_note="..."))

An arm may also carry `selection` (an `sslcore.finetune.Selection`: the grid it tried on validation and
what it kept), `label_budget` (labelled training examples per seed; None = all) and `train_examples`: the
report then states each arm's grid and choice, a labels column, and -- where a task and protocol were
run at several budgets -- draws the label-budget curves (`plot_label_curves`, `<name>_labels.png`).

What a row claims: delta = mean(pretrained) - mean(scratch) (for an error rate, an arm whose result says
`lower_is_better`, a negative delta is the improvement); sigma = sqrt(std_p^2 + std_s^2), the
spread of a difference of two single-seed runs; and Welch's t-test (unequal variances) on the
per-seed scores, its two-sided p-value beside them. "helps" (or "hurts") needs all of: at least
`MIN_SEEDS` seeds in each arm, some spread over seeds (with none, the seeds vary nothing and there
is no noise estimate to judge against), |delta| > 2 sigma, and p < `ALPHA`. Anything else is "no
clear difference" or, where no test is possible, "no claim" with the reason.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

MIN_SEEDS = 2
"""Fewer seeds than this in either arm: no spread to judge a difference against, so no claim."""
ALPHA = 0.05
"""Welch p-value below which a difference (also beyond 2 sigma) is claimed."""


class ArmResult(Protocol):
    """What one arm (pretrained or scratch) of a comparison must provide."""

    seeds: list[int]
    main_metric: str
    test: dict[str, list[float]]


def arm_scores(result: ArmResult, metric: str | None = None) -> list[float]:
    return list(result.test[metric or result.main_metric])


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class WelchTest:
    """Welch's unequal-variance t-test of mean(a) - mean(b)."""

    t: float
    df: float
    """Welch-Satterthwaite degrees of freedom."""
    p_value: float
    """Two-sided."""


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchTest | None:
    """Welch's t-test on two samples; None when it is undefined (fewer than 2 values in a sample, or no
    spread in either: the t statistic would divide by zero)."""
    if len(a) < 2 or len(b) < 2:
        return None
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if var_a + var_b == 0:
        return None
    from scipy import stats  # scikit-learn's dependency; imported here so sslcore loads without it

    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / ((var_a ** 2 / (len(a) - 1) if var_a else 0.0) + (var_b ** 2 / (len(b) - 1) if var_b else 0.0))
    return WelchTest(t=t, df=df, p_value=float(2 * stats.t.sf(abs(t), df)))


@dataclass
class Comparison:
    """One task and protocol: the pretrained arm against the scratch arm, over seeds."""

    task: str
    protocol: str
    pretrained: Any
    """An `ArmResult` (e.g. textssl.finetune.FinetuneResult)."""
    scratch: Any

    @property
    def metric(self) -> str:
        return self.pretrained.main_metric

    @property
    def lower_is_better(self) -> bool:
        """The metric is an error rate (CER, WER): pretraining helps when it lowers it."""
        return bool(getattr(self.pretrained, "lower_is_better", False))

    @property
    def pretrained_scores(self) -> list[float]:
        return arm_scores(self.pretrained, self.metric)

    @property
    def scratch_scores(self) -> list[float]:
        return arm_scores(self.scratch, self.metric)

    @property
    def delta(self) -> float:
        return statistics.fmean(self.pretrained_scores) - statistics.fmean(self.scratch_scores)

    @property
    def sigma(self) -> float:
        return math.hypot(sample_std(self.pretrained_scores), sample_std(self.scratch_scores))

    @property
    def ratio(self) -> float | None:
        """delta / sigma; None when sigma is 0 (no spread, or a single seed)."""
        return self.delta / self.sigma if self.sigma > 0 else None

    @property
    def welch(self) -> WelchTest | None:
        return welch_t_test(self.pretrained_scores, self.scratch_scores)

    @property
    def p_value(self) -> float | None:
        test = self.welch
        return None if test is None else test.p_value

    @property
    def verdict(self) -> str:
        """`helps`, `hurts`, `no clear difference`, or `no claim: <why>`."""
        seeds = min(len(self.pretrained_scores), len(self.scratch_scores))
        if seeds < MIN_SEEDS:
            return f"no claim: {seeds} seed(s) in an arm, need >= {MIN_SEEDS}"
        if self.sigma == 0:
            return "no claim: no spread over seeds (the seeds vary nothing)"
        p = self.p_value
        if p is not None and p < ALPHA and abs(self.delta) > 2 * self.sigma:
            return "helps" if (self.delta > 0) != self.lower_is_better else "hurts"
        return "no clear difference"

    @property
    def helps(self) -> bool:
        return self.verdict == "helps"

    @property
    def label_budget(self) -> int | None:
        """Labelled training examples per seed (None = the whole training split)."""
        return getattr(self.pretrained, "label_budget", None)

    @property
    def labels_used(self) -> float | None:
        """How many labelled examples each seed learned from (mean over the pretrained arm's seeds): the budget,
        or for the whole split what the arm reports (`train_examples`); None when it says nothing."""
        if self.label_budget is not None:
            return float(self.label_budget)
        used = getattr(self.pretrained, "train_examples", None)
        return statistics.fmean(used) if used else None

    @property
    def labels_text(self) -> str:
        if self.label_budget is not None:
            return str(self.label_budget)
        return "all" + (f" ({self.labels_used:.0f})" if self.labels_used is not None else "")

    def selections(self) -> dict[str, Any]:
        """{"pretrained": Selection, "scratch": Selection} for the arms that report one."""
        return {name: arm.selection for name, arm in (("pretrained", self.pretrained), ("scratch", self.scratch))
                if getattr(arm, "selection", None) is not None}

    def to_dict(self) -> dict[str, Any]:
        test = self.welch
        return {"task": self.task, "protocol": self.protocol, "metric": self.metric, "delta": self.delta,
                "lower_is_better": self.lower_is_better, "sigma": self.sigma, "delta_over_sigma": self.ratio,
                "welch_t": None if test is None else test.t, "welch_df": None if test is None else test.df,
                "p_value": None if test is None else test.p_value, "verdict": self.verdict, "helps": self.helps,
                "label_budget": self.label_budget, "labels_used": self.labels_used,
                "pretrained": _arm_dict(self.pretrained), "scratch": _arm_dict(self.scratch)}


def _arm_dict(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else {"seeds": list(result.seeds), "test": result.test}


def _mean_std(scores: Sequence[float]) -> str:
    return f"{statistics.fmean(scores):.4f} ± {sample_std(scores):.4f}"


def _ratio_text(row: Comparison) -> str:
    if row.ratio is None:
        return "n/a (no spread)" if min(len(row.pretrained_scores), len(row.scratch_scores)) >= MIN_SEEDS else "n/a"
    return f"{row.ratio:+.1f}"


def _p_text(row: Comparison) -> str:
    p = row.p_value
    return "n/a" if p is None else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _searched(row: Comparison) -> bool:
    return any(selection.searched for selection in row.selections().values())


def _selected_text(row: Comparison) -> str:
    chosen = row.selections()
    return " / ".join(chosen[name].short() if name in chosen else "-" for name in ("pretrained", "scratch"))


def selection_notes(rows: Sequence[Comparison], protocol_names: Mapping[str, str] | None = None) -> list[str]:
    """One markdown line per row whose arms searched a grid: the grid, and what each arm kept on validation."""
    names = protocol_names or {}
    lines = []
    for row in rows:
        chosen = row.selections()
        if not any(selection.searched for selection in chosen.values()):
            continue
        budget = "" if row.label_budget is None else f", {row.label_budget} labels"
        arms = "; ".join(f"{name}: {selection.describe()}" for name, selection in chosen.items())
        lines.append(f"- {row.task}, {names.get(row.protocol, row.protocol)}{budget} -- {arms}")
    return lines


def comparison_table(rows: Sequence[Comparison], *, command: str, checkpoint_note: str, budget_note: str = "",
                     protocol_names: Mapping[str, str] | None = None, plot_name: str = "downstream.png",
                     title: str = "Downstream: pretrained vs scratch", curves_name: str | None = None) -> str:
    """The markdown report: how it was made, the summary table, each arm's model selection, then every seed's
    score.

    `checkpoint_note`: one sentence on the pretrained checkpoint (what, on which data, for how long);
    `budget_note`: a short budget for the table's last column (omitted when empty); `curves_name`: the
    label-budget curves' image, linked when given. A labels column appears when any row has a label budget,
    and a "selected" column when any arm chose among several settings."""
    names = protocol_names or {}
    seconds = sum(getattr(row.pretrained, "seconds", 0.0) + getattr(row.scratch, "seconds", 0.0) for row in rows)
    with_labels = any(row.label_budget is not None for row in rows)
    with_selection = any(_searched(row) for row in rows)
    labels_head = " labels |" if with_labels else ""
    selected_head = " selected on validation (pretrained / scratch) |" if with_selection else ""
    budget_head = " pretraining budget |" if budget_note else ""
    lines = [
        f"# {title}",
        "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
        f"fine-tuning and probing took {seconds / 60:.1f} min (every run, as measured when it ran).",
        "",
        f"{checkpoint_note} Scratch = the same model config with fresh weights and the same preprocessing; both arms "
        "get the same fine-tuning budget and seeds. Scores are on each task's fixed test split: mean ± sample std "
        "over seeds. sigma = sqrt(std_pretrained^2 + std_scratch^2); p = Welch's t-test on the per-seed scores "
        f"(two-sided). A verdict of helps/hurts needs >= {MIN_SEEDS} seeds per arm, some spread over seeds, "
        f"|delta| > 2 sigma and p < {ALPHA}."
        + (" Each arm chose its own setting on the validation split (mean over its seeds) and only that setting "
           "was scored on test." if with_selection else "")
        + (" labels = labelled training examples per seed: a stratified subset of the training split, fixed per "
           "seed and nested across budgets (validation and test stay whole)." if with_labels else ""),
        "",
        f"| task | protocol |{labels_head} metric | pretrained | scratch | delta | delta / sigma | Welch p | seeds | "
        f"verdict |{selected_head}{budget_head}",
        "|---|---|" + ("---|" if with_labels else "") + "---|---|---|---|---|---|---|---|"
        + ("---|" if with_selection else "") + ("---|" if budget_note else ""),
    ]
    for row in rows:
        verdict = f"**{row.verdict}**" if row.verdict in ("helps", "hurts") else row.verdict
        lines.append(
            f"| {row.task} | {names.get(row.protocol, row.protocol)} |" + (f" {row.labels_text} |" if with_labels else "")
            + f" {row.metric}{' (lower is better)' if row.lower_is_better else ''} | "
            f"{_mean_std(row.pretrained_scores)} | {_mean_std(row.scratch_scores)} | {row.delta:+.4f} | "
            f"{_ratio_text(row)} | {_p_text(row)} | {len(row.pretrained_scores)} / {len(row.scratch_scores)} | "
            f"{verdict} |" + (f" {_selected_text(row)} |" if with_selection else "")
            + (f" {budget_note} |" if budget_note else ""))
    notes = selection_notes(rows, names)
    if notes:
        lines += ["", "Model selection (each arm on its own, on the validation split; [kept]):", "", *notes]
    lines += ["", "Per seed (test, main metric; runs that train list the optimizer steps each took):", ""]
    for row in rows:
        for name, result in (("pretrained", row.pretrained), ("scratch", row.scratch)):
            steps = getattr(result, "steps", None)
            shown_steps = f", steps {steps}" if steps and any(steps) else ""
            budget = "" if row.label_budget is None else f", {row.label_budget} labels"
            lines.append(f"- {row.task}, {row.protocol}{budget}, {name}: seeds {list(result.seeds)}: "
                         f"{[round(v, 4) for v in arm_scores(result, row.metric)]}{shown_steps}; "
                         f"{getattr(result, 'seconds', 0.0):.0f} s")
    lines += ["", f"![pretrained vs scratch]({plot_name})", ""]
    if curves_name:
        lines += [f"![label-budget curves: test score vs labelled examples, mean ± std over seeds]({curves_name})", ""]
    return "\n".join(lines)


def plot_comparison(rows: Sequence[Comparison], path: str | Path, title: str,
                    protocol_names: Mapping[str, str] | None = None) -> None:
    """Every seed's test score (dots) and the mean ± std (bar), pretrained beside scratch, per task x protocol.
    The y axis spans the scores, not [0, 1]: the gaps that matter are a few points wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = protocol_names or {}
    fig, ax = plt.subplots(figsize=(min(max(5.0, 2.4 * len(rows)), 30.0), 4.4))  # label-budget runs have many rows
    values: list[float] = []
    for position, row in enumerate(rows):
        for offset, name, color in ((-0.18, "pretrained", "#1f77b4"), (0.18, "scratch", "#7f7f7f")):
            scores = row.pretrained_scores if name == "pretrained" else row.scratch_scores
            values += scores
            ax.scatter([position + offset] * len(scores), scores, color=color, alpha=0.5, s=18, zorder=3)
            ax.errorbar(position + offset, statistics.fmean(scores), yerr=sample_std(scores), fmt="_", markersize=22,
                        capsize=5, color=color, label=name if position == 0 else None, zorder=4)
    ax.set_xticks(range(len(rows)), [f"{row.task}\n{names.get(row.protocol, row.protocol)}"
                                     + ("" if row.label_budget is None else f", {row.label_budget} labels")
                                     + f"\n({row.metric}, delta {row.delta:+.3f}, p {_p_text(row)})" for row in rows],
                  fontsize=8 if len(rows) <= 12 else 6)
    spread = max(values) - min(values) if values else 1.0
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    ax.set_ylim(low - 0.15 * spread - 0.01, high + 0.15 * spread + 0.01)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("test score (dots: seeds; bar: mean ± std)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_curve_groups(rows: Sequence[Comparison]) -> dict[tuple[str, str], list[Comparison]]:
    """(task, protocol) -> its rows in order of labels used, for every pair run at two or more label budgets."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for row in rows:
        if row.labels_used is not None:
            groups.setdefault((row.task, row.protocol), []).append(row)
    return {key: sorted(members, key=lambda r: r.labels_used) for key, members in groups.items()
            if len({r.labels_used for r in members}) > 1}


def plot_label_curves(rows: Sequence[Comparison], path: str | Path, title: str = "",
                      protocol_names: Mapping[str, str] | None = None) -> bool:
    """Label-budget curves: test score against labelled training examples (log scale), pretrained beside
    scratch, mean over seeds with a ± std band, one panel per task x protocol run at several budgets. Any
    modality's rows work (they need `label_budget` or `train_examples` on their arms). False when no pair
    was run at two budgets (nothing drawn)."""
    groups = label_curve_groups(rows)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = protocol_names or {}
    columns = min(3, len(groups))
    lines = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.4 * columns, 3.6 * lines), squeeze=False)
    for ax, ((task, protocol), members) in zip(axes.flat, groups.items()):
        x = [row.labels_used for row in members]
        for name, color in (("pretrained", "#1f77b4"), ("scratch", "#7f7f7f")):
            scores = [row.pretrained_scores if name == "pretrained" else row.scratch_scores for row in members]
            means = [statistics.fmean(s) for s in scores]
            stds = [sample_std(s) for s in scores]
            ax.plot(x, means, "o-", color=color, label=name)
            ax.fill_between(x, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                            color=color, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks(x, [row.labels_text.replace(" (", "\n(") for row in members], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("labelled training examples per seed")
        ax.set_ylabel(f"test {members[0].metric}" + (" (lower is better)" if members[0].lower_is_better else ""))
        ax.set_title(f"{task}, {names.get(protocol, protocol)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(rows: Sequence[Comparison], results_path: str | Path, *, command: str, checkpoint_note: str,
                 budget_note: str = "", plot_title: str = "pretrained vs random init",
                 protocol_names: Mapping[str, str] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write the markdown table at `results_path`, the seed plot beside it (same name, .png), the label-budget
    curves where a task was run at several budgets (`<name>_labels.png`) and a JSON of every score and
    statistic (same name, .json; `extra` goes into it too). Returns the markdown."""
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    plot_path = results_path.with_suffix(".png")
    curves_path = results_path.with_name(results_path.stem + "_labels.png")
    drew_curves = plot_label_curves(rows, curves_path, plot_title, protocol_names)
    text = comparison_table(rows, command=command, checkpoint_note=checkpoint_note, budget_note=budget_note,
                            protocol_names=protocol_names, plot_name=plot_path.name,
                            curves_name=curves_path.name if drew_curves else None)
    results_path.write_text(text)
    plot_comparison(rows, plot_path, plot_title, protocol_names)
    results_path.with_suffix(".json").write_text(json.dumps(
        {**(extra or {}), "rows": [row.to_dict() for row in rows]}, indent=1, default=str))
    return text


__all__ = ["ALPHA", "MIN_SEEDS", "ArmResult", "Comparison", "WelchTest", "arm_scores", "comparison_table",
           "label_curve_groups", "plot_comparison", "plot_label_curves", "sample_std", "selection_notes",
           "welch_t_test", "write_report"]
