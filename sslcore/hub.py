"""Model cards and Hub upload — a thin layer on huggingface_hub.

What is uploaded is the exported folder as it is: stock transformers / gensim load it with no
code of ours. The token is passed to huggingface_hub only; it never reaches a log or a card.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from sslcore.errors import MissingPathError, UserError

logger = logging.getLogger(__name__)

REDACTED = "***"
_SECRET_WORDS = {"password", "passwd", "passphrase", "secret", "apikey", "credential", "credentials"}
"""A key whose last word is one of these holds a secret (`password`, `client_secret`, `wandb_apikey`)."""
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "key")}
"""... or whose last two words are (`api_key`, `aws_secret_key`)."""
_TOKEN_QUALIFIERS = {"hf", "hub", "huggingface", "access", "auth", "api", "bearer", "secret", "refresh", "session",
                     "wandb", "github", "gh", "id", "user", "write", "read", "private", "oauth", "comet", "neptune"}
"""A key `token`, or `<one of these>_token` (`hf_token`, `access_token`), holds a token. Other `*_token(s)` keys
are settings: `pad_token`, `mask_token`, `max_new_tokens`, `tokens_per_batch`, and `tokenizer` is no token."""
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{30,}|api_org_[A-Za-z0-9]{30,})\b")
"""Hugging Face user and org tokens, redacted wherever they appear, whatever the key."""


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (a token, password or API key), not a setting."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()) if w]
    if not words:
        return False
    if words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS:
        return True
    return words[-1] == "token" and (len(words) == 1 or words[-2] in _TOKEN_QUALIFIERS)


def redact(config: Any) -> Any:
    """Copy of a nested config with secrets blanked, for cards, logs, trackers and config.json: the values
    of secret keys (`token`, `hub.token`, `hf_token`, `api_key`, `password`, ...; see `is_secret_key`) and
    any string holding a Hugging Face token. Settings that merely mention tokens (`tokenizer`,
    `max_new_tokens`, `pad_token`) are kept."""
    if isinstance(config, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return type(config)(redact(v) for v in config)
    if isinstance(config, str):
        return _TOKEN_VALUE.sub(REDACTED, config)
    return config


class HubError(UserError):
    """An upload that cannot work as asked (repo id, login, network), said before any training."""


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_repo_id(repo_id: str) -> None:
    """`user/name` (or `org/name`), as `create_repo` needs it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise HubError(f"hub.repo_id={repo_id!r}: give `user/name` (your Hub user or organisation, a slash, the "
                       "model's name), e.g. --push_to_hub you/bert-tiny")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"hub.repo_id={repo_id!r} is not a valid Hub repo id: {error}") from None
    if not _REPO_ID.match(repo_id) or repo_id.endswith(".git"):
        raise HubError(f"hub.repo_id={repo_id!r}: use letters, digits, '-', '_' and '.' in `user/name`")


def check_push_access(repo_id: str, token: str | None = None, ask_hub: bool = True) -> str:
    """Fail now, not after training, when an upload to `repo_id` cannot work: a malformed repo id, offline
    mode (HF_HUB_OFFLINE=1), no token, and with `ask_hub` an unreachable Hub, a rejected or read-only token,
    a namespace the token's user does not belong to. Returns the user name the token belongs to ("" when
    the Hub was not asked)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"--push_to_hub {repo_id}: the Hub is switched off here (HF_HUB_OFFLINE=1); unset it, or "
                       "train without --push_to_hub and upload later with `sslcore.hub.push_to_hub(output_dir/model, "
                       f"{repo_id!r})` from a machine that reaches the Hub")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"--push_to_hub {repo_id}: no Hugging Face token; run `hf auth login` (or set HF_TOKEN) "
                       "with a token that can write")
    if not ask_hub:
        return ""
    try:
        me = HfApi(token=token).whoami()
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise HubError(f"--push_to_hub {repo_id}: the Hub rejected the token (401 unauthorized); run "
                           "`hf auth login --force` with a valid write token, or fix HF_TOKEN") from None
        raise HubError(f"--push_to_hub {repo_id}: the Hub at {constants.ENDPOINT} answered {status}: "
                       f"{' '.join(str(error).split())[:200]}") from None
    except Exception as error:  # connection refused, DNS, timeout: whatever the HTTP client raises
        raise HubError(f"--push_to_hub {repo_id}: cannot reach the Hub at {constants.ENDPOINT} "
                       f"({type(error).__name__}: {' '.join(str(error).split())[:200]}); check the network or "
                       "train without --push_to_hub and upload later with sslcore.hub.push_to_hub") from None
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(f"--push_to_hub {repo_id}: the token is read-only; create a write token at "
                       "https://huggingface.co/settings/tokens and `hf auth login --force` with it")
    user = me.get("name", "")
    namespaces = {user, *(org.get("name") for org in me.get("orgs") or [])}
    namespace = repo_id.split("/")[0]
    if user and namespace not in namespaces:
        raise HubError(f"--push_to_hub {repo_id}: the token belongs to {user!r}, who cannot create repos under "
                       f"{namespace!r} (yours: {', '.join(sorted(n for n in namespaces if n))}); use {user}/"
                       f"{repo_id.split('/')[1]}")
    return user


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
    if not folder.is_dir():
        raise MissingPathError(f"no such folder: {folder}; upload an exported model folder (a run's "
                               "output_dir/model)")
    if not (folder / "README.md").is_file():
        raise MissingPathError(f"{folder} has no README.md model card; upload an exported folder "
                               "(output_dir/model), not a checkpoint")
    check_repo_id(repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message)
    logger.info("uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return str(getattr(commit, "commit_url", commit))
