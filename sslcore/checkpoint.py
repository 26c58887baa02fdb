"""Atomic checkpoints that resume exactly.

Layout of `output_dir/checkpoints/step-000120/`:
  model.safetensors        weights (safetensors; shared/tied tensors handled)
  optimizer.pt, scheduler.pt, scaler.pt   state dicts, read back with weights_only=True
  objective.pt             the objective's own state (momentum encoder, queue, best weights...)
  rng-<rank>.pt            torch/numpy/python RNG states of every process (dropout streams)
  data-<rank>.json         a streamed shard's position, per process (streaming only)
  trainer_state.json       step, data position (epoch, batches consumed), fingerprint, history
and `output_dir/checkpoints/latest`, the name of the newest complete checkpoint.

A checkpoint is written into a hidden temp folder and renamed into place only when complete
(files and folder fsynced), so a run killed mid-write leaves the previous checkpoint intact and
never a half one. "Latest" is the last one written, not the highest step number: a fresh run in an
old output_dir removes the old run's checkpoints at its first save instead of resuming them later.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from sslcore.errors import UserError

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed here, with the reason and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint written last (the `latest` pointer), else the highest step; None if none."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`latest` -> the newest checkpoint of output_dir (an error if there is none); `auto` -> the same,
    or None when there is none; a path -> that path."""
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        found = latest_checkpoint(output_dir)
        if found is None and resume == "latest":
            raise CheckpointError(
                f"--resume: {checkpoint_root(output_dir)} holds no checkpoint to resume; check train.output_dir, "
                "drop --resume to start a new run, or pass --resume auto to resume only when one exists")
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint (no trainer_state.json); pass a folder like "
            f"{checkpoint_root(output_dir)}/step-000100 or --resume latest"
        )
    return path


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray; store it as a tensor so weights_only loading accepts it
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointRotation:
    """Which checkpoints belong to this run, oldest first, and which to delete after each save.

    A fresh run's `stale` list holds an earlier run's checkpoints; a run resumed from step k owns
    the checkpoints up to k, and any later ones (an abandoned continuation) are stale. Stale ones
    are removed at the first save, so "latest" can never point back into another run.
    """

    def __init__(self, output_dir: str | Path, keep: int, resumed_from: Path | None = None):
        self.keep = keep
        found = list_checkpoints(output_dir)
        if resumed_from is None:
            self.owned, self.stale = [], found
        else:
            limit = read_trainer_state(resumed_from)["step"] if (resumed_from / "trainer_state.json").is_file() else -1
            self.owned = [p for p in found if _step_of(p) <= limit]
            self.stale = [p for p in found if _step_of(p) > limit]

    def after_save(self, path: Path) -> list[Path]:
        self.owned = [p for p in self.owned if p != path] + [path]
        doomed = [p for p in self.stale if p != path] + (self.owned[:-self.keep] if self.keep > 0 else [])
        self.owned = self.owned[-self.keep:] if self.keep > 0 else self.owned
        self.stale = []
        return doomed


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict[str, Any], output_dir: str | Path,
                    rotation: CheckpointRotation, process_state: dict[str, Any] | None = None,
                    objective_state: dict[str, Any] | None = None, on_each_node: bool = False) -> Path:
    """Write checkpoint `step-<state['step']>` atomically on all processes; return its path.

    `process_state`: this process's own data position (streamed shards differ per process).
    `on_each_node`: the local main process of every machine writes (no shared file system);
    otherwise only the global main process writes the shared files.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    writer = accelerator.is_local_main_process if on_each_node else accelerator.is_main_process
    # Every machine needs the temp folder for its processes' RNG files (a node without a shared file
    # system would otherwise have none); creating it is idempotent.
    if accelerator.is_local_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # Every process saves its own RNG streams; the weights and optimizer are replicated (DDP).
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if process_state is not None:
        (tmp / f"data-{accelerator.process_index}.json").write_text(json.dumps(process_state))
    if writer:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if objective_state:
            torch.save(objective_state, tmp / "objective.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if writer:
        for path in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / "latest", final.name)
        _fsync_dir(root)
        for old in rotation.after_save(final):
            shutil.rmtree(old, ignore_errors=True)
    else:
        rotation.after_save(final)
    accelerator.wait_for_everyone()
    return final


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(describe_mismatch(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint has {a!r}, this run has {b!r}")
    return diffs


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, fingerprint: dict[str, Any],
                    objective=None) -> dict:
    """Restore everything saved by `save_checkpoint`; refuse one made for another config."""
    state = read_trainer_state(path)
    diffs = describe_mismatch(state.get("fingerprint", {}), json.loads(json.dumps(fingerprint)))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written for a different config:\n  " + "\n  ".join(diffs)
            + "\nResume with the config it was trained with, or start a new output_dir."
        )
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {state['num_processes']} processes, this run has "
            f"{accelerator.num_processes}; the data position is per process, so resume with the same count"
        )
    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    if objective is not None and (path / "objective.pt").is_file():
        objective.load_state_dict(torch.load(path / "objective.pt", map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))
    data_state = path / f"data-{accelerator.process_index}.json"
    state["process_state"] = json.loads(data_state.read_text()) if data_state.is_file() else None
    return state
