import json

import pytest
import torch
from _drive import drive

from core.options import check_weights_option, resolve_weights
from methods.weight_average import WeightAverage, weight_average

A = torch.tensor([1.0, 2.0, -4.0])
B = torch.tensor([3.0, 0.0, 8.0])
BASE = torch.tensor([100.0, 100.0, 100.0])


def test_resolve_weights_forms():
    assert resolve_weights(None, ["a", "b"]) == [1.0, 1.0]
    assert resolve_weights({"b": 3}, ["a", "b"]) == [1.0, 3.0]
    assert resolve_weights([2, 0.5], ["a", "b"]) == [2.0, 0.5]


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"c": 1.0}, "unknown experts"),
        ([1.0], "has 1 entries"),
        ([1.0, -1.0], ">= 0"),
        ([0.0, 0.0], "all zero"),
    ],
)
def test_resolve_weights_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(weights, ["a", "b"])


@pytest.mark.parametrize(
    ("weights", "match"),
    [("abc", "list in pool order"), ([1.0, float("nan")], "finite"), ({"a": -2}, ">= 0")],
)
def test_weights_option_rejected_early(weights, match):
    with pytest.raises(ValueError, match=match):
        check_weights_option(weights)
    with pytest.raises(ValueError, match="method.weights"):
        WeightAverage(weights=weights)


def test_plain_mean_ignores_base():
    assert torch.equal(weight_average([A, B]), torch.tensor([2.0, 1.0, 2.0]))


def test_weighted_mean():
    # (1*A + 3*B) / 4
    assert torch.allclose(weight_average([A, B], [1, 3]), torch.tensor([2.5, 0.5, 5.0]))


def test_plugin_with_mapping_weights_and_report():
    out = drive(
        WeightAverage(weights={"b": 3.0}),
        {"w": BASE},
        {"a": {"w": A}, "b": {"w": B}},
    )
    assert torch.allclose(out["w"], torch.tensor([2.5, 0.5, 5.0]))


def test_plugin_report_is_json():
    m = WeightAverage(weights=[2.0, 1.0])
    drive(m, {"w": BASE}, {"a": {"w": A}, "b": {"w": B}})
    assert json.loads(json.dumps(m.report())) == {"weights": {"a": 2.0, "b": 1.0}}


def test_plugin_unknown_weight_name_fails_in_setup():
    m = WeightAverage(weights={"zzz": 1.0})
    with pytest.raises(ValueError, match="zzz"):
        m.setup(["a", "b"], 0)


def test_yaml_instantiates():
    from _drive import instantiate_conf

    m = instantiate_conf("weight_average")
    assert isinstance(m, WeightAverage) and m.name == "weight_average"
    assert m.weights_option is None
    m = instantiate_conf("weight_average", weights={"b": 3.0})
    out = drive(m, {"w": BASE}, {"a": {"w": A}, "b": {"w": B}})
    assert torch.allclose(out["w"], torch.tensor([2.5, 0.5, 5.0]))
