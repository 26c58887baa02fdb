"""sslcore.compare: what a pretrained-vs-scratch row may claim, Welch's test, and the written report."""

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
