"""The contract every ``conf/method/*.yaml`` keeps: Hydra instantiates it into a
``MergeMethod``; a data-free one merges a small two-expert pool (statistics passes
included) into finite tensors of the base's shapes and dtypes, twice bit-identically, with
a JSON-serialisable report. Data-dependent methods are instantiated here and merged by
their own tests (they need a model and calibration data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _drive import drive, instantiate_overrides

from methods.base import MergeMethod

CONF = Path(__file__).resolve().parents[2] / "conf"
CONFS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def _method(name: str) -> MergeMethod:
    """``method=<name>`` composed as ``mergelab`` composes it (defaults lists included)."""
    return instantiate_overrides([f"method={name}"])


def _pool() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (8, 6), "model.norm.weight": (6,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    experts = {
        e: {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        for e in ("math", "code")
    }
    return base, experts


def test_every_method_config_is_covered():
    assert {
        "ties",
        "slerp",
        "model_stock",
        "breadcrumbs",
        "consensus_ta",
        "della",
        "della_linear",
        "sce",
        "tsv_merge",
        "iso_c",
        "iso_cts",
        "lines",
        "karcher",
        "emr",
        "fisher",
        "regmean",
        "regmean_pp",
        "task_vector",
    } <= set(CONFS)


@pytest.mark.parametrize("name", CONFS)
def test_method_config_keeps_the_contract(name):
    method = _method(name)
    assert isinstance(method, MergeMethod)
    if method.needs_data:
        return
    base, experts = _pool()
    first = drive(method, base, experts, seed=3)
    again = drive(_method(name), base, experts, seed=3)
    for n, t in base.items():
        assert first[n].shape == t.shape and first[n].dtype == t.dtype, n
        assert torch.isfinite(first[n]).all(), n
        assert torch.equal(first[n], again[n]), f"{name} is not deterministic on {n}"
    json.dumps(method.report())
