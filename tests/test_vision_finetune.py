"""visionssl.finetune: full fine-tuning of an exported backbone over seeds on the shared trainer, its splits,
an export stock `pipeline("image-classification")` loads offline, and clear errors for bad input.

Small on purpose: a 2-stage ResNet of width 8/16 saved the way a pretraining run exports it, scikit-learn's
8x8 digits upscaled to 16x16, a few dozen steps.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionssl.finetune as vf
from sslcore.config import ConfigError
from sslcore.errors import MissingPathError
from visionssl.backbone import BackboneConfig, build_backbone, save_backbone
from visionssl.data import ImageDataConfig, ImageDataError

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A tiny ResNetModel + image processor folder, as `recipes/pretrain.py` exports one."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("backbone") / "model"
    backbone = build_backbone(BackboneConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), image_size=8)
    save_backbone(backbone, out, input_size=16, mean=[0.3] * 3, std=[0.35] * 3)
    return out


def options(cache_dir, **train):
    return {"data": {"cache_dir": cache_dir},
            "train": {"max_steps": 40, "eval_every": 10, "per_device_batch_size": 64, "log_every": 10, "learning_rate": 5e-3,
                      "progress_bar": False, "report_to": [], "num_threads": 1, **train},
            "early_stopping": {"patience": 2}}


@pytest.fixture(scope="module")
def finetuned(backbone_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    result = vf.finetune(model=str(backbone_dir), source="digits", seeds=[0, 1], output_dir=str(out),
                         overrides=options(cache_dir))
    return result, out


def test_finetune_over_seeds_scores_the_best_validation_weights(finetuned, cache_dir):
    result, out = finetuned
    assert result.seeds == [0, 1] and result.protocol == "full" and result.task_type == "image-classification"
    accuracy = result.test["accuracy"]
    assert len(accuracy) == 2 and accuracy[0] != accuracy[1]  # the seeds vary something
    assert result.mean() > 0.5, accuracy  # 10 classes: chance is 0.1
    assert all(0 < steps <= 40 for steps in result.steps)
    scores = json.loads((out / "full-pretrained-seed0" / "scores.json").read_text())
    sizes = scores["task"]["sizes"]
    assert sizes["train"] + sizes["validation"] == 1497 and abs(sizes["validation"] - 150) <= 5 and sizes["test"] == 300
    assert not (out / "full-pretrained-seed0" / "checkpoints").exists()  # removed unless keep_checkpoints
    # The export holds the best validation weights: scoring it again gives the recorded scores.
    from transformers import AutoModelForImageClassification

    config = vf.build_vision_finetune_config(overrides={**options(cache_dir), "data": {"source": "digits",
                                                        "cache_dir": cache_dir}, "model": {"path": result.model_dirs[0]}})
    objective = vf.ImageClassificationObjective(config)
    objective.prepare()
    model = AutoModelForImageClassification.from_pretrained(result.model_dirs[0])
    assert type(model).__name__ == "ResNetForImageClassification"
    assert objective.score(model, "test") == pytest.approx(scores["test"])
    assert objective.score(model, "validation") == pytest.approx(scores["validation"])


def test_export_runs_in_stock_image_classification_pipeline_offline(finetuned, cache_dir):
    from transformers import pipeline

    result, _ = finetuned
    classify = pipeline("image-classification", model=result.model_dirs[0])
    config = vf.build_vision_finetune_config(overrides={"data": {"source": "digits", "cache_dir": cache_dir},
                                                        "model": {"path": result.model_dirs[0]}})
    objective = vf.ImageClassificationObjective(config)
    objective.prepare()
    test = objective.task.splits["test"]
    images = [Image.fromarray(test.images[i, 0].numpy(), mode="L") for i in range(40)]  # grayscale PIL images
    predicted = [out[0]["label"] for out in classify(images)]
    assert set(predicted) <= {str(i) for i in range(10)}
    ours = [objective.task.label_names[i] for i in objective.predict(classify.model, test.images[:40]).tolist()]
    agreement = np.mean([a == b for a, b in zip(predicted, ours)])
    assert agreement >= 0.9, (predicted, ours)  # PIL's resize vs ours: the same input up to rounding
    card = (Path(result.model_dirs[0]) / "README.md").read_text()
    assert "image-classification" in card and "Downstream results" in card and "full fine-tuning" in card


def test_learning_rate_grid_is_chosen_on_validation_and_only_the_choice_sees_test(backbone_dir, cache_dir, tmp_path,
                                                                                  monkeypatch):
    def grid_run():
        return vf.finetune(model=str(backbone_dir), source="digits", seeds=[0], learning_rates=[1e-7, 3e-3],
                           init="random", train_examples=300, output_dir=str(tmp_path),
                           overrides=options(cache_dir, max_steps=20))

    result = grid_run()
    assert result.selection.chosen == [1] and result.selection.settings == [{"learning_rate": 1e-7},
                                                                            {"learning_rate": 3e-3}]
    assert "lr 3e-3" in result.summary() and result.train_examples == [300] and result.label_budget == 300
    tried = {path.parent.name: json.loads(path.read_text()) for path in tmp_path.glob("*/scores.json")}
    assert set(tried) == {"full-random-labels300-lr1e-7-seed0", "full-random-labels300-lr3e-3-seed0"}
    assert "test" not in tried["full-random-labels300-lr1e-7-seed0"]  # the test split only sees the choice
    assert tried["full-random-labels300-lr3e-3-seed0"]["test"]["accuracy"] == result.test["accuracy"][0]

    import sslcore.trainer  # a rerun (an interrupted benchmark's) reuses every finished run: nothing retrains

    def refuse(self):
        raise RuntimeError("retrained a finished run")

    monkeypatch.setattr(sslcore.trainer.Trainer, "fit", refuse)
    assert grid_run().test == result.test


def test_pretrained_init_loads_the_backbone_and_random_init_does_not(backbone_dir):
    from safetensors.torch import load_file

    saved = load_file(str(backbone_dir / "model.safetensors"))
    key = next(k for k in saved if k.endswith("convolution.weight"))
    names = [str(i) for i in range(10)]
    pretrained = vf.build_classifier(vf.VisionModelConfig(path=str(backbone_dir)), names).state_dict()
    torch.manual_seed(1)
    random = vf.build_classifier(vf.VisionModelConfig(path=str(backbone_dir), init="random"), names).state_dict()
    assert torch.equal(pretrained[f"resnet.{key}"], saved[key])
    assert not torch.equal(random[f"resnet.{key}"], saved[key])
    assert pretrained["classifier.1.weight"].shape == (10, 16)


def test_splits_are_stratified_nested_fixed_and_disjoint(cache_dir):
    data = ImageDataConfig(source="digits", cache_dir=cache_dir)
    small = vf.load_image_task(data, vf.ImageSplitConfig(train_examples=100))
    large = vf.load_image_task(data, vf.ImageSplitConfig(train_examples=300))
    again = vf.load_image_task(data, vf.ImageSplitConfig(train_examples=100))
    assert small.indices == again.indices and small.digests == again.digests
    assert small.indices["validation"] == large.indices["validation"]
    assert set(small.indices["train"]) < set(large.indices["train"])  # a smaller budget nests in a larger one
    assert not set(large.indices["train"]) & set(large.indices["validation"])
    assert len(small.splits["train"]) == 100 and len(large.splits["train"]) == 300
    counts = torch.bincount(small.splits["train"].labels, minlength=10)
    assert counts.min() >= 8 and counts.max() <= 12  # stratified: ~10 of each digit
    next_seed = vf.load_image_task(data, vf.ImageSplitConfig(train_examples=100), seed=1)  # a run's seed
    assert next_seed.indices["validation"] == small.indices["validation"]
    assert next_seed.indices["train"] != small.indices["train"]
    other = vf.load_image_task(data, vf.ImageSplitConfig(train_examples=100, seed=1))  # the split's seed
    assert other.indices["validation"] != small.indices["validation"]


def test_bad_input_is_a_clear_error(backbone_dir, cache_dir, tmp_path):
    with pytest.raises(MissingPathError, match="no config.json"):
        vf.finetune(model=str(tmp_path / "nowhere"), source="digits", overrides=options(cache_dir))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((backbone_dir / "config.json").read_text())
    with pytest.raises(MissingPathError, match="preprocessor_config.json"):
        vf.finetune(model=str(bare), source="digits", overrides=options(cache_dir))
    with pytest.raises(ConfigError, match="repeats a seed"):
        vf.finetune(model=str(backbone_dir), source="digits", seeds=[0, 0], overrides=options(cache_dir))
    with pytest.raises(ConfigError, match="validation_fraction"):
        vf.build_vision_finetune_config(overrides=["--split.validation_fraction", "1.5"])
    loose = tmp_path / "unlabelled"  # images straight in the folder: no class sub-folders, so no labels
    loose.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(loose / f"{i}.png")
    with pytest.raises(ImageDataError, match="no labels"):
        vf.load_image_task(ImageDataConfig(source=str(loose), cache_dir=str(tmp_path / "c")), vf.ImageSplitConfig())


def test_recipe_help_preset_and_one_line_errors(backbone_dir, capsys):
    spec = importlib.util.spec_from_file_location("finetune_vision", ROOT / "recipes" / "finetune_vision.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    preset = ROOT / "recipes" / "configs" / "vision_finetune_fashion_mnist.yaml"
    assert recipe.main(["--config", str(preset), "--help"]) is None
    shown = capsys.readouterr().out
    assert "split.train_examples" in shown and "1000" in shown and "fashion-mnist" in shown
    config = vf.build_vision_finetune_config(preset)
    assert config.objective == "image_classification" and config.split.train_examples == 1000
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--model.path", str(backbone_dir.parent / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line
