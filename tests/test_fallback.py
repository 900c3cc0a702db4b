"""The fallback search and the control-split judge, on fake runners whose predictions are set exactly."""
import numpy as np
import pytest

from pipeline import fallback as fb
from targets.base import Artifact, LabelledData, Runner

N, CLASSES = 200, 10
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
    j = fb.judge(runner_with_errors(5), CONTROL, ref, batch=7)  # batches that do not divide N
    assert j.top1 == pytest.approx(1 - 5 / N) and j.drop_pp == pytest.approx(5 / N * 100)
    assert j.agreement == pytest.approx(1 - 5 / N)
    assert j.figures() == {"control_top1": j.top1, "control_drop_pp": j.drop_pp, "control_agreement": j.agreement}


def search(errors_after, cfg, plain_errors=6):
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
    res, built = search(lambda k: {1: 5, 2: 4, 4: 1}.get(k, 0), cfg)  # 6 wrong = 3 pp; 4 layers → 0.5 pp
    assert res.met and res.float_layers == RANKING[:4]
    assert [len(b) for b in built] == [1, 2, 4]
    assert [r["float_layers"] for r in res.rounds] == [0, 1, 2, 4]
    assert res.artifact.metadata["float"] == RANKING[:4]


def test_agreement_is_held_as_well_as_the_drop():
    cfg = fb.FallbackConfig(max_drop_pp=5.0, min_agreement=0.99, max_float_layers=8)
    res, built = search(lambda k: 0 if k >= 2 else 4, cfg)  # 3 pp drop is within 5 pp, 97 % agreement is not
    assert res.met and len(res.float_layers) == 2 and len(built) == 2


def test_plain_int8_within_the_bound_builds_nothing():
    res, built = search(lambda k: 0, fb.FallbackConfig(max_drop_pp=5.0), plain_errors=2)
    assert res.met and res.float_layers == [] and built == [] and "plain INT8 meets the bound" in res.message


def test_budget_stops_the_search_and_keeps_the_best_candidate():
    cfg = fb.FallbackConfig(max_drop_pp=0.1, max_float_layers=2)
    res, built = search(lambda k: {1: 3, 2: 4}[k], cfg)  # never meets it; 1 layer is the best seen
    assert not res.met and [len(b) for b in built] == [1, 2]
    assert res.float_layers == RANKING[:1]
    assert "2 layers in float (budget --fallback-max-layers 2)" in res.message


def test_score_and_misses_agree():
    cfg = fb.FallbackConfig(max_drop_pp=0.5, min_agreement=0.99)
    for drop, agree in [(0.4, 0.995), (0.6, 0.995), (0.4, 0.985), (0.5, 0.99)]:
        assert fb.misses(cfg, drop, agree) == (fb.score(cfg, drop, agree) > 0)
