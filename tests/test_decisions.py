"""One decision over every gate: the recipe choice's pick on stub candidates, exact counts at the gates, and the
reasons a failing verdict gives, on recorded CPU descriptions (/proc/cpuinfo of real machines)."""
from pathlib import Path

import numpy as np
import pytest

from convnext_deploy.pipeline.core import gate_file as gates_mod
from convnext_deploy.pipeline.decisions import reasons
from convnext_deploy.pipeline.decisions.recipe import pick
from convnext_deploy.pipeline.measure.machine import cpu_profile, cpuinfo_fields

CPUINFO = Path(__file__).parent / "data" / "cpuinfo"


def row(name, speedup, meets_accuracy, score=0.0, ref_ms=10.0):
    return {"recipe": name, "speedup": speedup, "p50_ms": ref_ms / speedup, "meets_accuracy": meets_accuracy,
            "score": score if not meets_accuracy else min(score, 0.0), "speedup_ci95": [speedup * 0.97, speedup * 1.03]}


def test_the_issue_case_picks_the_fast_candidate_for_repair_not_the_slow_accurate_one():
    """atto on a VNNI CPU: every fast candidate missed the drop gate by an image; quantize_static defaults met it at
    0.62× FP32 and was chosen. Now the fastest candidates go to the fallback first, closest to the gates first."""
    rows = [row("ours (default)", 1.25, False, 1.0), row("w/o smoothing", 1.22, False, 1.0),
            row("S8S8", 1.20, False, 2.0), row("quantize_static defaults", 0.62, True)]
    best, case, backup = pick(rows, {"min_int8_speedup": 1.0})
    assert best["recipe"] == "ours (default)" and "none of them meets the accuracy gates" in case
    assert backup is None  # the accurate one misses the speed gate: nothing to fall back to


def test_the_fastest_candidate_meeting_every_gate_wins():
    rows = [row("a", 1.1, True), row("b", 1.6, True), row("c", 2.0, False, 3.0), row("d", 0.7, True)]
    best, case, backup = pick(rows, {"min_int8_speedup": 1.0})
    assert best["recipe"] == "b" and case == "speed gates met" and backup is None


def test_no_chosen_int8_is_slower_than_its_reference_while_a_faster_candidate_exists():
    """Random stub candidates, any gate values: whenever some candidate is faster than the reference, the pick is."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(1, 8))
        rows = [row(f"r{i}", float(rng.uniform(0.4, 2.5)), bool(rng.random() < 0.5), float(rng.uniform(0, 5)))
                for i in range(k)]
        gates = {"min_int8_speedup": float(rng.choice([0.5, 1.0, 1.5, 3.0]))}
        best, _, backup = pick(rows, gates)
        if any(r["speedup"] > 1.0 for r in rows):
            assert best["speedup"] > 1.0
        meeting = [r for r in rows if r["meets_accuracy"] and r["speedup"] >= gates["min_int8_speedup"]]
        if meeting:  # something meets every gate: the pick, or its backup if the repair fails, is the fastest such
            taken = best if best in meeting else backup
            assert taken in meeting and taken["speedup"] == max(r["speedup"] for r in meeting)
            if best not in meeting:  # repaired first only when it is faster than the reference, the backup not
                assert best["speedup"] > 1.0 >= backup["speedup"]


def test_max_p50_is_a_speed_gate_too():
    rows = [row("fast", 2.0, False, 1.0), row("slow", 1.2, True)]
    assert pick(rows, {"max_p50_ms": 6.0})[0]["recipe"] == "fast"  # 5 ms meets it, 8.3 ms does not
    assert pick(rows, {"max_p50_ms": 9.0})[0]["recipe"] == "slow"  # both meet it: the accurate one


@pytest.mark.parametrize("gate,allowed,images,n,passes", [
    ("max_top1_drop_pp", 0.3, 3, 1000, True), ("max_top1_drop_pp", 0.3, 4, 1000, False),
    ("max_top1_drop_pp", 0.1, 1, 1000, True), ("max_top1_drop_pp", 0.7, 7, 1000, True),
    ("max_top1_drop_pp", 0.3, 27, 9000, True), ("max_top1_drop_pp", 0.3, 28, 9000, False),
    ("max_top1_drop_pp", 0.0, 0, 1000, True), ("max_top1_drop_pp", 0.0, 1, 1000, False),
    ("max_top1_drop_pp", 0.3, -2, 1000, True),
    ("min_agreement", 0.98, 980, 1000, True), ("min_agreement", 0.98, 979, 1000, False),
    ("min_agreement", 0.99, 8910, 9000, True), ("min_agreement", 0.99, 8909, 9000, False),
    ("min_agreement", 0.57, 57, 100, True), ("min_agreement", 0.57, 56, 100, False),
])
def test_accuracy_gates_compare_counts_of_images_exactly(gate, allowed, images, n, passes):
    """In floats, (ref1 - top1) * 100 of 3 images in 1,000 is 0.30000000000000027 > 0.3 and 0.57 * 100 is
    56.99999999999999: the gate compares the images it allows, computed from the gate as written."""
    counts = {"n": n, "drop_images": images, "agree": images}
    figure = images / n * 100 if gate == "max_top1_drop_pp" else images / n
    [v] = gates_mod.check({gate: allowed}, {"top1_drop_pp": figure, "agreement": figure, "counts": counts}, False)
    assert v.passed == passes
    assert f"{images:,} of {n:,} images" in v.line()


def test_accuracy_figures_carry_their_counts():
    from convnext_deploy.pipeline.measure.accuracy import Predictions, accuracy

    labels = np.arange(1000) % 10
    ref = Predictions(np.stack([labels] * 5, 1), labels)
    wrong = labels.copy()
    wrong[:3] = (wrong[:3] + 1) % 10
    a = accuracy(Predictions(np.stack([wrong] * 5, 1), labels), ref)
    assert (a["drop_images"], a["agree"], a["n"], a["correct"]) == (3, 997, 1000, 997)
    figures = {"top1_drop_pp": a["top1_drop_pp"], "agreement": a["agreement"],
               "counts": {k: a[k] for k in ("n", "drop_images", "agree")}}
    assert all(v.passed for v in gates_mod.check({"max_top1_drop_pp": 0.3, "min_agreement": 0.997}, figures, False))


def profile(name: str) -> dict:
    model, flags = cpuinfo_fields((CPUINFO / f"{name}.txt").read_text())
    return cpu_profile(flags, model)


SPEED_ROWS = [{"recipe": "ours (default)", "speedup": 0.93, "speedup_ci95": [0.90, 0.96], "p50_ms": 10.75},
              {"recipe": "reduce_range", "speedup": 0.88, "speedup_ci95": [0.85, 0.91], "p50_ms": 11.36}]


class _Target:
    name, reference = "onnxruntime", "fp32"


@pytest.mark.parametrize("cpu,says,never", [
    ("amd-epyc-zen5-avx512-vnni", ["has VNNI", "AVX-512 VNNI", "float ops"], ["CPU with VNNI", "no VNNI"]),
    ("intel-xeon-sapphire-rapids-amx", ["AMX-INT8", "float ops"], ["CPU with VNNI", "no VNNI"]),
    ("amd-epyc-zen3-avx2", ["no VNNI", "VPMADDUBSW", "AVX-512 VNNI or AVX-VNNI"], ["has VNNI"]),
    ("arm-neoverse-n1-graviton2", ["SDOT/UDOT", "I8MM"], ["VNNI"]),
    ("arm-neoverse-v1-graviton3", ["I8MM (SMMLA)", "float ops"], ["VNNI", "a core with I8MM"]),
    ("arm-cortex-a72-raspberry-pi-4", ["no ARM dot-product", "SDOT"], ["VNNI"]),
])
def test_a_speed_miss_names_the_cpus_real_int8_path_and_what_to_do(cpu, says, never):
    prof = profile(cpu)
    text = reasons.speed_unreachable(_Target, "atto", SPEED_ROWS, {"min_int8_speedup": 1.0}, prof)
    assert prof["cpu"] in text and "'ours (default)'" in text and "0.93× FP32 [0.90, 0.96]" in text
    assert "min_int8_speedup = 0.85" in text and "[target.onnxruntime.variant.atto]" in text  # what to set
    for s in says:
        assert s in text, (s, text)
    for s in never:
        assert s not in text, (s, text)


def test_recorded_cpu_descriptions_give_their_int8_paths():
    assert profile("amd-epyc-zen3-avx2")["u8s8_saturates"] and not profile("amd-epyc-zen3-avx2")["vnni"]
    assert profile("amd-epyc-zen5-avx512-vnni")["vnni"] and profile("amd-epyc-zen5-avx512-vnni")["bf16_native"]
    assert profile("intel-xeon-sapphire-rapids-amx")["int8_path"].startswith("AMX")
    assert profile("arm-neoverse-n1-graviton2")["cpu"] == "ARM Neoverse-N1"
    g3 = profile("arm-neoverse-v1-graviton3")
    assert g3["int8_path"] == "ARM I8MM (SMMLA)" and g3["bf16_path"] == "ARM BF16 (BFMMLA)" and not g3["u8s8_saturates"]
    pi = profile("arm-cortex-a72-raspberry-pi-4")
    assert pi["cpu"] == "Raspberry Pi 4 Model B Rev 1.4 (ARM Cortex-A72)" and "without dot-product" in pi["int8_path"]
    assert not pi["bf16_native"]


def test_an_accuracy_miss_names_the_decision_and_the_options():
    choice = {"chosen": "ours (default)", "candidates": [
        {"recipe": "ours (default)", "meets_accuracy": False, "chosen": True},
        {"recipe": "S8S8", "meets_accuracy": False, "chosen": False}]}
    fallback = {"triggered": True, "message": "fallback stopped (no progress) after 2 layers in float"}
    text = reasons.accuracy_unreachable(choice, fallback, "min_agreement", 100)
    assert "0 of 2 INT8 candidates met the accuracy gates" in text and "no progress" in text
    assert "--control 2000" in text and "min_agreement" in text
    assert "--recipe NAME" not in text  # none met the gates: no candidate to name
    choice["candidates"][1]["meets_accuracy"] = True
    assert "--recipe NAME" in reasons.accuracy_unreachable(choice, fallback, "min_agreement", 100)


def test_a_failed_repair_falls_back_to_the_candidate_meeting_every_gate():
    from convnext_deploy.pipeline.stages.decide import _unrepaired

    choice = {"candidates": [{"recipe": "fast", "chosen": True, "meets_accuracy": False},
                             {"recipe": "accurate", "chosen": False, "meets_accuracy": True}], "backup": "accurate"}
    assert _unrepaired(choice, None)  # no fallback to repair it: take the backup
    assert _unrepaired(choice, {"triggered": True, "met": False})
    assert _unrepaired(choice, {"triggered": True, "met": True, "speed_after": {"meets_speed": False}})
    assert not _unrepaired(choice, {"triggered": True, "met": True, "speed_after": {"meets_speed": True}})
    assert not _unrepaired(choice, {"triggered": False})  # the latency-aware step's artifact met the gates already


def test_a_candidate_that_cannot_win_is_not_judged():
    """Judged fastest first: once a candidate meets every gate, one declared after it or clearly slower than it can
    never be picked (the fastest meeting every gate wins, a tie going to the declared order), so its minutes-long pass
    over the control split is saved; a tie declared before it is still judged."""
    from convnext_deploy.pipeline.decisions.recipe import cannot_win

    import numpy as np

    rng = np.random.default_rng(0)

    def row(name, ms):  # 8 rounds of 5 calls, 5 % noise of their own
        rounds = (ms * (1 + 0.05 * rng.standard_normal((8, 5)))).tolist()
        return {"recipe": name, "p50_ms": ms, "rounds_data": {"ms": rounds, "instance": [0] * 8, "kept": [True] * 8}}

    default, peer, tie, later = row("ours (default)", 10.1), row("peer", 20.0), row("tie", 10.05), row("later", 10.2)
    settled = row("settled", 10.0)
    rows = [default, peer, tie, settled, later]
    assert cannot_win(default, None, rows) is None  # nothing meets every gate yet: judge everything
    assert cannot_win(default, settled, rows) is None  # a tie declared before the settled one: it may win
    assert "clearly slower" in cannot_win(peer, settled, rows)
    assert "declared before it" in cannot_win(later, settled, rows)
