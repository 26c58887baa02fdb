"""Config loading: every shipped preset parses; typos and wrong types are named errors."""

from pathlib import Path

import pytest

from sslcore import config as cfg
from sslcore.api import split_cli, build_config, main
from sslcore.run_config import TrainConfig
from textssl.mlm import MLMConfig

CONFIGS = sorted((Path(__file__).parent.parent / "recipes" / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert any(p.name == "bert_mlm_tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    values = cfg.read_yaml(path)
    if "objective" not in values:  # fine-tuning presets have their own schema and loader
        pytest.skip("not a pretraining preset")
    config = build_config(path)
    assert config.objective == values["objective"]
    assert isinstance(config.train, TrainConfig)


def test_defaults_yaml_then_overrides_in_that_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: bert_mlm\ntrain:\n  max_steps: 7\n  learning_rate: 1e-4\nmodel:\n  hidden_size: 32\n")
    config = build_config(path, ["--train.max_steps", "9", "--model.num_hidden_layers=1"])
    assert isinstance(config, MLMConfig)
    assert config.train.max_steps == 9  # override beats YAML
    assert config.train.learning_rate == pytest.approx(1e-4)  # "1e-4" (YAML string) read as a float
    assert config.model.hidden_size == 32 and config.model.num_hidden_layers == 1
    assert config.model.intermediate_size == 512  # untouched default


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(cfg.ConfigError) as error:
        build_config(None, ["--objective", "bert_mlm", "--train.max_stpes", "3"])
    message = str(error.value)
    assert "train.max_stpes" in message and "max_steps" in message and "learning_rate" in message


def test_unknown_section_is_an_error():
    with pytest.raises(cfg.ConfigError, match="modle"):
        build_config(None, {"objective": "bert_mlm", "modle": {"hidden_size": 3}})


@pytest.mark.parametrize("override, fragment", [
    (["--train.max_steps", "ten"], "train.max_steps: expected an integer"),
    (["--train.learning_rate", "fast"], "train.learning_rate: expected a number"),
    (["--train.lr_schedule", "wavy"], "not one of"),
    (["--train.progress_bar", "maybe"], "expected true/false"),
    (["--model", "3"], "expected a section"),
])
def test_wrong_type_names_the_key(override, fragment):
    with pytest.raises(cfg.ConfigError, match=fragment):
        build_config(None, ["--objective", "bert_mlm", *override])


def test_unknown_objective_lists_registered_ones():
    with pytest.raises(cfg.ConfigError, match="bert_mlm"):
        build_config(None, ["--objective", "bert_mln"])


def test_missing_config_file_says_where_presets_are(tmp_path):
    with pytest.raises(cfg.ConfigError, match="recipes/configs"):
        build_config(tmp_path / "nope.yaml")


def test_cli_flags_map_onto_config_keys():
    path, overrides, show_help = split_cli(["--config", "x.yaml", "--resume", "--push_to_hub", "me/m",
                                             "--train.seed", "3"])
    assert path == "x.yaml" and not show_help
    assert cfg.parse_overrides(overrides) == {"train": {"resume": "latest", "seed": 3}, "hub": {"repo_id": "me/m"}}
    _, overrides, _ = split_cli(["--resume", "runs/x/checkpoints/step-000010"])
    assert cfg.parse_overrides(overrides) == {"train": {"resume": "runs/x/checkpoints/step-000010"}}


def test_help_lists_options_with_their_docstrings(capsys):
    main(["--config", str(CONFIGS[0].parent / "bert_mlm_tiny.yaml"), "--help"])
    out = capsys.readouterr().out
    assert "--train.max_steps" in out and "Optimizer steps to train for" in out
    assert "--masking.whole_word" in out


def test_every_config_field_has_a_docstring():
    import dataclasses

    def walk(cls):
        docs = cfg.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in docs, f"{cls.__name__}.{f.name} has no attribute docstring"
            tp = cls.__dataclass_fields__[f.name].type
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                walk(type(sub))
        return tp

    walk(MLMConfig)


def test_a_section_yaml_starts_from_the_objectives_own_defaults():
    from dataclasses import dataclass, field

    from sslcore.run_config import RunConfig

    @dataclass
    class Custom(RunConfig):
        train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=0.025, max_grad_norm=None))
        """Trainer options with this objective's own defaults."""

    config = cfg.build(Custom, {"train": {"max_steps": 5}})
    assert config.train.max_steps == 5
    assert config.train.learning_rate == 0.025 and config.train.max_grad_norm is None  # not TrainConfig's


@pytest.mark.parametrize("override, fragment", [
    (["--masking.mlm_probability", "2"], "masking.mlm_probability must be in (0, 1)"),
    (["--masking.random_replace_prob", "-0.1"], "masking.random_replace_prob must be in [0, 1]"),
    (["--train.per_device_batch_size", "0"], "train.per_device_batch_size must be >= 1"),
    (["--train.learning_rate", "-1e-3"], "train.learning_rate must be >= 0"),
    (["--train.adam_beta2", "1.5"], "train.adam_beta2 must be in [0, 1]"),
    (["--train.max_grad_norm", "0"], "max_grad_norm must be > 0"),
])
def test_out_of_range_values_are_config_errors(override, fragment):
    with pytest.raises(cfg.ConfigError) as error:
        build_config(None, ["--objective", "bert_mlm", *override])
    assert fragment in str(error.value)


def test_a_range_check_in_any_sections_post_init_becomes_a_config_error():
    from dataclasses import dataclass

    @dataclass
    class Section:
        """A section with a range."""

        rate: float = 0.5
        """A fraction."""

        def __post_init__(self):
            if not 0 <= self.rate <= 1:
                raise ValueError(f"section.rate must be in [0, 1], got {self.rate}")

    with pytest.raises(cfg.ConfigError, match="section.rate must be in"):
        cfg.build(Section, {"rate": 3})


def test_describe_shows_the_values_a_config_holds():
    config = build_config(CONFIGS[0].parent / "bert_mlm_tiny.yaml", ["--train.seed", "4"])
    lines = "\n".join(cfg.describe(config))
    assert "--train.seed (int, 4; default 0)" in lines and "--train.max_steps (int, 600; default 1000)" in lines
    assert "--train.weight_decay (float, 0.01):" in lines
    assert "--train.seed (int, default 0)" in "\n".join(cfg.describe(type(config)))  # a class: its defaults
