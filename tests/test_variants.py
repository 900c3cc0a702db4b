import pytest
import torch

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.convnext import count_parameters, create_model
from convnext_deploy.pipeline.models.variants import VARIANTS, get_variant

PUBLISHED_PARAMS = {
    "t": 28_589_128, "s": 50_223_688, "b": 88_591_464, "l": 197_767_336, "xl": 350_196_968,
    "atto": 3_695_520, "femto": 5_217_784, "pico": 9_045_672, "nano": 15_593_560,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):  # no memory for L/XL weights
        model = create_model(name, num_classes=1000)
    assert count_parameters(model) == PUBLISHED_PARAMS[name]
    assert VARIANTS[name].params_1k == PUBLISHED_PARAMS[name]


def test_table_holds_all_nine_with_published_accuracy():
    assert set(VARIANTS) == set(PUBLISHED_PARAMS)
    assert {k: VARIANTS[k].imagenet_top1 for k in ("t", "s", "b", "l")} == {"t": 82.1, "s": 83.1, "b": 83.8, "l": 84.3}
    assert VARIANTS["xl"].imagenet_top1 is None and "22k" in VARIANTS["xl"].imagenet_note


def test_aliases_and_unknown_variant():
    assert get_variant("tiny").name == "t" and get_variant("ConvNeXt-B").name == "b"
    with pytest.raises(UserError, match="unknown variant 'huge'.*atto"):
        get_variant("huge")


def test_configurable_classes_channels_and_stochastic_depth():
    model = create_model("atto", num_classes=7, in_chans=1, drop_path_rate=0.3)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    # stochastic depth only acts in training
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(model(x), model(x))


def test_head_init_scale_scales_the_initialised_head_only():
    """The official fine-tuning recipe scales the fresh head (weights and bias) by head_init_scale; building with it
    must not raise (an in-place scale of a leaf that requires grad) and must leave the rest of the model as it is."""
    from convnext_deploy.pipeline.models.convnext import ConvNeXt

    def build(scale):
        torch.manual_seed(0)
        return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5, head_init_scale=scale)

    plain, scaled = build(1.0), build(0.25)
    torch.testing.assert_close(scaled.head.fc.weight, plain.head.fc.weight * 0.25)
    torch.testing.assert_close(scaled.head.fc.bias, plain.head.fc.bias * 0.25)
    assert scaled.head.fc.weight.requires_grad and scaled.head.fc.bias.requires_grad
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters()):
        if not name.startswith("head.fc"):
            torch.testing.assert_close(a, b, msg=name)
