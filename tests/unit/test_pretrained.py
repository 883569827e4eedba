import pytest
import torch
from _drive import drive

from methods.pretrained import Pretrained

BASE = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([5.0])}
POOL = {
    "math": {"w": torch.tensor([2.0, 3.0]), "b": torch.tensor([6.0])},
    "code": {"w": torch.tensor([4.0, 5.0]), "b": torch.tensor([7.0])},
}


@pytest.mark.parametrize("model", ["base", "math", "code"])
def test_returns_named_member(model):
    out = drive(Pretrained(model=model), BASE, POOL)
    want = BASE if model == "base" else POOL[model]
    assert all(torch.equal(out[k], want[k]) for k in BASE)


def test_default_is_base_and_report():
    m = Pretrained()
    out = drive(m, BASE, POOL)
    assert torch.equal(out["w"], BASE["w"])
    assert m.report() == {"model": "base"}


def test_unknown_model_lists_pool():
    m = Pretrained(model="chat")
    with pytest.raises(ValueError, match=r"\['base', 'math', 'code'\].*'chat'"):
        m.setup(["math", "code"], 0)


def test_expert_named_base_is_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        Pretrained(model="base").setup(["base", "code"], 0)


@pytest.mark.parametrize("bad", ["", None, 3])
def test_bad_model_type(bad):
    with pytest.raises(ValueError, match="method.model"):
        Pretrained(model=bad)


def test_yaml_instantiates():
    from _drive import instantiate_conf

    m = instantiate_conf("pretrained")
    assert isinstance(m, Pretrained) and m.name == "pretrained" and m.model == "base"
    m = instantiate_conf("pretrained", model="code")
    assert torch.equal(drive(m, BASE, POOL)["w"], POOL["code"]["w"])
