"""sslcore.compare: what a pretrained-vs-scratch row may claim, Welch's test, and the written report; per-arm model
selection (sslcore.finetune), label-budget subsets (sslcore.splits) and their curves."""

import json
import math
from dataclasses import dataclass, field

import pytest

from sslcore.compare import ALPHA, Comparison, comparison_table, welch_t_test, write_report


@dataclass
class Arm:
    """The least an arm needs (textssl's FinetuneResult, or a speech/vision probe's result)."""

    scores: list
    main_metric: str = "accuracy"
    seconds: float = 1.0
    steps: list = field(default_factory=list)

    @property
    def seeds(self):
        return list(range(len(self.scores)))

    @property
    def test(self):
        return {"accuracy": self.scores}


def row(pretrained, scratch):
    return Comparison("task", "probe", Arm(pretrained), Arm(scratch))


def student_t_two_sided_p(t, df, steps=200_000):
    """The slow reference: 2 x the t density integrated from |t| to far out (midpoint rule on u = 1/x)."""
    def density(x):
        return math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x * x / df) ** (-(df + 1) / 2)

    upper = 1 / abs(t)  # substitute x = 1 / u on (|t|, inf): dx = du / u^2
    width = upper / steps
    tail = sum(density(1 / ((i + 0.5) * width)) / ((i + 0.5) * width) ** 2 for i in range(steps)) * width
    return 2 * tail


def test_welch_matches_the_formula_and_a_slow_reference():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    test = welch_t_test(a, b)
    # means 3 and 6, variances 2.5 and 10: se^2 = 0.5 + 2 = 2.5; df = 2.5^2 / (0.5^2/4 + 2^2/4) = 5.882...
    assert test.t == pytest.approx(-3 / math.sqrt(2.5))
    assert test.df == pytest.approx(6.25 / (0.0625 + 1.0))
    assert test.p_value == pytest.approx(student_t_two_sided_p(test.t, test.df), rel=1e-4)
    assert 0.10 < test.p_value < 0.12


def test_zero_spread_in_both_arms_claims_nothing():
    for pretrained, scratch in (([0.6, 0.6, 0.6], [0.6, 0.6, 0.6]), ([0.5, 0.5], [0.6, 0.6]), ([0.7, 0.7], [0.6, 0.6])):
        r = row(pretrained, scratch)
        assert r.sigma == 0 and r.ratio is None and r.p_value is None
        assert r.verdict.startswith("no claim: no spread") and not r.helps
        table = comparison_table([r], command="pytest", checkpoint_note="A checkpoint.")
        assert "inf" not in table and "(helps)" not in table and "**helps**" not in table
        assert "n/a (no spread)" in table


def test_a_single_seed_claims_nothing():
    r = row([0.9], [0.5])
    assert r.verdict.startswith("no claim: 1 seed(s)") and not r.helps
    r = row([0.9, 0.91, 0.92], [0.5])
    assert r.verdict.startswith("no claim") and r.p_value is None


def test_helps_needs_two_sigma_and_a_small_p():
    clear = row([0.70, 0.71, 0.72, 0.70, 0.71], [0.60, 0.61, 0.62, 0.60, 0.61])
    assert clear.delta > 2 * clear.sigma and clear.p_value < ALPHA and clear.verdict == "helps" and clear.helps
    hurts = row([0.60, 0.61, 0.62], [0.70, 0.71, 0.72])
    assert hurts.verdict == "hurts" and not hurts.helps
    noisy = row([0.70, 0.60, 0.75], [0.62, 0.66, 0.58])
    assert noisy.verdict == "no clear difference"
    # Beyond 2 sigma but with two seeds a side the test is too weak: p above ALPHA means no claim of help.
    weak = row([0.70, 0.72], [0.60, 0.65])
    assert weak.delta > 2 * weak.sigma and weak.p_value > ALPHA and weak.verdict == "no clear difference"


def test_report_writes_table_plot_and_json_with_p_values(tmp_path):
    rows = [row([0.70, 0.71, 0.72, 0.70, 0.71], [0.60, 0.61, 0.62, 0.60, 0.61]), row([0.6, 0.6], [0.6, 0.6])]
    text = write_report(rows, tmp_path / "out" / "RESULTS.md", command="pytest", checkpoint_note="A checkpoint.",
                        budget_note="7 steps", protocol_names={"probe": "linear probe"}, extra={"budget": {"steps": 7}})
    assert "| Welch p |" in text and "| task | linear probe | accuracy |" in text and "**helps**" in text
    assert "| 5 / 5 |" in text and "7 steps |" in text
    assert (tmp_path / "out" / "RESULTS.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "RESULTS.json").read_text())
    assert saved["budget"] == {"steps": 7}
    assert saved["rows"][0]["verdict"] == "helps" and 0 < saved["rows"][0]["p_value"] < ALPHA
    assert saved["rows"][1]["p_value"] is None and saved["rows"][1]["delta_over_sigma"] is None


def test_sslcore_compare_knows_no_modality():
    import sslcore.compare

    source = open(sslcore.compare.__file__).read()
    assert "import textssl" not in source and "from textssl" not in source


# --------------------------------------------------------------------------------------------------
# Per-arm model selection (sslcore.finetune) and label-budget subsets and curves
# --------------------------------------------------------------------------------------------------


def test_grid_settings_are_every_combination_with_readable_names():
    from sslcore.config import ConfigError
    from sslcore.finetune import GridConfig, format_value, setting_tag, setting_text

    assert GridConfig().settings() == [{}] and not GridConfig().searches  # today's single run
    assert not GridConfig(learning_rates=[3e-4]).searches
    grid = GridConfig(learning_rates=[1e-4, 1e-3], warmup_ratios=[0.0, 0.1])
    assert grid.searches and grid.settings() == [
        {"learning_rate": 1e-4, "warmup_ratio": 0.0}, {"learning_rate": 1e-4, "warmup_ratio": 0.1},
        {"learning_rate": 1e-3, "warmup_ratio": 0.0}, {"learning_rate": 1e-3, "warmup_ratio": 0.1}]
    assert [format_value(v) for v in (3e-4, 2.5e-5, 0.1, 750, 0.0)] == ["3e-4", "2.5e-5", "0.1", "750", "0"]
    assert setting_tag({"learning_rate": 3e-4, "warmup_ratio": 0.1, "max_steps": 750}) == "lr3e-4-wu0.1-steps750"
    assert setting_text({"learning_rate": 3e-4}) == "learning_rate=3e-4" and setting_text({}) == "defaults"
    with pytest.raises(ConfigError, match="repeats"):
        GridConfig(learning_rates=[1e-4, 1e-4])
    with pytest.raises(ConfigError, match="warm-up ratios"):
        GridConfig(warmup_ratios=[1.5])


def _fake_arm(validation_by_rate, failing=()):
    """A `train` that 'trains' instantly: each rate's validation score per seed; rates in `failing` diverge."""
    trained, scored = [], []

    def train(setting, seed):
        trained.append((setting["learning_rate"], seed))
        if setting["learning_rate"] in failing:
            return {"failed": "non-finite loss at step 3", "validation": {}}
        return {"validation": {"accuracy": validation_by_rate[setting["learning_rate"]] + 0.01 * seed},
                "model_dir": f"lr{setting['learning_rate']}-seed{seed}"}

    def score_test(setting, seed, run):
        scored.append((setting["learning_rate"], seed, run["model_dir"]))
        return {"accuracy": 0.5 + seed}

    return train, score_test, trained, scored


def test_each_arm_picks_its_own_setting_on_validation_and_scores_test_only_with_it():
    from sslcore.finetune import GridConfig, GridFailedError, select_on_validation

    settings = GridConfig(learning_rates=[1e-4, 1e-3, 1e-1]).settings()
    # The pretrained arm likes a low rate; the scratch arm a higher one; 1e-1 diverges for the scratch arm.
    arms = {"pretrained": ({1e-4: 0.80, 1e-3: 0.70, 1e-1: 0.50}, ()),
            "scratch": ({1e-4: 0.60, 1e-3: 0.75, 1e-1: 0.99}, (1e-1,))}
    chosen = {}
    for name, (by_rate, failing) in arms.items():
        train, score_test, trained, scored = _fake_arm(by_rate, failing)
        selection, runs = select_on_validation(settings, [0, 1], train, score_test, "accuracy")
        assert len(trained) == 6  # every setting, every seed
        chosen[name] = selection.chosen_settings()[0]["learning_rate"]
        # The test split: once per seed, only the chosen setting's models.
        assert scored == [(chosen[name], 0, f"lr{chosen[name]}-seed0"), (chosen[name], 1, f"lr{chosen[name]}-seed1")]
        assert [run["test"]["accuracy"] for run in runs] == [0.5, 1.5]
        assert selection.chosen == [selection.chosen[0]] * 2 and selection.scope == "mean over seeds"
    assert chosen == {"pretrained": 1e-4, "scratch": 1e-3}  # the diverged 0.99 -- never, a seed failed there
    assert "lr 0.1 failed" in selection.describe() and "[lr 1e-3 0.7550]" in selection.describe()
    assert selection.mean_validation()[2] is None and selection.short() == "lr 1e-3"

    # An error rate: the lowest mean wins; a reused run that holds its test scores is not scored again.
    scored = []
    runs_by_rate = {1e-4: {"validation": {"cer": 0.30}, "test": {"cer": 0.31}}, 1e-3: {"validation": {"cer": 0.40}}}
    selection, runs = select_on_validation(settings[:2], [0], lambda s, seed: runs_by_rate[s["learning_rate"]],
                                           lambda *a: scored.append(a), "cer", lower_is_better=True)
    assert selection.chosen == [0] and scored == [] and runs[0]["test"] == {"cer": 0.31}

    train, score_test, _, _ = _fake_arm({}, failing=(1e-4, 1e-3, 1e-1))
    with pytest.raises(GridFailedError, match="every setting of the grid failed.*non-finite"):
        select_on_validation(settings, [0], train, score_test, "accuracy")


def test_label_subsets_are_stratified_nested_and_fixed_per_seed():
    from sslcore.splits import stratified_order, stratified_subset

    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    keys = [f"example-{i}" for i in range(len(labels))]
    shares = {"a": 0.6, "b": 0.3, "c": 0.1}
    for seed in (0, 1):
        subsets = {size: stratified_subset(keys, labels, size, seed) for size in (3, 10, 100, 300, 1000)}
        for size, rows in subsets.items():
            assert len(rows) == len(set(rows)) == size
            counts = {c: sum(labels[i] == c for i in rows) for c in shares}
            assert all(counts[c] >= 1 for c in shares)  # every class from the first rows on
            # Each class within rounding of its share (at most 1 over, at most 3 x share under: 3 classes).
            assert all(-3 * shares[c] - 1e-9 <= counts[c] - size * shares[c] <= 1 + 1e-9 for c in shares), counts
        assert set(subsets[10]) <= set(subsets[100]) <= set(subsets[300]) <= set(subsets[1000])  # nested
        assert stratified_subset(keys, labels, 100, seed) == subsets[100]  # fixed per seed
    assert stratified_subset(keys, labels, 100, 0) != stratified_subset(keys, labels, 100, 1)
    # Order-free: the same keys in another row order pick the same examples.
    order = stratified_order(keys, labels, 0)
    shuffled = list(reversed(range(len(keys))))
    picked = stratified_order([keys[i] for i in shuffled], [labels[i] for i in shuffled], 0)
    assert [keys[shuffled[i]] for i in picked[:50]] == [keys[i] for i in order[:50]]
    with pytest.raises(ValueError, match="a subset of 1001 examples from 1000"):
        stratified_subset(keys, labels, 1001, 0)


@dataclass
class BudgetArm(Arm):
    """An arm with a label budget and a model selection, as textssl/speechssl results carry them."""

    label_budget: int | None = None
    train_examples: list = field(default_factory=list)
    selection: object = None


def test_report_names_each_arms_grid_choice_and_draws_label_curves(tmp_path):
    from sslcore.finetune import Selection

    def selection(kept):
        return Selection(metric="accuracy", lower_is_better=False,
                         settings=[{"learning_rate": 1e-4}, {"learning_rate": 1e-3}],
                         validation=[[0.7, 0.72], [0.6, 0.61]] if kept == 0 else [[0.6, 0.61], [0.7, 0.72]],
                         chosen=[kept, kept])

    rows = []
    for budget, gap in ((100, 0.10), (300, 0.05), (None, 0.01)):
        used = [budget or 8000] * 3
        rows.append(Comparison("task", "full",
                               BudgetArm([0.70 + gap, 0.71 + gap, 0.72 + gap], label_budget=budget,
                                         train_examples=used, selection=selection(0)),
                               BudgetArm([0.70, 0.72, 0.71], label_budget=budget, train_examples=used,
                                         selection=selection(1))))
    text = write_report(rows, tmp_path / "RESULTS.md", command="pytest", checkpoint_note="A checkpoint.",
                        protocol_names={"full": "full fine-tuning"})
    assert "| task | protocol | labels | metric |" in text and "| task | full fine-tuning | 100 | accuracy |" in text
    assert "| all (8000) | accuracy |" in text
    assert "selected on validation (pretrained / scratch) |" in text and "| lr 1e-4 / lr 1e-3 |" in text
    assert ("- task, full fine-tuning, 100 labels -- pretrained: learning_rate=1e-4 (validation accuracy, mean over "
            "2 seed(s): [lr 1e-4 0.7100], lr 1e-3 0.6050); scratch: learning_rate=1e-3") in text
    assert (tmp_path / "RESULTS_labels.png").stat().st_size > 0 and "(RESULTS_labels.png)" in text
    saved = json.loads((tmp_path / "RESULTS.json").read_text())
    assert [r["label_budget"] for r in saved["rows"]] == [100, 300, None]
    # One budget per task: no curve to draw, no link.
    single = write_report(rows[:1], tmp_path / "one" / "RESULTS.md", command="pytest", checkpoint_note="x")
    assert not (tmp_path / "one" / "RESULTS_labels.png").exists() and "_labels.png" not in single
