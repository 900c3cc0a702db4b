"""The fallback search and the control-split judge, on fake runners whose predictions are set exactly."""
import numpy as np
import pytest

from pipeline import fallback as fb
from targets.base import Artifact, LabelledData, Runner

N, CLASSES = 2000, 10
LABELS = np.arange(N) % CLASSES


def runner_with_errors(n_wrong: int) -> Runner:
    """Predicts the label except on the first `n_wrong` images (there: the next class)."""
    def run(x: np.ndarray) -> np.ndarray:
        ids = x[:, 0, 0, 0].astype(int)
        pred = LABELS[ids].copy()
        pred[ids < n_wrong] = (pred[ids < n_wrong] + 1) % CLASSES
        return np.eye(CLASSES, dtype=np.float32)[pred]

    return Runner(run, "fake", "cpu", "int8", 1)


CONTROL = LabelledData(np.arange(N, dtype=np.float32).reshape(N, 1, 1, 1) * np.ones((1, 3, 2, 2), np.float32), LABELS)
RANKING = [f"layer{i}" for i in range(12)]


def test_judge_is_the_one_control_comparison():
    ref = fb.judge(runner_with_errors(0), CONTROL)
    assert ref.top1 == 1.0 and ref.agreement == 1.0
    j = fb.judge(runner_with_errors(5), CONTROL, ref)
    assert j.top1 == pytest.approx(1 - 5 / N) and j.drop_pp == pytest.approx(5 / N * 100)
    assert j.agreement == pytest.approx(1 - 5 / N)
    assert j.agreement_low < j.agreement and j.drop_high_pp > j.drop_pp  # decisions read the bounds
    assert set(j.figures()) == {"control_top1", "control_drop_pp", "control_agreement", "control_drop_high_pp",
                                "control_agreement_low"}


def test_judge_batches_by_resolution():
    """A runtime keeps its largest batch's activations: at 224 px the judge feeds 20 images at a time, not 100."""
    from targets.base import inference_batch

    sizes = []
    inner = runner_with_errors(0).run
    runner = Runner(lambda x: sizes.append(len(x)) or inner(x), "fake", "cpu", "int8", 1)
    fb.judge(runner, CONTROL)
    assert sizes == [100] * (N // 100)  # 2 px images
    assert inference_batch(224) == 20 and inference_batch(32) == 100 and inference_batch(4096) == 1


def search(errors_after, cfg, plain_errors=30):
    """errors_after(k): wrong predictions with the first k ranked layers in float."""
    built = []

    def build(layers):
        built.append(list(layers))
        assert layers == RANKING[:len(layers)]  # most sensitive first
        return Artifact("fake", "int8", [], {"float": layers}), runner_with_errors(errors_after(len(layers)))

    plain = (Artifact("fake", "int8", []), runner_with_errors(plain_errors))
    res = fb.search(build, RANKING, CONTROL, fb.judge(runner_with_errors(0), CONTROL), plain, cfg, log=lambda m: None)
    return res, built


def test_search_returns_layers_in_doubling_groups_until_the_bound_is_met():
    cfg = fb.FallbackConfig(max_drop_pp=1.0, min_agreement=None, max_float_layers=8)
    res, built = search(lambda k: {1: 25, 2: 20, 4: 2}.get(k, 0), cfg)  # 30 wrong = 1.5 pp; 4 layers → 0.1 pp
    assert res.met and res.float_layers == RANKING[:4]
    assert [len(b) for b in built] == [1, 2, 4]
    assert [r["float_layers"] for r in res.rounds] == [0, 1, 2, 4]
    assert res.artifact.metadata["float"] == RANKING[:4]


def test_agreement_is_held_as_well_as_the_drop():
    cfg = fb.FallbackConfig(max_drop_pp=5.0, min_agreement=0.99, max_float_layers=8)
    res, built = search(lambda k: 0 if k >= 2 else 25, cfg)  # 1.25 pp is within 5 pp, 98.75 % agreement is not
    assert res.met and len(res.float_layers) == 2 and len(built) == 2


def test_plain_int8_within_the_bound_builds_nothing():
    res, built = search(lambda k: 0, fb.FallbackConfig(max_drop_pp=5.0), plain_errors=2)
    assert res.met and res.float_layers == [] and built == [] and "plain INT8 meets the bound" in res.message


def test_budget_stops_the_search_and_keeps_the_best_candidate():
    cfg = fb.FallbackConfig(max_drop_pp=0.1, max_float_layers=2)
    res, built = search(lambda k: {1: 6, 2: 8}[k], cfg)  # never meets it; 1 layer is the best seen
    assert not res.met and [len(b) for b in built] == [1, 2]
    assert res.float_layers == RANKING[:1]
    assert "2 layers in float (budget --fallback-max-layers 2)" in res.message


def test_a_figure_within_sampling_error_of_a_gate_is_handled_on_the_safe_side():
    """A control split of 1,000 images at 98.40 % agreement beside a 98 % gate: the point figure passes, but the
    evaluation split measured 97.87 % on such a model. The decision reads the bound, so the fallback starts."""
    control = LabelledData(CONTROL.images[:1000], LABELS[:1000])
    cfg = fb.FallbackConfig(max_drop_pp=5.0, min_agreement=0.98)
    j = fb.judge(runner_with_errors(16), control, fb.judge(runner_with_errors(0), control))
    assert j.agreement == pytest.approx(0.984) and j.agreement >= cfg.min_agreement
    assert j.agreement_low < 0.98 and fb.misses(cfg, j.figures())
    far = fb.judge(runner_with_errors(5), control, fb.judge(runner_with_errors(0), control))  # 99.5 %: clear
    assert not fb.misses(cfg, far.figures())


def test_the_bounds_cover_the_truth_as_often_as_they_say():
    """Wilson's lower bound and the paired drop bound, on many simulated control splits of a model whose true
    agreement is 98.2 % and true drop 0.4 pp: each bound is on the wrong side of the truth in about 5 % of them."""
    rng = np.random.default_rng(0)
    low_wrong = high_wrong = 0
    trials, n = 400, 1000
    for _ in range(trials):
        ref_right = rng.random(n) < 0.9
        flip = rng.random(n) < 0.018  # disagreements: mostly right → wrong (b), some wrong → right (c)
        test_right = np.where(flip, ~ref_right, ref_right)
        test_right &= ~((rng.random(n) < 0.004) & ref_right & ~flip)  # extra b to make the drop positive
        agree = ~flip & ~(ref_right & ~test_right & ~flip)
        low_wrong += fb.wilson_low(int(agree.sum()), n) > 1 - 0.018 - 0.004 * 0.9 * (1 - 0.018)
        b_true = 0.9 * 0.018 + 0.9 * (1 - 0.018) * 0.004
        c_true = 0.1 * 0.018
        high_wrong += fb.paired_drop_high(ref_right, test_right) < (b_true - c_true) * 100
    assert low_wrong / trials < 0.09 and high_wrong / trials < 0.09


def test_the_control_split_size_the_drop_gate_needs():
    # at 0.5 % of images flipped by INT8, a bound within 0.3 pp of the point drop needs ~1,500 images; 0.15 pp ~6,000
    assert 1400 < fb.control_size_needed(0.3) < 1600 and 5900 < fb.control_size_needed(0.15) < 6100


def test_score_and_misses_agree():
    cfg = fb.FallbackConfig(max_drop_pp=0.5, min_agreement=0.99)
    for high, low in [(0.4, 0.995), (0.6, 0.995), (0.4, 0.985), (0.5, 0.99)]:
        f = {"control_drop_high_pp": high, "control_agreement_low": low}
        assert fb.misses(cfg, f) == (fb.score(cfg, f) > 0) == (high > 0.5 or low < 0.99)


def test_a_zero_drop_gate_is_held_on_its_bound():
    """`max_top1_drop_pp = 0` is a valid gate: no control split can shrink the sampling error to zero, so it stays
    held on the bound (the fallback then runs to its budget), never a division by zero."""
    plain = {"control_drop_pp": 0.1, "control_drop_high_pp": 0.6, "control_agreement": 0.99}
    cfg, note = fb.resolve_drop(fb.FallbackConfig(0.0), plain)
    assert cfg.drop_bound and note is None
    cfg, note = fb.resolve_drop(fb.FallbackConfig(0.3), plain)  # ±0.5 pp > half the gate: decided on the point
    assert not cfg.drop_bound and "control images" in note
