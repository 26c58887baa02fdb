"""Every entry point answers a user's mistake with one clear line on stderr and exit status 2 (the
traceback only with --debug or SELFSUP_DEBUG=1), and `--help` shows the values the run would use."""

import importlib.util
import sys
from pathlib import Path

import pytest

from sslcore.api import main as pretrain_main
from sslcore.errors import EXIT_USER_ERROR, UserError, is_user_error, run_cli, user_error_line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
TINY = str(CONFIGS / "bert_mlm_tiny.yaml")


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run(cache_dir, output_dir, **extra):
    """Overrides for a seconds-long bert_mlm_tiny run on a slice of the default corpus."""
    values = {"data.corpus.max_documents": 60, "data.corpus.cache_dir": cache_dir, "data.max_seq_length": 32,
              "tokenizer.vocab_size": 600, "model.hidden_size": 16, "model.num_hidden_layers": 1,
              "model.num_attention_heads": 2, "model.intermediate_size": 32, "train.per_device_batch_size": 4,
              "train.progress_bar": "false", "train.report_to": "[]", "train.output_dir": str(output_dir),
              "train.max_steps": 2, "train.warmup_steps": 0, "train.eval_batches": 1, "train.log_every": 1, **extra}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def one_error_line(stderr: str, prefix: str) -> str:
    """The single error line of a failed command (log lines from before the failure may precede it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if " error: " in f" {line}" and not line[:4].isdigit()]
    assert len(errors) == 1 and errors[0].startswith(prefix), stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------------------


def test_handler_prints_one_line_and_exits_2_for_user_errors_only(capsys, monkeypatch):
    monkeypatch.delenv("SELFSUP_DEBUG", raising=False)

    class CorpusError(UserError, ValueError):
        pass

    def fails(argv):
        raise CorpusError("no such source 'x';\n  use one of a, b")

    with pytest.raises(SystemExit) as stop:
        run_cli(fails, [])
    assert stop.value.code == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "corpus error: no such source 'x'; use one of a, b\n"
    # A bug of ours keeps its traceback.
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 / 0, [])
    # --debug (removed from argv) or SELFSUP_DEBUG=1 re-raises the user error itself.
    seen = []
    with pytest.raises(CorpusError):
        run_cli(lambda argv: seen.append(argv) or fails(argv), ["--x", "1", "--debug"])
    assert seen == [["--x", "1"]]
    monkeypatch.setenv("SELFSUP_DEBUG", "1")
    with pytest.raises(CorpusError):
        run_cli(fails, [])


def test_the_projects_error_classes_are_user_errors():
    from sslcore.checkpoint import CheckpointError
    from sslcore.config import ConfigError
    from sslcore.fetch import FetchError
    from sslcore.hub import HubError
    from textssl.corpus import CorpusError
    from textssl.tasks import TaskError

    for klass in (ConfigError, CheckpointError, FetchError, HubError, CorpusError, TaskError):
        assert is_user_error(klass("x")), klass
    assert user_error_line(ConfigError("bad")) == "config error: bad"
    assert user_error_line(CheckpointError("old")) == "checkpoint error: old"
    assert not is_user_error(RuntimeError("a bug"))


# ---------------------------------------------------------------------------------------------------
# recipes/pretrain.py (sslcore.api.main)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, prefix, fragment", [
    (["--masking.mlm_probability", "2"], "config error", "masking.mlm_probability must be in (0, 1)"),
    (["--train.max_steps", "0"], "config error", "train.max_steps must be >= 1"),
    (["--train.warmup_ratio", "1.5"], "config error", "train.warmup_ratio must be in [0, 1]"),
    (["--push_to_hub", "bert-tiny"], "hub error", "give `user/name`"),
])
def test_out_of_range_values_are_one_line(override, prefix, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--config", TINY, "--train.output_dir", str(tmp_path / "run"), *override])
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err, prefix)
    assert fragment in line
    assert not (tmp_path / "run").exists()  # nothing ran


def test_push_to_hub_offline_fails_before_training(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--config", TINY, "--train.output_dir", str(tmp_path / "run"), "--push_to_hub", "you/bert-tiny"])
    assert stop.value.code == 2
    assert "HF_HUB_OFFLINE" in one_error_line(capsys.readouterr().err, "hub error")
    assert not (tmp_path / "run").exists()  # refused before any training


def test_missing_corpus_path_is_one_line(capsys, tmp_path, cache_dir):
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--config", TINY, *tiny_run(cache_dir, tmp_path / "run"),
                       "--data.corpus.sources", f"[{tmp_path / 'no-such-file.txt'}]"])
    assert stop.value.code == 2
    assert "no-such-file.txt" in one_error_line(capsys.readouterr().err, "corpus error")


def test_checkpoint_from_another_config_is_one_line(capsys, tmp_path, cache_dir):
    out = tmp_path / "run"
    result = pretrain_main(["--config", TINY, *tiny_run(cache_dir, out)])
    assert result.step == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--config", TINY, *tiny_run(cache_dir, out, **{"model.intermediate_size": 48, "train.max_steps": 4}),
                       "--resume"])
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err, "checkpoint error")
    assert "different config" in line and "intermediate_size" in line


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    from sslcore.config import ConfigError

    monkeypatch.delenv("SELFSUP_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="mlm_probability"):
        pretrain_main(["--config", TINY, "--masking.mlm_probability", "2", "--debug"])
    monkeypatch.setenv("SELFSUP_DEBUG", "1")
    with pytest.raises(ConfigError, match="mlm_probability"):
        pretrain_main(["--config", TINY, "--masking.mlm_probability", "2"])


# ---------------------------------------------------------------------------------------------------
# The other entry points, run as `python SCRIPT` / `python -m MODULE` runs them (their __main__ blocks)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, prefix, fragment", [
    (["recipes/pretrain.py", "--config", TINY, "--masking.mlm_probability", "2"], "config error", "mlm_probability"),
    (["recipes/demo.py", "--masking.mlm_probability", "2"], "config error", "mlm_probability"),
    (["recipes/finetune.py", "--config", str(CONFIGS / "finetune_movie_sentiment.yaml"), "--model.path",
      "runs/no-such-run/model"], "error", "no such folder"),
    (["-m", "textssl.word2vec", "--config", str(CONFIGS / "word2vec_skipgram_tiny.yaml"), "--epochs", "-1"],
     "config error", "epochs"),
    (["benchmarks/downstream.py", "--model", "runs/no-such-run/model"], "error", "no such folder"),
], ids=["pretrain", "demo", "finetune", "word2vec", "downstream"])
def test_every_entry_point_prints_one_line_and_exits_2(command, prefix, fragment, capsys, monkeypatch):
    import runpy
    import warnings

    monkeypatch.delenv("SELFSUP_DEBUG", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [command[1] if command[0] == "-m" else command[0], *command[2 if command[0] == "-m" else 1:]])
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: textssl.word2vec is imported already
        if command[0] == "-m":
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / command[0]), run_name="__main__")
    assert stop.value.code == 2
    assert fragment in one_error_line(capsys.readouterr().err, prefix)


# ---------------------------------------------------------------------------------------------------
# --help shows the values the run would use
# ---------------------------------------------------------------------------------------------------


def test_pretrain_help_shows_the_presets_values_and_overrides(capsys):
    assert pretrain_main(["--config", TINY, "--train.max_steps", "7", "--help"]) is None
    out = capsys.readouterr().out
    assert "--train.max_steps (int, 7; default 1000)" in out  # the override
    assert "--train.learning_rate (float, 0.001; default 0.0005)" in out  # the preset's value
    assert "--train.seed (int, 0):" in out  # untouched: the default
    assert "--masking.whole_word (bool, True; default False)" in out


def test_demo_help_works_and_shows_the_demo_presets_values(capsys):
    demo = load_script(ROOT / "recipes" / "demo.py")
    assert demo.main(["--help", "--train.max_steps", "9"]) is None
    out = capsys.readouterr().out
    assert "--no-downstream" in out and "--seeds" in out
    assert "--train.max_steps (int, 9; default 1000)" in out
    assert "--masking.mlm_probability (float, 0.3; default 0.15)" in out  # bert_mlm_demo.yaml masks 30%


def test_finetune_help_shows_the_presets_values(capsys):
    recipe = load_script(ROOT / "recipes" / "finetune.py")
    assert recipe.main(["--config", str(CONFIGS / "finetune_movie_sentiment.yaml"), "--protocol", "probe",
                        "--help"]) is None
    out = capsys.readouterr().out
    assert "--protocol (Literal['full', 'probe'], 'probe'; default 'full')" in out
    assert "--task.name (str, 'movie-sentiment')" in out and "movie-sentiment:" in out


# ---------------------------------------------------------------------------------------------------
# benchmarks/downstream.py leaves the tracked results alone
# ---------------------------------------------------------------------------------------------------


def test_downstream_benchmark_writes_under_the_work_dir_by_default(tmp_path):
    bench = load_script(ROOT / "benchmarks" / "downstream.py")
    args = bench.parse_args(["--model", "m", "--work-dir", str(tmp_path / "work")])
    assert Path(args.results) == tmp_path / "work" / "RESULTS.md"
    assert Path(bench.parse_args(["--model", "m"]).results).resolve() != ROOT / "benchmarks" / "RESULTS.md"
    assert bench.parse_args(["--results", "benchmarks/RESULTS.md"]).results == "benchmarks/RESULTS.md"
    assert len(bench.parse_args([]).seeds) >= 5
