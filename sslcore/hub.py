"""Model cards and Hub upload — a thin layer on huggingface_hub.

What is uploaded is the exported folder as it is: stock transformers / gensim load it with no
code of ours. The token is passed to huggingface_hub only; it never reaches a log or a card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

_SECRET_KEYS = ("token", "password", "secret", "api_key")


def redact(config: Any) -> Any:
    """Copy of a nested config with secrets blanked, for cards, logs and trackers."""
    if isinstance(config, dict):
        return {k: ("***" if any(s in k.lower() for s in _SECRET_KEYS) and v else redact(v))
                for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def write_model_card(
    out_dir: str | Path,
    *,
    model_name: str,
    summary: str,
    config: dict[str, Any],
    training_data: str,
    metrics: dict[str, float] | None = None,
    library_name: str = "transformers",
    pipeline_tag: str | None = None,
    tags: list[str] | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    usage: str = "",
) -> Path:
    """Write README.md with metadata (and model-index results when `eval_results` is given).

    `eval_results` items: {task_type, task_name, dataset_type, dataset_name, metric_type, metric_value}
    (the fields of huggingface_hub's `EvalResult`).
    """
    card_data = ModelCardData(
        model_name=model_name,
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=["selfsup", "self-supervised", *(tags or [])],
        eval_results=[EvalResult(**r) for r in eval_results] if eval_results else None,
    )
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in (metrics or {}).items()
                             if isinstance(v, int | float))
    results_lines = "\n".join(
        f"| {r['task_name']} | {r['dataset_name']} | {r['metric_type']} | {r['metric_value']:.4g} |"
        for r in eval_results or [])
    body = f"""
# {model_name}

{summary}

Pretrained with [selfsup](https://github.com/selfsup/selfsup).

## Training data

{training_data}

## Training results

| metric | value |
|---|---|
{metric_lines}
"""
    if results_lines:
        body += f"""
## Downstream results

| task | dataset | metric | value |
|---|---|---|---|
{results_lines}
"""
    if usage:
        body += f"\n## Usage\n\n```python\n{usage.strip()}\n```\n"
    body += f"\n## Configuration\n\n```json\n{json.dumps(redact(config), indent=1)}\n```\n"
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload model pretrained with selfsup") -> str:
    """Create (if needed) the model repo `repo_id` and upload `folder` to it; return the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md model card; upload an exported folder "
                                "(output_dir/model), not a checkpoint")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message)
    logger.info("uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return str(getattr(commit, "commit_url", commit))
