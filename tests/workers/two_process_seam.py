"""Run under `torchrun --nproc_per_node 2` by tests/test_distributed.py (also runs alone, as 1 process).

gather: `gather_with_grad` on 2 processes gives each rank the gradient the single-process loss
gives its rows. train: the uneven toy objective of tests/test_trainer.py trained on N processes;
writes the final weights, the eval loss and each rank's first dropout draw to OUT.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))


def contrastive_like(queries: torch.Tensor, keys: torch.Tensor, offset: int) -> torch.Tensor:
    """Local queries against every key, positives on the diagonal block (as NT-Xent is)."""
    logits = queries @ keys.T / 0.5
    positives = torch.arange(len(queries)) + offset
    return torch.nn.functional.cross_entropy(logits, positives, reduction="sum")


def gather_check(out: Path) -> None:
    import torch.distributed as dist

    from sslcore.distributed import gather_with_grad

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    everything = torch.randn(6 * world, 5, generator=torch.Generator().manual_seed(0))
    sizes = [6 - r for r in range(world)]  # uneven row counts per rank
    starts = [sum(sizes[:r]) for r in range(world)]
    rows = everything[: sum(sizes)]
    mine = rows[starts[rank]: starts[rank] + sizes[rank]].clone().requires_grad_(True)
    gathered, offset = gather_with_grad(mine)
    contrastive_like(mine, gathered, offset).backward()
    # Reference: one process, every rank's loss summed, gradient w.r.t. all rows.
    reference = rows.clone().requires_grad_(True)
    total = sum(contrastive_like(reference[s: s + n], reference, s) for s, n in zip(starts, sizes))
    total.backward()
    expected = reference.grad[starts[rank]: starts[rank] + sizes[rank]]
    (out / f"gather-{rank}.json").write_text(json.dumps({
        "offset": offset, "expected_offset": starts[rank], "rows": len(gathered),
        "max_error": (mine.grad - expected).abs().max().item(), "scale": expected.abs().max().item()}))
    dist.destroy_process_group()


def train(out: Path, batch: int) -> None:
    from test_trainer import ToyConfig, UnevenToy

    from sslcore.trainer import Trainer

    class Recording(UnevenToy):
        def loss(self, model, batch, ctx):
            if not hasattr(self, "draw"):
                self.draw = torch.rand(1).item()  # what dropout would draw on this rank
            return super().loss(model, batch, ctx)

    config = ToyConfig()
    for key, value in {"output_dir": str(out / "run"), "per_device_batch_size": batch, "max_steps": 6,
                       "learning_rate": 0.3, "eval_batches": 4, "report_to": [], "log_every": 1}.items():
        setattr(config.train, key, value)
    objective = Recording(config)
    result = Trainer(objective).fit()
    # The launcher owns the process group: a finished run leaves it up, so one launch trains a second run.
    alive_after_run = torch.distributed.is_initialized()
    config.train.output_dir, config.train.max_steps = str(out / "second"), 2
    second = Trainer(Recording(config)).fit()
    rank = int(os.environ.get("RANK", "0"))
    (out / f"train-{rank}.json").write_text(json.dumps({"eval_loss": result.eval["eval_loss"], "draw": objective.draw,
                                                         "loss": result.final_loss,
                                                         "first_loss": result.history[0]["loss"],
                                                         "group_alive_after_run": alive_after_run,
                                                         "second_run_steps": second.step}))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "gather":
        gather_check(out)
    else:
        train(out, int(sys.argv[3]))
