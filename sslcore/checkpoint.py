"""Atomic checkpoints that resume exactly.

Layout of `output_dir/checkpoints/step-000120/`:
  model.safetensors        weights (safetensors; shared/tied tensors handled)
  optimizer.pt, scheduler.pt, scaler.pt   state dicts, read back with weights_only=True
  rng-<rank>.pt            torch/numpy/python RNG states of every process (dropout streams)
  data-<rank>.json         a streamed shard's position, per process (streaming only)
  trainer_state.json       step, data position (epoch, batches consumed), fingerprint, history

A checkpoint is written into a hidden temp folder and renamed into place only when complete,
so a run killed mid-write leaves the previous checkpoint intact and never a half one.
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

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
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


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`latest` -> newest checkpoint of output_dir (None if there is none); a path -> that path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
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


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict[str, Any], output_dir: str | Path,
                    keep: int, process_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step-<state['step']>` atomically on all processes; return its path.

    `process_state`: this process's own data position (streamed shards differ per process).
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Every process saves its own RNG streams; the weights and optimizer are replicated (DDP).
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if process_state is not None:
        (tmp / f"data-{accelerator.process_index}.json").write_text(json.dumps(process_state))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, fingerprint: dict[str, Any]) -> dict:
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
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))
    data_state = path / f"data-{accelerator.process_index}.json"
    state["process_state"] = json.loads(data_state.read_text()) if data_state.is_file() else None
    return state
