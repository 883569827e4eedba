"""evals.calibration: unlabelled prompts from lm-eval tasks, split preference order."""

from __future__ import annotations

import pytest

from evals.calibration import calibration_prompts
from evals.lm_eval import validate_tasks
from tests.helpers.tiny_lm import TINY_GEN_DOCS, TINY_MC_DOCS, write_tiny_tasks


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    return validate_tasks(["tiny_mc", "tiny_gen"], write_tiny_tasks(tmp_path_factory.mktemp("t")))


def test_first_available_split_of_a_preference_list(tm):
    got = calibration_prompts(["tiny_mc", "tiny_gen"], tm, split=["validation", "test"], n=100)
    assert set(got) == {"tiny_mc", "tiny_gen"}
    assert len(got["tiny_mc"]) == len(TINY_MC_DOCS) and len(got["tiny_gen"]) == len(TINY_GEN_DOCS)
    assert got == calibration_prompts(["tiny_mc", "tiny_gen"], tm, split="test", n=100)


def test_seeded_subsample(tm):
    a = calibration_prompts(["tiny_mc"], tm, split="test", n=2, seed=0)
    assert len(a["tiny_mc"]) == 2
    assert a == calibration_prompts(["tiny_mc"], tm, split="test", n=2, seed=0)


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ("validation", r"no validation docs .*it has \['test'\]"),
        (["train", "validation"], "no train or validation docs"),
        ("dev", "unknown"),
        ([], "unknown"),
    ],
)
def test_missing_or_unknown_split_is_named(tm, split, match):
    with pytest.raises(ValueError, match=match):
        calibration_prompts(["tiny_mc"], tm, split=split)
