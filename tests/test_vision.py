"""visionssl: losses against slow references, losses that fall, views from seeds, the cross-process
gather, exact resume with objective state, exports stock transformers loads, and bad input.

Small on purpose: scikit-learn's 8x8 digits (upscaled to 16x16 by the ResNet's input) and tiny
backbones; no network.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sslcore.api import build_config, pretrain
from sslcore.data import example_seed
from sslcore.objective import LossContext
from sslcore.registry import get_objective
from visionssl.data import ImageDataConfig, ImageDataError, load_image_tensors, read_idx
from visionssl.losses import BYOLLoss, InfoNCELoss, NegativeCosineSimilarity, NTXentLoss
from visionssl.objective import MomentumTarget
from visionssl.probe import ProbeConfig, collapse_stats, knn_accuracy, probe_backbone
from visionssl.views import ViewConfig, apply_views, collate_views, view_params

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "recipes" / "configs"
METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam", "rotation"]
VISION_PRESETS = sorted(p for p in CONFIGS.glob("*.yaml")
                        if p.stem.split("_")[0] in ("simclr", "moco", "byol", "simsiam", "rotation"))


def tiny(cache_dir, output_dir=None, objective=None, **sections):
    """Overrides for a seconds-long run on the digits: a 2-stage ResNet of width 8/16."""
    values = {
        "data": {"source": "digits", "cache_dir": cache_dir, "max_eval_examples": 64},
        "backbone": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
        "head": {"hidden_dim": 32, "out_dim": 16, "predictor_hidden_dim": 16},
        "probe": {"train_examples": 400, "test_examples": 200, "linear_epochs": 30},
        "train": {"per_device_batch_size": 32, "max_steps": 6, "log_every": 2, "eval_every": 0, "eval_batches": 2,
                  "save_every": 0, "report_to": [], "progress_bar": False, "learning_rate": 2e-3,
                  "warmup_steps": 1, "lr_schedule": "cosine"},
    }
    if objective:
        values["objective"] = objective
        if objective.startswith("moco"):
            values["loss"] = {"queue_size": 64}
    if output_dir is not None:
        values["train"]["output_dir"] = str(output_dir)
    for section, options in sections.items():
        values[section] = {**values.get(section, {}), **options}
    return values


def prepared(cache_dir, name, **sections):
    config = build_config(None, tiny(cache_dir, objective=name, **sections))
    objective = get_objective(name)(config)
    objective.prepare()
    return objective


# -- losses against slow references -----------------------------------------------------------------

def test_nt_xent_matches_a_loop_over_pairs():
    torch.manual_seed(0)
    n, t = 5, 0.3
    z = torch.randn(2 * n, 8)
    self_index, positive_index = NTXentLoss.pair_indices(2, n, 0)
    fast = NTXentLoss(t, reduction="none")(z, z, self_index, positive_index)
    zn = z / z.norm(dim=1, keepdim=True)
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(torch.exp(zn[i] @ zn[k] / t) for k in range(2 * n) if k != i)
        assert fast[i].item() == pytest.approx(-torch.log(torch.exp(zn[i] @ zn[positive] / t) / denominator).item(),
                                               rel=1e-5)
    # A process's anchors against every process's rows give the same per-anchor losses.
    other = torch.randn(2 * 3, 8)
    everyone = torch.cat([other, z])
    self_index, positive_index = NTXentLoss.pair_indices(2, n, len(other))
    part = NTXentLoss(t, reduction="none")(z, everyone, self_index, positive_index)
    en = everyone / everyone.norm(dim=1, keepdim=True)
    for i in range(2 * n):
        me, positive = len(other) + i, len(other) + (i + n) % (2 * n)
        denominator = sum(torch.exp(en[me] @ en[k] / t) for k in range(len(everyone)) if k != me)
        assert part[i].item() == pytest.approx(-torch.log(torch.exp(en[me] @ en[positive] / t) / denominator).item(),
                                               rel=1e-5)


def test_info_nce_matches_a_loop_for_queue_and_in_batch_keys():
    torch.manual_seed(1)
    q, k, queue, t = torch.randn(4, 6), torch.randn(4, 6), torch.randn(10, 6), 0.2

    def cos(a, b):
        return (a @ b / a.norm() / b.norm()).item()

    fast = InfoNCELoss(t, reduction="none")(q, positives=k, negatives=queue)
    for i in range(4):
        logits = [cos(q[i], k[i])] + [cos(q[i], n) for n in queue]
        expected = -logits[0] / t + np.log(sum(np.exp(np.array(logits) / t)))
        assert fast[i].item() == pytest.approx(expected, rel=1e-5)
    keys = torch.randn(7, 6)
    positive = torch.tensor([3, 4, 5, 6])
    fast = InfoNCELoss(t, reduction="none")(q, keys=keys, positive_index=positive)
    for i in range(4):
        logits = np.array([cos(q[i], key) for key in keys]) / t
        assert fast[i].item() == pytest.approx(-logits[positive[i]] + np.log(np.exp(logits).sum()), rel=1e-5)


def test_negative_cosine_and_byol_match_formulas_and_stop_the_target_gradient():
    torch.manual_seed(2)
    p, z = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    simsiam = NegativeCosineSimilarity(reduction="none")(p, z)
    byol = BYOLLoss(reduction="none")(p, z)
    for i in range(5):
        c = (p[i] @ z[i] / p[i].norm() / z[i].norm()).item()
        assert simsiam[i].item() == pytest.approx(-c, rel=1e-5)
        pn, zn = p[i] / p[i].norm(), z[i] / z[i].norm()
        assert byol[i].item() == pytest.approx(((pn - zn) ** 2).sum().item(), rel=1e-5)
    (simsiam.sum() + byol.sum()).backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def test_losses_reduce_as_asked_and_refuse_a_bad_temperature():
    z = torch.randn(6, 4)
    s, p = NTXentLoss.pair_indices(2, 3, 0)
    per = NTXentLoss(0.5, reduction="none")(z, z, s, p)
    assert NTXentLoss(0.5, reduction="sum")(z, z, s, p).item() == pytest.approx(per.sum().item(), rel=1e-6)
    assert NTXentLoss(0.5, reduction="mean")(z, z, s, p).item() == pytest.approx(per.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)


# -- each objective's loss falls under a few SGD steps (solo-learn style) --------------------------

@pytest.mark.parametrize("name", METHODS)
def test_each_objective_loss_falls_on_a_fixed_batch(cache_dir, name):
    torch.manual_seed(0)
    objective = prepared(cache_dir, name, probe={"online": False})  # the method's loss alone
    model = objective.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rows = [objective.train_images[i] for i in range(32)]
    batch = objective.collate(rows, [example_seed(0, 0, i) for i in range(32)])
    hooks = objective.step_hooks()[:1]  # momentum update; MoCo v2's enqueue would fill the queue with these keys
    losses = []
    for step in range(1, 13):
        loss, logs = objective.loss(model, batch, LossContext(objective.targets(batch)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for hook in hooks:
            hook(model, step)
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02, losses
    assert all(np.isfinite(losses))


def test_online_probe_learns_from_detached_features_only(cache_dir):
    torch.manual_seed(0)
    objective = prepared(cache_dir, "simclr")
    model = objective.build_model()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.Adam(model.online_probe.parameters(), lr=0.1)  # only the probe steps
    rows = [objective.train_images[i] for i in range(64)]
    batch = objective.collate(rows, [example_seed(0, 0, i) for i in range(64)])
    model.eval()  # fixed BatchNorm statistics: the features stay put, only the probe learns
    probe_losses = []
    for _ in range(15):
        ctx = LossContext(objective.targets(batch))
        loss, logs = objective.loss(model, batch, ctx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.zero_grad()
        probe_losses.append(ctx.terms["online_probe"][0].item() / 64)
    assert probe_losses[-1] < 0.9 * probe_losses[0]
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())
    # Its cross-entropy sends no gradient into the backbone.
    ctx = LossContext(objective.targets(batch))
    z, logits = model(objective.both_views(batch), 64)
    ctx.mean("online_probe", F.cross_entropy(logits, batch["labels"], reduction="sum")).backward()
    assert all(p.grad is None for p in model.backbone.parameters())


# -- views -----------------------------------------------------------------------------------------

def test_views_depend_only_on_the_example_seeds():
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    seeds = [example_seed(7, 0, i) for i in range(6)]
    recipe = [ViewConfig(blur_p=0.5), ViewConfig(solarize_p=0.5, blur_p=0.5)]
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    whole = collate_views(images, seeds, recipe)
    again = collate_views(images, seeds, recipe)
    halves = [collate_views(images[:3], seeds[:3], recipe), collate_views(images[3:], seeds[3:], recipe)]
    for view in range(2):
        a = apply_views(images, view_params(whole, view), 20, mean, std)
        b = apply_views(images, view_params(again, view), 20, mean, std)
        split = torch.cat([apply_views(images[i * 3:(i + 1) * 3], view_params(h, view), 20, mean, std)
                           for i, h in enumerate(halves)])
        assert torch.equal(a, b)
        assert torch.allclose(a, split, atol=1e-6)  # the same rows on 1 process or 2
    assert not torch.equal(whole["view0.box"], whole["view1.box"])  # the two views differ
    other = collate_views(images, [s + 1 for s in seeds], recipe)
    assert not torch.equal(other["view0.box"], whole["view0.box"])


def test_views_are_channels_last_and_the_backbone_gives_the_same_features_as_on_nchw():
    from visionssl.backbone import BackboneConfig, build_backbone, features
    from visionssl.rotation import rotate_all

    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    batch = collate_views(images, [1, 2, 3, 4], [ViewConfig()])
    views = apply_views(images, view_params(batch, 0), 56, torch.full((3,), 0.3), torch.full((3,), 0.2))
    assert views.shape == (4, 3, 56, 56) and views.is_contiguous(memory_format=torch.channels_last)
    assert rotate_all(views)[0].is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(), 28).eval()
    with torch.no_grad():
        assert torch.allclose(features(backbone, views), features(backbone, views.contiguous()), atol=1e-4)


def test_full_crop_without_jitter_is_a_plain_resize():
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    still = ViewConfig(crop_scale_min=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0, flip_p=0.0, jitter_p=0.0)
    batch = collate_views(images, [1, 2], [still])
    out = apply_views(images, view_params(batch, 0), 8, torch.zeros(1), torch.ones(1), channels=1)
    assert torch.allclose(out, images.float() / 255, atol=1e-5)
    flipped = collate_views(images, [1, 2], [ViewConfig(crop_scale_min=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0,
                                                        flip_p=1.0, jitter_p=0.0)])
    out = apply_views(images, view_params(flipped, 0), 8, torch.zeros(1), torch.ones(1), channels=1)
    assert torch.allclose(out, images.float().flip(-1) / 255, atol=1e-5)


def test_batched_pixel_ops_match_torchvision_per_image():
    from torchvision.transforms.v2 import functional as TF

    from visionssl.views import color_jitter, gaussian_blur

    torch.manual_seed(3)
    x = torch.rand(3, 3, 10, 10)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.8, 1.4, 0.6, -0.1], [1.1, 1.1, 1.1, 0.0]])
    apply = torch.tensor([True, True, False])
    out = color_jitter(x, apply, factors)
    for i in range(3):
        expected = x[i]
        if apply[i]:
            b, c, s, h = factors[i].tolist()
            expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
                expected, b), c), s), h) if h else TF.adjust_saturation(TF.adjust_contrast(
                    TF.adjust_brightness(expected, b), c), s)
        assert torch.allclose(out[i], expected, atol=1e-5), i
    sigma = torch.tensor([0.0, 1.0, 1.0])
    blurred = gaussian_blur(x, sigma)
    assert torch.equal(blurred[0], x[0])
    assert torch.allclose(blurred[1], TF.gaussian_blur(x[1], kernel_size=[5, 5], sigma=[1.0, 1.0]), atol=1e-5)


# -- cross-process gather ----------------------------------------------------------------------------

def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    n, d = 3, 5
    everything = torch.randn(world, 2 * n, d)  # the same on every rank: each rank's [view0; view1] rows
    mine = everything[rank].clone().requires_grad_()
    count = 2 * n * world
    ctx = LossContext({"loss": count}, num_processes=world, process_index=rank)
    everyone, offset = ctx.gather(mine)
    s, p = NTXentLoss.pair_indices(2, n, offset)
    loss = ctx.mean("loss", NTXentLoss(0.3)(mine, everyone, s, p))
    loss.backward()
    torch.save({"grad": mine.grad / world, "loss": loss.detach() / world, "offset": offset},  # DDP divides by world
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gather_with_grad_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    torch.manual_seed(0)
    n, d, world = 3, 5, 2
    everything = torch.randn(world, 2 * n, d).requires_grad_()
    # One process, global batch: rank r's rows keep their own (view0, view1) pairing.
    rows = everything.reshape(world * 2 * n, d)
    s = torch.cat([NTXentLoss.pair_indices(2, n, r * 2 * n)[0] for r in range(world)])
    p = torch.cat([NTXentLoss.pair_indices(2, n, r * 2 * n)[1] for r in range(world)])
    loss = NTXentLoss(0.3, reduction="mean")(rows, rows, s, p)
    loss.backward()
    total = 0.0
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["offset"] == rank * 2 * n
        assert torch.allclose(got["grad"], everything.grad[rank], atol=1e-6)
        total += float(got["loss"])
    assert total == pytest.approx(loss.item(), rel=1e-5)


# -- momentum target and queue -----------------------------------------------------------------------

def test_momentum_target_follows_the_cosine_schedule_and_the_ema_formula():
    online = torch.nn.Linear(3, 2)
    target = MomentumTarget(online, base_momentum=0.9, final_momentum=1.0, max_steps=10)
    assert target.momentum_at(0) == pytest.approx(0.9) and target.momentum_at(10) == pytest.approx(1.0)
    assert target.momentum_at(5) == pytest.approx(0.95)
    before = target.network.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    target.update(online, step=1)  # uses the momentum of step 0
    assert torch.allclose(target.network.weight, 0.9 * before + 0.1 * online.weight)
    assert not any(p.requires_grad for p in target.network.parameters())


def test_moco_queue_is_first_in_first_out_and_wraps(cache_dir):
    objective = prepared(cache_dir, "moco_v2", loss={"queue_size": 5})
    objective.build_model()
    objective._pending_keys = [torch.arange(3.0)[:, None].expand(3, 16), 3 + torch.arange(4.0)[:, None].expand(4, 16)]
    objective._enqueue()
    assert objective.queue[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0] and objective.queue_ptr == 2
    state = objective.state_dict()
    fresh = prepared(cache_dir, "moco_v2", loss={"queue_size": 5})
    fresh.build_model()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, objective.queue) and fresh.queue_ptr == 2


# -- the trainer: exact resume with objective state, and the export -------------------------------------

def _train_until_killed(values):
    """A forked child's run (what recipes/pretrain.py runs), killed by the test after a checkpoint."""
    pretrain(build_config(None, values))


@pytest.mark.parametrize("name", METHODS)
def test_sigkill_after_a_checkpoint_then_resume_is_exact(cache_dir, tmp_path, name):
    """Every method, killed with SIGKILL (no chance to save) after its step-2 checkpoint, resumes from the last
    complete checkpoint and ends where the run that was never interrupted did: weights (online probe and
    BatchNorm statistics included) and objective state (momentum encoder, queue and its pointer) bit for bit.
    The child is forked from this process (no interpreter start: a fraction of a second per method)."""
    import multiprocessing
    import signal
    import time

    steps = 12

    def values(out, **train):
        return tiny(cache_dir, out, name, probe={"enabled": False},
                    train={"max_steps": steps, "save_every": 2, "keep_checkpoints": 10, "num_threads": 1,
                           "export": False, **train})

    full, killed = tmp_path / "full", tmp_path / "killed"
    pretrain(build_config(None, values(full)))
    child = multiprocessing.get_context("fork").Process(target=_train_until_killed, args=(values(killed),))
    child.start()
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000002").exists() and child.is_alive() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    final = f"step-{steps:06d}"
    assert not (killed / "checkpoints" / final).exists()
    for checkpoint in (killed / "checkpoints").glob("step-*"):  # whatever the kill interrupted, no torn checkpoint
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()

    resumed = pretrain(build_config(None, values(killed, resume="latest")))
    assert resumed.step == steps
    a, b = (load_file(str(d / "checkpoints" / final / "model.safetensors")) for d in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert any("online_probe" in k for k in a) and any("running_mean" in k for k in a)
    state_files = [d / "checkpoints" / final / "objective.pt" for d in (full, killed)]
    if name not in ("moco_v2", "moco_v3", "byol"):  # no objective state to compare
        assert not any(path.exists() for path in state_files)
        return
    sa, sb = (torch.load(path, weights_only=True) for path in state_files)
    ta, tb = sa["target"]["network"], sb["target"]["network"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    start = torch.load(full / "checkpoints" / "step-000002" / "objective.pt", weights_only=True)
    assert not all(torch.equal(start["target"]["network"][k], ta[k]) for k in ta)  # the target moved
    if name == "moco_v2":
        assert torch.equal(sa["queue"], sb["queue"]) and sa["queue_ptr"] == sb["queue_ptr"] == (steps * 32) % 64


@pytest.fixture(scope="module")
def simclr_export(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("simclr")
    result = pretrain(build_config(None, tiny(cache_dir, out, "simclr", train={"eval_every": 3})))
    return result


def test_simclr_run_logs_monitors_and_exports_probe_scores_in_the_card(simclr_export):
    history = simclr_export.history
    assert any("embedding_std" in h for h in history)
    assert any("eval_effective_rank" in h for h in history)
    probe = [h["eval_online_probe_accuracy"] for h in history if "eval_online_probe_accuracy" in h]
    assert probe and all(0.0 <= p <= 1.0 for p in probe)
    export = Path(simclr_export.export_dir)
    scores = json.loads((export / "probe_scores.json").read_text())
    assert set(scores) == {"knn_accuracy", "linear_probe_accuracy"} and scores["linear_probe_accuracy"] > 0.3
    card = (export / "README.md").read_text()
    assert "SimCLR" in card and "knn_accuracy" in card and "digits" in card and "6 steps" in card


def test_export_loads_in_stock_transformers_offline(simclr_export):
    from transformers import AutoImageProcessor, AutoModel, pipeline

    export = str(simclr_export.export_dir)
    model = AutoModel.from_pretrained(export)
    processor = AutoImageProcessor.from_pretrained(export)
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8), mode="L")
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8), mode="RGB")
    inputs = processor(images=[gray, rgb], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 16, 16)
    with torch.no_grad():
        pooled = model(**inputs).pooler_output.flatten(1)
    assert pooled.shape == (2, 16)
    extract = pipeline("image-feature-extraction", model=export)
    features = extract(gray, pool=True)
    assert np.asarray(features).size == 16


# -- probes and monitors ----------------------------------------------------------------------------

def test_knn_votes_and_collapse_monitors():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(train_x, train_y, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1]), k=2) == 1.0
    collapsed = collapse_stats(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32))
    spread = collapse_stats(torch.randn(256, 32))
    assert collapsed["embedding_std"] < 0.05 and spread["embedding_std"] > 0.8
    assert spread["effective_rank"] > 20


def test_probes_need_labels(cache_dir):
    objective = prepared(cache_dir, "rotation")
    unlabelled = type(objective.train_images)(objective.train_images.images[:50], torch.full((50,), -1))
    with pytest.raises(ValueError, match="no labels"):
        probe_backbone(objective.backbone_of(objective.build_model()), unlabelled, objective.test_images,
                       objective.input_size, objective.mean, objective.std, ProbeConfig())


# -- bad input --------------------------------------------------------------------------------------

def test_image_folder_skips_broken_files_converts_modes_and_resizes(tmp_path, caplog):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            if i % 2:
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
            else:  # grayscale and smaller: converted to RGB and resized up
                Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8), mode="L").save(root / label / f"{i}.png")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    good = root / "dog" / "1.png"
    (root / "dog" / "truncated.png").write_bytes(good.read_bytes()[:40])
    config = ImageDataConfig(source=str(root), cache_dir=str(tmp_path / "cache"), image_size=12)
    with caplog.at_level("WARNING"):
        splits, dataset = load_image_tensors(config)
    import re

    # Counted: the warnings (one per split holding a bad file) name how many were skipped.
    assert sum(int(n) for n in re.findall(r"skipped (\d+) unreadable", caplog.text)) == 2, caplog.text
    total = sum(len(s) for s in splits.values())
    assert total == 12
    assert splits["train"].images.shape[1:] == (3, 12, 12)
    images = torch.cat([s.images for s in splits.values()])
    gray = (images[:, 0] == images[:, 1]).flatten(1).all(1) & (images[:, 1] == images[:, 2]).flatten(1).all(1)
    assert int(gray.sum()) == 6  # the 6 grayscale files, converted to RGB by repeating the channel
    assert set(splits["train"].labels.tolist()) <= {0, 1} and splits["train"].class_names == ["cat", "dog"]


def test_empty_folder_unknown_source_and_truncated_idx_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match="no image files"):
        load_image_tensors(ImageDataConfig(source=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ImageDataError, match="unknown image source"):
        load_image_tensors(ImageDataConfig(source="cifar11", cache_dir=str(tmp_path / "c")))
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with pytest.raises(ImageDataError, match="truncated"):
        read_idx(header + bytes(100))
    assert read_idx(header + bytes(10 * 28 * 28)).shape == (10, 28, 28)


def test_hf_source_finds_image_and_label_columns_and_says_when_it_cannot_load(tmp_path, monkeypatch):
    import datasets

    import visionssl.data as data

    rng = np.random.default_rng(0)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)) for _ in range(n)]
        features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"])})
        return datasets.Dataset.from_dict({"img": images, "fine_label": [i % 2 for i in range(n)]}, features=features)

    monkeypatch.setattr(data.datasets, "load_dataset", lambda name, subset=None: datasets.DatasetDict(
        {"train": split(8), "validation": split(4)}))
    splits, _ = load_image_tensors(ImageDataConfig(source="hf:someone/tiny-rgb", cache_dir=str(tmp_path)))
    assert splits["train"].images.shape == (8, 3, 10, 10) and splits["test"].labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(ImageDataError, match="no column 'coarse_label'"):  # the label column asked for is missing
        load_image_tensors(ImageDataConfig(source="hf:someone/tiny-rgb", cache_dir=str(tmp_path / "other"),
                                           label_column="coarse_label"))

    def with_a_corrupt_image(name, subset=None):  # bytes that are no image: skipped at decode and counted
        train = split(8)
        bad = datasets.Dataset.from_dict({"img": [{"bytes": b"not an image", "path": None}], "fine_label": [1]},
                                         features=train.features)
        return datasets.DatasetDict({"train": datasets.concatenate_datasets([train, bad]), "validation": split(4)})

    monkeypatch.setattr(data.datasets, "load_dataset", with_a_corrupt_image)
    splits, _ = load_image_tensors(ImageDataConfig(source="hf:someone/corrupt", cache_dir=str(tmp_path)))
    assert len(splits["train"]) == 8 and splits["train"].skipped == 1

    def offline(name, subset=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(ImageDataError, match="HF_HUB_OFFLINE"):
        load_image_tensors(ImageDataConfig(source="hf:someone/other", cache_dir=str(tmp_path)))


def test_pretraining_on_a_bad_unlabelled_folder_finishes_with_counted_skips_and_no_probe(tmp_path, caplog):
    """A folder with no class sub-folders (so no labels), a broken file, grayscale and RGB, two sizes: the run
    trains to the end; the probes are skipped with a warning (no crash at export), no probe_scores.json."""
    root = tmp_path / "loose"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        shape = (10, 10, 3) if i % 2 else (6, 6)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg")
    values = tiny(str(tmp_path / "cache"), tmp_path / "run", "simclr", data={"source": str(root), "image_size": 10},
                  train={"per_device_batch_size": 16, "max_steps": 2})
    with caplog.at_level("WARNING"):
        result = pretrain(build_config(None, values))
    assert result.step == 2 and Path(result.export_dir, "config.json").is_file()
    assert "skipped 1 unreadable" in caplog.text and "no labels" in caplog.text
    assert not Path(result.export_dir, "probe_scores.json").exists()
    with pytest.raises(ImageDataError, match="class sub-folders"):  # a folder's labels are its sub-folders
        load_image_tensors(ImageDataConfig(source=str(root), cache_dir=str(tmp_path / "c2"), label_column="fine"))


def test_simclr_refuses_gradient_accumulation(cache_dir, tmp_path):
    from sslcore.trainer import Trainer

    config = build_config(None, tiny(cache_dir, tmp_path, "simclr", train={"gradient_accumulation_steps": 2}))
    with pytest.raises(Exception, match="accumulat"):
        Trainer(get_objective("simclr")(config))


def test_every_vision_preset_loads():
    assert {p.stem for p in VISION_PRESETS} >= {"simclr_tiny", "simclr_base"}
    for path in VISION_PRESETS:
        config = build_config(path)
        assert config.objective in METHODS, path


# -- 2 processes = 1 process at the global batch (through accelerate launch) --------------------------

@pytest.mark.slow
def test_two_processes_match_one_process_at_twice_the_batch(cache_dir, tmp_path):
    """Every method, 2 x 16 on 2 processes against 1 x 32, 3 steps: SimCLR's negatives and MoCo v3's keys
    gathered across processes, MoCo v2's queue filled from every process, BYOL's target and SimSiam's
    stop-gradient branch, rotation's 4 x B. ViT (no BatchNorm) and BN-free heads, since torch's SyncBatchNorm
    needs a GPU. One launch per side trains all the methods (tests/workers/vision_parity.py)."""
    methods = METHODS
    worker = str(ROOT / "tests" / "workers" / "vision_parity.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one"), "32", cache_dir, *methods],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", worker,
                          str(tmp_path / "two"), "16", cache_dir, *methods],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in methods:
        runs = [tmp_path / side / name for side in ("one", "two")]
        losses = [[record["loss"] for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if "loss" in record] for run in runs]
        assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4), name
        a, b = (load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors")) for run in runs)
        before = load_file(str(runs[0] / "checkpoints" / "step-000002" / "model.safetensors"))
        moved = max((a[k] - before[k]).abs().max().item() for k in a)  # one step's movement
        assert moved > 1e-4, name
        assert max((a[k] - b[k]).abs().max().item() for k in a) < moved / 100, name
        states = [run / "checkpoints" / "step-000003" / "objective.pt" for run in runs]
        if states[0].exists():  # the momentum encoder and the queue match too
            sa, sb = (torch.load(path, weights_only=True) for path in states)
            ta, tb = sa["target"]["network"], sb["target"]["network"]
            assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < moved / 100, name
            if "queue" in sa:
                assert torch.allclose(sa["queue"], sb["queue"], atol=1e-5) and sa["queue_ptr"] == sb["queue_ptr"]
