"""EMR-Merging on hand-computed tensors and through its Hydra config."""

from __future__ import annotations

import pytest
import torch
from _drive import drive, instantiate_conf

from methods.emr import EMRMerging, emr_masks, emr_unify


def test_elect_takes_the_largest_agreeing_magnitude_with_the_summed_sign():
    taus = [torch.tensor([3.0, -1.0, 2.0, 1.0]), torch.tensor([-1.0, -4.0, 5.0, -1.0])]
    # Σ = [2, -5, 7, 0]: signs +, -, +, none; agreeing maxima 3, 4, 5, —
    uni = emr_unify(taus)
    assert torch.equal(uni, torch.tensor([3.0, -4.0, 5.0, 0.0]))
    masks = emr_masks(taus, uni)
    assert masks[0].tolist() == [True, True, True, False]
    assert masks[1].tolist() == [False, True, True, False]


def _pool():
    base = {"w": torch.zeros(4), "b": torch.tensor([1.0, 1.0])}
    experts = {
        "math": {"w": torch.tensor([3.0, -1.0, 2.0, 1.0]), "b": torch.tensor([2.0, 1.0])},
        "code": {"w": torch.tensor([-1.0, -4.0, 5.0, -1.0]), "b": torch.tensor([1.0, 3.0])},
    }
    return base, experts


def test_each_task_gets_its_mask_and_whole_model_rescaler():
    base, experts = _pool()
    # τ_b: math [1, 0], code [0, 2] → τ_uni_b = [1, 2]; masks math [T, F], code [F, T]
    # math: Σ|τ| = 7 + 1 = 8; Σ|M⊙τ_uni| = (3+4+5) + 1 = 13 → λ = 8/13
    # code: Σ|τ| = 11 + 2 = 13; Σ|M⊙τ_uni| = (4+5) + 2 = 11 → λ = 13/11
    math = instantiate_conf("emr", task="math")
    out = drive(math, base, experts)
    lam = 8 / 13
    assert torch.allclose(out["w"], lam * torch.tensor([3.0, -4.0, 5.0, 0.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0 + lam, 1.0]))
    assert math.report()["rescalers"] == pytest.approx({"math": 8 / 13, "code": 13 / 11})
    code = drive(instantiate_conf("emr", task="code"), base, experts)
    assert torch.allclose(code["w"], 13 / 11 * torch.tensor([0.0, -4.0, 5.0, 0.0]))
    first = instantiate_conf("emr")
    assert torch.equal(drive(first, base, experts)["w"], out["w"])
    assert first.report()["task"] == "math"


def test_official_rescale_sums_per_tensor_means():
    base, experts = _pool()
    m = instantiate_conf("emr", task="math", rescale="official")
    drive(m, base, experts)
    # math: mean|τ_w| = 7/4, mean|τ_b| = 1/2; kept: 12/4, 1/2 → (7/4+1/2)/(3+1/2)
    assert m.report()["rescalers"]["math"] == pytest.approx((7 / 4 + 1 / 2) / (3 + 1 / 2))


def test_a_task_that_keeps_nothing_emits_the_base_and_says_so():
    base = {"w": torch.zeros(2)}
    experts = {"a": {"w": torch.tensor([2.0, 2.0])}, "b": {"w": torch.tensor([-1.0, -1.0])}}
    m = instantiate_conf("emr", task="b")
    assert torch.equal(drive(m, base, experts)["w"], torch.zeros(2))
    assert m.report()["emits_base"] == ["b"] and m.report()["rescalers"]["b"] == 1.0


def test_bad_options_name_the_option():
    base, experts = _pool()
    with pytest.raises(ValueError, match="method.task='poetry'.*math"):
        drive(instantiate_conf("emr", task="poetry"), base, experts)
    with pytest.raises(ValueError, match="method.rescale"):
        EMRMerging(rescale="mean")
