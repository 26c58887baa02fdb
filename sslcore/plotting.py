"""Pictures that say more than logs: the loss curve of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _curve(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h]


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Train loss (and eval loss where present) against step, written as a PNG, plus one dashed curve
    per loss term when the loss has several (MLM + NSP, contrastive + diversity). None if no points."""
    train, evals = _curve(history, "loss"), _curve(history, "eval_loss")
    if not train and not evals:
        return None
    terms = sorted({k for h in history for k in h if k.endswith("_loss") and not k.startswith("eval_")})
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    for term in terms:
        ax.plot(*zip(*_curve(history, term)), "--", label=f"train {term.replace('_', ' ')}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
