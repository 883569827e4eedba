"""The runner's FitContext (what data-dependent methods read) checks members as they are read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.pool import ModelPool, NonFiniteMemberError
from harness.run import _fit_context

NAME = "model.layers.1.self_attn.v_proj.weight"


class NoCalibration:
    """The only part of a method ``_fit_context`` reads."""

    needs_calibration = False


def _with_nan(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state[NAME][1, 2] = float("nan")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _context(base: Path, add: Path, runs: Path):
    pool = ModelPool.from_config(
        {"base": {"path": str(base)}, "experts": {"add": {"path": str(add)}}}
    ).open()
    c = {"device": "cpu", "task": {"tasks": ["tiny_add"]}, "seed": 0, "runs_dir": str(runs)}
    return _fit_context(c, pool, NoCalibration(), None, None, None)


def test_nan_expert_fails_in_load_tensors_and_build_model(tiny_pool, tmp_path):
    bad = _with_nan(tiny_pool["add"], tmp_path / "add")
    ctx = _context(tiny_pool["base"], bad, tmp_path)
    where = rf"pool member 'add' holds NaN/inf in tensor '{NAME}'.*{bad / 'model.safetensors'}"
    with pytest.raises(NonFiniteMemberError, match=where):
        ctx.load_tensors(NAME)
    with pytest.raises(NonFiniteMemberError, match=where):
        ctx.build_model("add")
    base = load_file(tiny_pool["base"] / "model.safetensors")
    assert torch.equal(ctx.build_model("base").state_dict()[NAME], base[NAME])


def test_nan_base_fails_in_build_model(tiny_pool, tmp_path):
    bad = _with_nan(tiny_pool["base"], tmp_path / "base")
    ctx = _context(bad, tiny_pool["add"], tmp_path)
    with pytest.raises(NonFiniteMemberError, match=rf"pool member 'base' .*'{NAME}'"):
        ctx.build_model("base")
