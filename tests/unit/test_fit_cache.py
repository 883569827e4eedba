"""The runner's fit cache: a restored fit merges bit-identically to a fresh one, options
declared merge-only share a fit, and anything that decides the fit changes its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fit import drive_fit, make_context, tiny_pool

from core.numerics import one_thread
from harness.fit_cache import cached_fit, decode, encode, fit_key
from methods.adamerging import AdaMerging
from methods.base import MergeMethod
from methods.fisher import FisherMerging
from methods.regmean import RegMean, RegMeanPlusPlus
from methods.sens_merging import SensMerging


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool():
    return tiny_pool()


def _cell(method: dict) -> dict:
    return {
        "method": method,
        "model": {"name": "tiny"},
        "task": {"tasks": ["tiny_add", "tiny_color"], "calibration": None},
        "seed": 0,
        "device": "cpu",
        "threads": 1,
    }


def _through_cache(root: Path, cell: dict, outcomes: list):
    def fit(m: MergeMethod, ctx) -> None:
        outcomes.append(cached_fit(m, ctx, cell, root))

    return fit


def test_state_round_trip_keeps_tensors_nesting_and_values():
    state = {
        "coef": torch.tensor([[0.25, 1.0]]),
        "row": {"a.weight": 0, "b": 1},
        "nested": {"x": [torch.arange(3), 1.5, None, "s"], "t": (1, 2)},
    }
    tensors: dict = {}
    back = decode(encode(state, tensors, "state"), tensors)
    assert torch.equal(back["coef"], state["coef"]) and back["row"] == state["row"]
    assert torch.equal(back["nested"]["x"][0], torch.arange(3))
    assert back["nested"]["x"][1:] == [1.5, None, "s"] and back["nested"]["t"] == [1, 2]
    with pytest.raises(TypeError, match=r"state\.bad"):
        encode({"bad": object()}, {}, "state")
    with pytest.raises(TypeError, match="keys must be str"):
        encode({1: 2}, {}, "state")


FITTED = [
    ("adamerging", lambda: AdaMerging(steps=3, batch_size=4, init=0.3)),
    (
        "adamerging_layer_pp",
        lambda: AdaMerging(steps=3, batch_size=4, granularity="layer", pp=True, density=0.5),
    ),
    ("sens_ta", lambda: SensMerging(temperature=0.05, n_calibration=8)),
    ("fisher", lambda: FisherMerging(n_calibration=4)),
    ("regmean", lambda: RegMean(alpha=0.9)),
    ("regmean_pp", lambda: RegMeanPlusPlus(alpha=0.9)),
]


@pytest.mark.parametrize(("label", "make"), FITTED, ids=[f[0] for f in FITTED])
def test_a_restored_fit_merges_bit_identically(tmp_path, pool, label, make):
    cell = _cell({"_target_": label})
    outcomes: list = []
    fit = _through_cache(tmp_path, cell, outcomes)
    fresh = make()
    first = drive_fit(fresh, make_context(pool), pool.base, pool.experts, fit=fit)
    restored = make()
    restored.fit = None  # a restored fit must not call fit
    again = drive_fit(restored, make_context(pool), pool.base, pool.experts, fit=fit)
    assert [o["fit"] for o in outcomes] == ["stored", "reused"]
    assert outcomes[0]["key"] == outcomes[1]["key"]
    for n, t in first.items():
        assert torch.equal(t, again[n]), f"{label}: {n} differs after restoring the fit"
    assert restored.report() == fresh.report()


def test_merge_only_options_share_a_fit_that_matches_a_fresh_one(tmp_path, pool):
    outcomes: list = []
    ta = {"_target_": "sens", "base_method": "task_arithmetic", "scaling": 0.3}
    ties = {"_target_": "sens", "base_method": "ties", "density": 0.3, "scaling": 1.0}
    drive_fit(
        SensMerging(temperature=0.05, n_calibration=8, scaling=0.3),
        make_context(pool),
        pool.base,
        pool.experts,
        fit=_through_cache(tmp_path, _cell(ta), outcomes),
    )
    reused = drive_fit(
        SensMerging(
            base_method="ties", density=0.3, scaling=1.0, temperature=0.05, n_calibration=8
        ),
        make_context(pool),
        pool.base,
        pool.experts,
        fit=_through_cache(tmp_path, _cell(ties), outcomes),
    )
    fresh = drive_fit(
        SensMerging(
            base_method="ties", density=0.3, scaling=1.0, temperature=0.05, n_calibration=8
        ),
        make_context(pool),
        pool.base,
        pool.experts,
    )
    assert [o["fit"] for o in outcomes] == ["stored", "reused"]
    for n, t in fresh.items():
        assert torch.equal(t, reused[n]), n
    # Fisher's floor is applied in the merge: a new eps reuses the Fishers
    outcomes.clear()
    for eps in (1e-6, 1e-3):
        drive_fit(
            FisherMerging(n_calibration=4, eps=eps),
            make_context(pool),
            pool.base,
            pool.experts,
            fit=_through_cache(tmp_path, _cell({"_target_": "f", "eps": eps}), outcomes),
        )
    assert [o["fit"] for o in outcomes] == ["stored", "reused"]


def test_what_decides_the_fit_changes_its_key(pool):
    m = SensMerging(temperature=0.05)
    m.setup(list(pool.experts), 0)
    base = fit_key(_cell({"_target_": "s", "temperature": 0.05}), m, make_context(pool))
    other_option = fit_key(_cell({"_target_": "s", "temperature": 0.5}), m, make_context(pool))
    prompts = make_context(pool, calibration={"tiny_add": ["1+1="], "tiny_color": ["sky is "]})
    other_prompts = fit_key(_cell({"_target_": "s", "temperature": 0.05}), m, prompts)
    seed = fit_key(
        {**_cell({"_target_": "s", "temperature": 0.05}), "seed": 1}, m, make_context(pool)
    )
    merge_only = fit_key(
        _cell({"_target_": "s", "temperature": 0.05, "density": 0.9}), m, make_context(pool)
    )
    swapped = make_context(pool, experts=dict(reversed(list(pool.experts.items()))))
    order = fit_key(_cell({"_target_": "s", "temperature": 0.05}), m, swapped)
    files = fit_key(
        _cell({"_target_": "s", "temperature": 0.05}),
        m,
        make_context(pool),
        {"add": [["/x/model.safetensors", 10, 2]]},
    )
    assert len({base, other_option, other_prompts, seed, order, files}) == 6
    assert merge_only == base


def test_refresh_refits_and_replaces_the_entry(tmp_path, pool):
    outcomes: list = []
    cell = _cell({"_target_": "fisher"})
    for refresh in (False, True, False):
        m = FisherMerging(n_calibration=4)
        m.setup(list(pool.experts), 0)
        outcomes.append(cached_fit(m, make_context(pool), cell, tmp_path, refresh=refresh))
    assert [o["fit"] for o in outcomes] == ["stored", "stored", "reused"]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [outcomes[0]["key"]]


def test_methods_without_fit_state_are_fitted_every_time(tmp_path):
    class Plain(MergeMethod):
        name = "plain"
        needs_data = True
        calls = 0

        def fit(self, ctx):
            Plain.calls += 1

        def merge_tensor(self, name, base, experts):
            return base

    for _ in range(2):
        assert cached_fit(Plain(), None, _cell({}), tmp_path) == {"fit": "uncached"}
    assert Plain.calls == 2 and not any(tmp_path.iterdir())
