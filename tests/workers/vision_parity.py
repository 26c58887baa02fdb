"""Run by tests/test_vision.py alone (1 process) and under `accelerate launch --num_processes 2`: pretrain each
named vision method for 3 steps at the given per-process batch, one run after another in the same launch
(one interpreter start for all of them), checkpointing every step.

    python tests/workers/vision_parity.py OUT BATCH CACHE_DIR simclr moco_v2 ...

ViT backbone (LayerNorm) and BN-free heads: torch's SyncBatchNorm needs a GPU, so on CPU processes
BatchNorm would normalise each process's batch on its own and 2 x B could not equal 1 x 2B.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent.parent))

from sslcore.api import build_config, pretrain  # noqa: E402
from sslcore.distributed import release_process_group  # noqa: E402


def options(name: str, out: Path, batch: int, cache_dir: str) -> dict:
    values = {
        "objective": name,
        "data": {"source": "digits", "cache_dir": cache_dir, "max_eval_examples": 32},
        "backbone": {"kind": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "patch_size": 4},
        "head": {"batch_norm": False, "hidden_dim": 32, "out_dim": 16, "predictor_hidden_dim": 16},
        "probe": {"enabled": False},
        "train": {"per_device_batch_size": batch, "max_steps": 3, "log_every": 1, "report_to": [],
                  "progress_bar": False, "output_dir": str(out), "learning_rate": 1e-2, "warmup_steps": 0,
                  "export": False, "save_every": 1, "keep_checkpoints": 3},
    }
    if name == "moco_v2":
        values["loss"] = {"queue_size": 64}  # filled by every process's keys, in rank order
    return values


def main(out: str, batch: str, cache_dir: str, *methods: str) -> None:
    try:
        for name in methods:
            pretrain(build_config(None, options(name, Path(out) / name, int(batch), cache_dir)))
    finally:
        release_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
