import pytest
import torch
from _drive import drive

from methods.task_arithmetic import TaskArithmetic, task_arithmetic

BASE = torch.tensor([1.0, 1.0, 1.0])
A = torch.tensor([2.0, 1.0, 0.0])  # τa = [1, 0, -1]
B = torch.tensor([1.0, 5.0, 3.0])  # τb = [0, 4, 2]


def test_unweighted():
    # 1 + 0.5 * [1, 4, 1]
    out = task_arithmetic(BASE, [A, B], scaling=0.5)
    assert torch.allclose(out, torch.tensor([1.5, 3.0, 1.5]))


def test_default_scaling_is_0_3():
    assert torch.allclose(task_arithmetic(BASE, [A, B]), torch.tensor([1.3, 2.2, 1.3]))


def test_weighted_not_normalised():
    # 1 + 1.0 * (2*τa + 0.5*τb) = 1 + [2, 2, -1]
    out = task_arithmetic(BASE, [A, B], scaling=1.0, weights=[2.0, 0.5])
    assert torch.allclose(out, torch.tensor([3.0, 3.0, 0.0]))


def test_plugin_defaults_and_weights():
    pool = {"a": {"w": A}, "b": {"w": B}}
    out = drive(TaskArithmetic(), {"w": BASE}, pool)
    assert torch.allclose(out["w"], torch.tensor([1.3, 2.2, 1.3]))
    out = drive(TaskArithmetic(scaling=1.0, weights={"a": 2.0, "b": 0.5}), {"w": BASE}, pool)
    assert torch.allclose(out["w"], torch.tensor([3.0, 3.0, 0.0]))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), "x"])
def test_bad_scaling(bad):
    with pytest.raises(ValueError, match="method.scaling must be a finite number"):
        TaskArithmetic(scaling=bad)


def test_yaml_instantiates():
    from _drive import instantiate_conf

    m = instantiate_conf("task_arithmetic")
    assert isinstance(m, TaskArithmetic) and m.name == "task_arithmetic"
    assert m.coefficients.scaling == 0.3 and m.coefficients.weights_option is None
