"""Cross-process helpers that losses need, working the same on 1 process and on N.

Losses stay pure functions of tensors; what must cross processes (negatives from other ranks,
a global count to normalise by) goes through these, reached from `LossContext`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def release_process_group() -> None:
    """Destroy the default process group if one is up: done once by the entry point when it exits (see
    `sslcore.errors.run_cli`), never by a run, so one launch can hold several runs."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over processes (no gradient); the tensor itself on one process."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _row_counts(rows: int, device: torch.device) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(c) for c in counts]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's slice of the summed gradient.

    `dist.all_gather` cuts the graph; contrastive losses need gradients to flow into the local
    part. Each rank computes its loss over all gathered rows, so the gradient of rank r's rows is
    the sum over ranks of what each loss put on them: all-reduce, then take our block.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every process concatenated in rank order, where this process's rows start).

    Row counts may differ per process. The local rows keep their gradient (others are constants
    here; their own process back-propagates them). On one process: `(tensor, 0)`.
    """
    if not is_distributed():
        return tensor, 0
    sizes = _row_counts(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes), sum(sizes[: dist.get_rank()])
