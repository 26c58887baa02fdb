"""The seam on 2 real processes (torchrun, gloo on CPU): the gather with gradient, the global loss
normalisation (2 processes at batch B = 1 process at 2B), eval independent of the process count,
the process group left up between runs of one launch,
and model randomness that differs per rank."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = str(Path(__file__).parent / "workers" / "two_process_seam.py")


def torchrun(*args, processes=2):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--standalone", WORKER, *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_gather_with_grad_gives_each_rank_the_single_process_gradient(tmp_path):
    torchrun("gather", tmp_path)
    for rank in range(2):
        result = json.loads((tmp_path / f"gather-{rank}.json").read_text())
        assert result["offset"] == result["expected_offset"] and result["rows"] == 11
        assert result["max_error"] < 1e-5 * max(1.0, result["scale"]), result


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one_at_the_same_global_batch(tmp_path):
    one = subprocess.run([sys.executable, WORKER, "train", str(tmp_path / "one"), "8"], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun("train", tmp_path / "two", 4)
    a = load_file(str(tmp_path / "one" / "run" / "model" / "model.safetensors"))["weight"]
    b = load_file(str(tmp_path / "two" / "run" / "model" / "model.safetensors"))["weight"]
    assert (a - b).abs().max() < 1e-6, (a, b)  # micro-batches hold 4-16 targets: only a global count matches
    reports = [json.loads((tmp_path / "two" / f"train-{r}.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "one" / "train-0.json").read_text())
    assert reports[0]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
    assert reports[0]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert single["loss"] < 0.5 * single["first_loss"]  # the weights moved: the comparison is not vacuous
    assert reports[0]["draw"] != reports[1]["draw"]  # dropout masks differ per rank
    # One launch, several runs: the trainer leaves the launcher's process group up.
    assert all(r["group_alive_after_run"] and r["second_run_steps"] == 2 for r in reports), reports
