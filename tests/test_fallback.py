"""The fallback search and the control-split judge, on fake runners whose predictions are set exactly."""
import numpy as np
import pytest

from convnext_deploy.pipeline.decisions import fallback as fb
from convnext_deploy.pipeline.decisions.judge import (
    AccuracyGates,
    Evidence,
    assess,
    gate_states,
    judge,
    paired_drop_interval,
    wilson,
)
from convnext_deploy.targets.base import Artifact, LabelledData, Runner

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
    ref = judge(runner_with_errors(0), CONTROL)
    assert ref.top1 == 1.0 and ref.agreement == 1.0
    j = judge(runner_with_errors(5), CONTROL, ref)
    assert (j.correct, j.drop_images, j.agree, j.worse, j.better) == (N - 5, 5, N - 5, 5, 0)
    assert j.top1 == pytest.approx(1 - 5 / N) and j.drop_pp == pytest.approx(5 / N * 100)
    f = j.figures()
    assert f["control_agreement_low"] < j.agreement < f["control_agreement_high"]
    assert f["control_drop_low_pp"] < j.drop_pp < f["control_drop_high_pp"]  # decisions read the bounds
    assert (f["control_n"], f["control_drop_images"], f["control_disagreements"]) == (N, 5, 5)


def test_judge_batches_by_resolution():
    """A runtime keeps its largest batch's activations: at 224 px the judge feeds 20 images at a time, not 100."""
    from convnext_deploy.targets.base import inference_batch

    sizes = []
    inner = runner_with_errors(0).run
    runner = Runner(lambda x: sizes.append(len(x)) or inner(x), "fake", "cpu", "int8", 1)
    judge(runner, CONTROL)
    assert sizes == [100] * (N // 100)  # 2 px images
    assert inference_batch(224) == 5 and inference_batch(32) == 100 and inference_batch(4096) == 1


def search(errors_after, cfg, plain_errors=30, control=CONTROL):
    """errors_after(k): wrong predictions with the first k ranked layers in float."""
    built = []

    def build(layers):
        built.append(list(layers))
        assert layers == RANKING[:len(layers)]  # most sensitive first
        return Artifact("fake", "int8", [], {"float": layers}), runner_with_errors(errors_after(len(layers)))

    plain = (Artifact("fake", "int8", []), runner_with_errors(plain_errors))
    ev = Evidence(runner_with_errors(0), control, log=lambda m: None)
    res = fb.search(build, RANKING, ev, plain, cfg, log=lambda m: None)
    return res, built


def gates(drop=None, agreement=None, **kw):
    return fb.FallbackConfig(AccuracyGates(drop, agreement), **kw)


def test_search_returns_layers_in_doubling_groups_until_the_gates_are_met():
    cfg = gates(1.0, max_float_layers=8)
    res, built = search(lambda k: {1: 25, 2: 24, 4: 2}.get(k, 0), cfg)  # 30 wrong = 1.5 pp; 4 layers → 0.1 pp
    assert res.met and res.float_layers == RANKING[:4]
    assert [len(b) for b in built] == [1, 2, 4]
    assert [r["float_layers"] for r in res.rounds] == [0, 1, 2, 4]
    assert res.artifact.metadata["float"] == RANKING[:4]


def test_agreement_is_held_as_well_as_the_drop():
    cfg = gates(5.0, 0.99, max_float_layers=8)
    res, built = search(lambda k: 0 if k >= 2 else 25, cfg)  # 1.25 pp is within 5 pp, 98.75 % agreement is not
    assert res.met and len(res.float_layers) == 2 and len(built) == 2


def test_plain_int8_within_the_gates_builds_nothing():
    res, built = search(lambda k: 0, gates(5.0), plain_errors=2)
    assert res.met and res.float_layers == [] and built == [] and "plain INT8 meets the accuracy gates" in res.message


def test_budget_stops_the_search_and_keeps_the_best_candidate():
    cfg = gates(0.1, max_float_layers=2)
    res, built = search(lambda k: {1: 6, 2: 8}[k], cfg)  # never meets it; 1 layer is the best seen
    assert not res.met and [len(b) for b in built] == [1, 2] and res.stopped == "budget"
    assert res.float_layers == RANKING[:1]
    assert "2 layers in float (budget --fallback-max-layers 2)" in res.message


def test_search_stops_early_when_floating_layers_does_not_help():
    """Two rebuilds in a row that bring the figures no closer: the error is not in a few layers, and rebuilding
    4 and 8 layers would only cost time (the T case: 8 layers floated, agreement unchanged)."""
    res, built = search(lambda k: 30, gates(0.3, 0.98, max_float_layers=8))
    assert not res.met and res.stopped == "no progress" and [len(b) for b in built] == [1, 2]
    assert res.float_layers == [] and "not in a few layers" in res.message


def test_a_drop_of_exactly_the_gate_passes_and_one_image_more_fails():
    """1,000 control images, 0.3 pp gate: 3 images lost is the gate exactly (the float (ref1 - top1) * 100 gives
    0.30000000000000027 and once failed it); 4 is one image over. No more images exist: the counts decide."""
    control = LabelledData(CONTROL.images[:1000], LABELS[:1000])
    ev = Evidence(runner_with_errors(0), control, log=lambda m: None)
    g = AccuracyGates(0.3, None)
    at = assess(runner_with_errors(3), ev, g)
    over = assess(runner_with_errors(4), ev, g)
    assert at.passed and at.judged.drop_images == 3 and at.gates["max_top1_drop_pp"]["allowed_images"] == 3
    assert not over.passed and over.judged.drop_images == 4
    assert at.rule == over.rule == "counts at the boundary"


def test_agreement_exactly_at_the_gate_passes_and_one_disagreement_more_fails():
    control = LabelledData(CONTROL.images[:1000], LABELS[:1000])
    ev = Evidence(runner_with_errors(0), control, log=lambda m: None)
    g = AccuracyGates(None, 0.98)
    assert assess(runner_with_errors(20), ev, g).passed  # 980 of 1,000
    assert not assess(runner_with_errors(21), ev, g).passed


def test_a_boundary_draws_more_control_images_and_decides_on_them():
    """16 of 1,000 disagreeing beside a 98 % gate is within sampling noise (Wilson 97.6–99.0 %): more images are drawn
    once and the bounds read again; a clear candidate never asks for them."""
    control = LabelledData(CONTROL.images[:1000], LABELS[:1000])
    draws = []

    def more(seconds_per_image):
        assert seconds_per_image > 0  # the reference's pass over the control split, timed
        draws.append(1)
        return LabelledData(CONTROL.images[1000:], LABELS[1000:])

    ev = Evidence(runner_with_errors(0), control, more, log=lambda m: None)
    g = AccuracyGates(None, 0.98)
    clear = assess(runner_with_errors(2), ev, g)
    assert clear.passed and clear.rule == "bounds" and draws == []
    near = assess(runner_with_errors(16), ev, g)  # on 2,000 images: 16 wrong is 99.2 %, low bound 98.8 %: passes
    assert draws == [1] and near.extended and near.judged.n == N and near.passed
    assert near.rule == "bounds on the extended split"
    assess(runner_with_errors(17), ev, g)
    assert draws == [1]  # drawn once per deploy
    assert ev.describe()["extended_n"] == N


def test_a_figure_within_sampling_error_of_a_gate_is_not_decided_by_its_bounds_alone():
    """A control split of 1,000 images at 98.40 % agreement beside a 98 % gate: the point figure passes, but the
    evaluation split measured 97.87 % on such a model; the Wilson interval straddles the gate: a boundary."""
    control = LabelledData(CONTROL.images[:1000], LABELS[:1000])
    j = judge(runner_with_errors(16), control, judge(runner_with_errors(0), control))
    states = gate_states(AccuracyGates(5.0, 0.98), j)
    assert states["min_agreement"]["state"] == "boundary" and states["max_top1_drop_pp"]["state"] == "pass"
    far = judge(runner_with_errors(5), control, judge(runner_with_errors(0), control))  # 99.5 %: clear
    assert gate_states(AccuracyGates(5.0, 0.98), far)["min_agreement"]["state"] == "pass"
    bad = judge(runner_with_errors(60), control, judge(runner_with_errors(0), control))  # 94 %: clearly below
    assert gate_states(AccuracyGates(5.0, 0.98), bad)["min_agreement"]["state"] == "fail"


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
        low_wrong += wilson(int(agree.sum()), n)[0] > 1 - 0.018 - 0.004 * 0.9 * (1 - 0.018)
        b_true = 0.9 * 0.018 + 0.9 * (1 - 0.018) * 0.004
        c_true = 0.1 * 0.018
        worse, better = int((ref_right & ~test_right).sum()), int((~ref_right & test_right).sum())
        high_wrong += paired_drop_interval(worse, better, n)[1] < (b_true - c_true) * 100
    assert low_wrong / trials < 0.09 and high_wrong / trials < 0.09


def test_a_zero_drop_gate_is_a_valid_gate():
    """`max_top1_drop_pp = 0` allows no image: no division by zero, and one image lost fails."""
    control = LabelledData(CONTROL.images[:1000], LABELS[:1000])
    ev = Evidence(runner_with_errors(0), control, log=lambda m: None)
    assert assess(runner_with_errors(0), ev, AccuracyGates(0.0, None)).passed
    assert not assess(runner_with_errors(1), ev, AccuracyGates(0.0, None)).passed


def test_the_minutes_budget_counts_the_ranking_before_the_search():
    """`--fallback-max-minutes` bounds the whole fallback: a ranking that spent it leaves no rebuild."""
    import time

    res, built = search(lambda k: 0, gates(1.0, max_minutes=1.0, started=time.monotonic() - 61))
    assert not res.met and built == [] and res.stopped == "budget"
    assert "the ranking included" in res.message
    res, built = search(lambda k: 0, gates(1.0, max_minutes=1.0, started=time.monotonic()))
    assert res.met and len(built) == 1
