"""Entry points shared by every recipe and notebook: `pretrain(...)` and `main(argv)`.

    accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml \
        --train.max_steps 200 [--resume [PATH]] [--push_to_hub user/name] [--debug]

    from sslcore.api import pretrain
    result = pretrain("recipes/configs/bert_mlm_tiny.yaml", {"train": {"max_steps": 200}})
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sslcore import config as cfg
from sslcore.errors import DEBUG_HELP, run_cli
from sslcore.hub import check_push_access, push_to_hub
from sslcore.registry import get_objective, list_objectives
from sslcore.run_config import RunConfig
from sslcore.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)

USAGE = f"""usage: recipes/pretrain.py --config FILE [--resume [latest|auto|PATH]] [--push_to_hub REPO_ID]
                           [--section.key VALUE ...] [--debug] [--help]

{DEBUG_HELP}."""


def build_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Defaults of the objective named in the YAML/overrides, then the YAML, then the overrides."""
    values = cfg.read_yaml(path) if path else {}
    if overrides:
        values = cfg.merge(values, cfg.parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    name = values.get("objective")
    if not name:
        raise cfg.ConfigError(f"the config names no objective; add `objective: <name>` (one of {list_objectives()})")
    return cfg.build(get_objective(name).config_class, values)


def pretrain(config: RunConfig | str | Path, overrides: list[str] | dict[str, Any] | None = None,
             callbacks=None) -> TrainResult:
    """Train the objective a config names; export; upload when `hub.repo_id` is set."""
    if not isinstance(config, RunConfig):
        config = build_config(config, overrides)
    elif overrides:
        config = cfg.build(type(config), cfg.merge(cfg.to_dict(config), overrides if isinstance(overrides, dict)
                                                   else cfg.parse_overrides(overrides)))
    if config.hub.repo_id:
        # Everything that can be checked before training is: a bad repo id or no Hub must not cost a run.
        # Only the first process asks the Hub (its whoami endpoint is rate-limited); the others check locally.
        user = check_push_access(config.hub.repo_id, config.hub.token, ask_hub=os.environ.get("RANK", "0") == "0")
        if user:
            logger.info("will upload to https://huggingface.co/%s at the end (as %s)", config.hub.repo_id, user)
    objective = get_objective(config.objective)(config)
    trainer = Trainer(objective, callbacks=callbacks)
    result = trainer.fit()
    if config.hub.repo_id and result.export_dir is not None and trainer.accelerator.is_main_process:
        push_to_hub(result.export_dir, config.hub.repo_id, token=config.hub.token, private=config.hub.private)
    return result


def split_cli(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """Pull --config/--resume/--push_to_hub/--help out of argv; the rest are key overrides."""
    path, overrides, show_help, i = None, [], False, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if arg in ("-h", "--help"):
            show_help = True
        elif name == "--config":
            path = value if eq else argv[i + 1] if takes_value else None
            if path is None:
                raise cfg.ConfigError("--config needs a YAML path, e.g. recipes/configs/bert_mlm_tiny.yaml")
            i += 0 if eq else 1
        elif name == "--resume":
            overrides += ["--train.resume", value if eq else argv[i + 1] if takes_value else "latest"]
            i += 1 if (not eq and takes_value) else 0
        elif name == "--push_to_hub":
            if not (eq or takes_value):
                raise cfg.ConfigError("--push_to_hub needs a repo id, e.g. --push_to_hub you/bert-tiny")
            overrides += ["--hub.repo_id", value if eq else argv[i + 1]]
            i += 0 if eq else 1
        else:
            overrides.append(arg)
        i += 1
    return path, overrides, show_help


def describe_run(path: str | None, overrides: list[str], usage: str = USAGE) -> str:
    """`--help`: the usage, then every option with the value this run would use (the objective's defaults,
    then the YAML preset, then the command-line overrides), the default beside it where they differ."""
    values = cfg.read_yaml(path) if path else {}
    if overrides:
        values = cfg.merge(values, cfg.parse_overrides(overrides))
    name = values.get("objective")
    if not name:
        return f"{usage}\n\nobjectives: {', '.join(list_objectives())}; pass --config to list an objective's options"
    config = build_config(path, overrides)
    source = f"{path}" + (" and your overrides" if overrides else "") if path else "your overrides"
    return (f"{usage}\n\noptions of objective {name!r} with the values this run would use (defaults, then "
            f"{source}; `default` shows the objective's own where it differs):\n" + "\n".join(cfg.describe(config)))


def _main(argv: list[str]) -> TrainResult | None:
    path, overrides, show_help = split_cli(argv)
    if show_help:
        print(describe_run(path, overrides))
        return None
    return pretrain(build_config(path, overrides))


def main(argv: list[str] | None = None) -> TrainResult | None:
    """The command line: a mistake in it, the config or a path prints one line and exits with status 2."""
    return run_cli(_main, argv)


def finetune_main(argv: list[str] | None, *, script: str, build_config: Callable[[str | None, list[str]], Any],
                  finetune: Callable[..., Any], catalogue_title: str,
                  catalogue: Callable[[], Mapping[str, str] | Iterable[str]],
                  report: Callable[[Any], None] | None = None) -> Any:
    """The command line of every `recipes/finetune*.py`: parse `--config`/`--help`/overrides, print the options
    with the values the run would use and the modality's catalogue (tasks, image sources) on `--help`, else run
    `finetune(config=...)` and print its summary (then `report(result)`, when given). A mistake prints one line
    and exits with status 2 (`run_cli`)."""

    def _main(args: list[str]):
        path, overrides, show_help = split_cli(args)
        config = build_config(path, overrides)
        if show_help:
            print(f"usage: {script} [--config FILE] [--section.key VALUE ...] [--debug] [--help]\n\n{DEBUG_HELP}.\n\n"
                  "options, with the values this run would use (defaults, then the YAML, then your overrides; "
                  "`default` shown where it differs):")
            print("\n".join(cfg.describe(config)))
            entries = catalogue()
            print(f"\n{catalogue_title}:")
            if isinstance(entries, Mapping):
                print("\n".join(f"  {name}: {line}" for name, line in entries.items()))
            else:
                print("  " + ", ".join(entries))
            return None
        result = finetune(config=config)
        print(result.summary())
        if report is not None:
            report(result)
        return result

    return run_cli(_main, argv)
