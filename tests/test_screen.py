"""Large variants' INT8 candidates screened on a slice of the model before full builds (pipeline/decisions/screen.py),
forced on atto here (the default screens from ConvNeXt-S up): every candidate timed on the slice, the default and
those that can win built in full, the rest named with why, and the report's table."""
import json

import torch

from conftest import GATES_ACCURACY_ONLY, run_cli
from convnext_deploy.pipeline.decisions.screen import SHORTLIST
from convnext_deploy.pipeline.models.convnext import create_model, truncated


def test_the_slice_is_the_models_own_first_blocks_of_each_stage():
    torch.manual_seed(0)
    model = create_model("atto", num_classes=10).eval()
    short = truncated(model, (1, 1, 3, 1))
    own, sliced = model.state_dict(), short.state_dict()
    assert short.depths == (1, 1, 3, 1) and short.dims == model.dims
    assert all(torch.equal(sliced[k], own[k]) for k in sliced)  # every kept tensor is the model's, by name
    assert "stages.2.blocks.2.mlp.fc1.weight" in sliced and "stages.2.blocks.3.mlp.fc1.weight" not in sliced
    assert short(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_screened_deploy_builds_in_full_only_the_candidates_that_can_win(atto_reference, cli_env, tmp_path):
    gates = tmp_path / "gates.toml"
    gates.write_text(GATES_ACCURACY_ONLY)
    out = tmp_path / "run"
    # --calib 300: the smoothed exports (both graph forms) of the session's `deployed`, shared through the cache
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--screen", "--calib", "300", "--eval", "300",
                 "--batches", "1", "--gates", str(gates), "--out", str(out)], cli_env, code=0)
    report = json.loads((out / "report.json").read_text())
    screen, choice = report["recipe_screen"], report["recipe_choice"]
    rows = {r["recipe"]: r for r in screen["candidates"]}
    full = [n for n, r in rows.items() if r["built_in_full"]]
    assert len(rows) == 8 and "ours (default)" in full and len(full) <= 1 + SHORTLIST
    assert {c["recipe"] for c in choice["candidates"]} == set(full)  # what was built is what the choice timed
    fastest = min(r["p50_ms"] for r in rows.values())
    for name, r in rows.items():
        assert r["p50_ms"] > 0 and r["speedup_ci95"][0] <= r["speedup"] <= r["speedup_ci95"][1]
        if not r["built_in_full"]:  # left out: slower than the margin allows, or more that can win than kept
            assert r["p50_ms"] > fastest * (1 + screen["margin"]) or "faster ones are kept" in r["why"], (name, r)
    assert screen["slice_depths"] == [1, 1, 3, 1] and screen["variant_depths"] == [2, 2, 6, 2]
    assert "screen ours (default): p50" in p.stdout
    assert "## INT8 candidates screened" in (out / "report.md").read_text()
