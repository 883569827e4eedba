"""evals.lm_eval on a tiny random Llama and tiny local lm-eval tasks (no network, CPU)."""

from __future__ import annotations

import json
import math
import random
import socket
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.tasks import TaskManager

from evals.lm_eval import (
    EvalResult,
    _check_limit,
    _parse_row,
    _resolvable,
    evaluate,
    metric_key,
    validate_tasks,
    write_samples_jsonl,
)
from tests.helpers.tiny_lm import (
    TINY_GEN_DOCS,
    TINY_MC_DOCS,
    make_tiny_lm,
    save_tiny_lm,
    write_tiny_tasks,
)

N_MC, N_GEN = len(TINY_MC_DOCS), len(TINY_GEN_DOCS)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny_tasks"))


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_lm(seed=0)


@pytest.fixture(scope="module")
def tm(tasks_dir) -> TaskManager:
    return validate_tasks(["tiny_mc", "tiny_gen", "tiny_group"], tasks_dir)


@pytest.fixture(scope="module")
def no_network():
    """Fail loudly on any attempt to resolve or connect (hub calls would show up here)."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield attempts


def _run(tiny, tm, tasks, **kwargs) -> EvalResult:
    model, tokenizer = tiny
    return evaluate(model, tokenizer, tasks, task_manager=tm, batch_size=4, **kwargs)


@pytest.fixture(scope="module")
def result(tiny, tm, no_network) -> EvalResult:
    res = _run(tiny, tm, ["tiny_mc", "tiny_gen"])
    assert no_network == [], f"evaluate tried to reach the network: {no_network}"
    return res


def _lls(samples: list[dict]) -> list[float]:
    """Choice loglikelihoods of multiple_choice samples, flattened over docs."""
    return [resp[0] for s in samples for resp in s["filtered_resps"]]


# --------------------------------------------------------------------------- validate_tasks


def test_validate_tasks_local_names_index_only_include_path(tasks_dir):
    tm = validate_tasks(["tiny_mc", "tiny_group", "tiny_mc_tag"], str(tasks_dir))
    assert isinstance(tm, TaskManager)
    assert {"tiny_mc", "tiny_mc_alt", "tiny_gen", "tiny_group", "tiny_mc_tag"} <= set(tm.all_tasks)
    assert "arc_easy" not in tm.task_index  # cheap path: built-in tasks were not indexed


def test_validate_tasks_rejects_typo_with_close_match(tasks_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiny_broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ValueError) as info:
        validate_tasks(["arc_easy", "tiny_mcc", "tiny_broken"], [tasks_dir, broken])
    msg = str(info.value)
    assert "'tiny_mcc'" in msg and "tiny_mc" in msg.split("'tiny_mcc'", 1)[1].splitlines()[0]
    assert "'tiny_broken'" in msg
    assert "'arc_easy'" not in msg  # built-in names are known
    assert "include_path" in msg and "spelling" in msg
    assert "tiny_broken.yaml" in msg  # lm-eval skips unparsable YAML silently; we say so


def test_validate_tasks_missing_include_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_tasks(["tiny_mc"], tmp_path / "nope")
    with pytest.raises(ValueError, match="No lm-eval tasks"):
        validate_tasks([], None)


def test_group_member_outside_include_path_needs_full_index(tasks_dir, tmp_path):
    (tmp_path / "mixed.yaml").write_text("group: mixed\ntask: [tiny_local, arc_easy]\n")
    (tmp_path / "local.yaml").write_text((tasks_dir / "tiny_mc.yaml").read_text())
    local = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    assert _resolvable("tiny_mc", local.task_index)
    assert not _resolvable("mixed", local.task_index)  # arc_easy is built in


# --------------------------------------------------------------------------- evaluate


def test_multiple_choice_scores_and_samples(result):
    scores = result.scores["tiny_mc"]
    assert list(scores) == ["acc", "acc_norm"]  # lm-eval's order, primary first
    assert result.primary("tiny_mc")[0] == "acc"
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(result.stderr["tiny_mc"]) == set(scores)
    assert result.n_samples["tiny_mc"] == N_MC == result.n_samples_total["tiny_mc"]
    assert result.higher_is_better["tiny_mc"] == {"acc": True, "acc_norm": True}

    samples = result.samples["tiny_mc"]
    assert len(samples) == N_MC
    for sample, doc in zip(samples, TINY_MC_DOCS, strict=True):
        assert sample["doc"] == doc and sample["target"] == doc["label"]
        assert len(sample["filtered_resps"]) == len(doc["choices"])
        assert all(math.isfinite(ll) and ll < 0 for ll in _lls([sample]))
        assert sample["acc"] in (0.0, 1.0) and "acc_norm" in sample
    mean_acc = sum(s["acc"] for s in samples) / N_MC
    assert scores["acc"] == pytest.approx(mean_acc)


def test_generate_until_exact_match(result):
    scores = result.scores["tiny_gen"]
    # filter "strict-match" comes first in the YAML; filter "none" gives the bare name
    assert list(scores) == ["exact_match/strict-match", "exact_match"]
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    samples = result.samples["tiny_gen"]
    assert len(samples) == 2 * N_GEN  # one entry per (doc, filter)
    for filter_name in ("strict-match", "none"):
        assert sum(s["filter"] == filter_name for s in samples) == N_GEN
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
    assert "exact_match" in samples[0]


def test_result_is_json_serialisable(result):
    payload = json.loads(json.dumps(result.to_dict(include_samples=True)))
    assert payload["lm_eval_version"] == lm_eval.__version__
    assert payload["configs"]["tiny_mc"]["output_type"] == "multiple_choice"
    assert payload["configs"]["tiny_gen"]["generation_kwargs"]["max_gen_toks"] == 5
    assert "samples" not in result.to_dict()


def test_deterministic_and_caller_rng_untouched(result, tiny, tm):
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    again = _run(tiny, tm, ["tiny_mc", "tiny_gen"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert again.scores == result.scores
    assert again.samples == result.samples


def test_limit_fraction(tiny, tm):
    res = _run(tiny, tm, "tiny_mc", limit=0.5)
    assert res.n_samples["tiny_mc"] == N_MC // 2
    assert res.n_samples_total["tiny_mc"] == N_MC
    assert len(res.samples["tiny_mc"]) == N_MC // 2


def test_in_memory_weights_are_used_not_reloaded(result, tm, tmp_path):
    # The disk copy (config._name_or_path) holds seed-0 weights; memory holds seed-1 weights.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_lm(tmp_path / "seed0", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    other, _ = make_tiny_lm(seed=1)
    model.load_state_dict(other.state_dict())
    assert model.config._name_or_path == str(path)

    got = _lls(_run((model, tokenizer), tm, "tiny_mc", limit=2).samples["tiny_mc"])
    want = _lls(_run((other, tokenizer), tm, "tiny_mc", limit=2).samples["tiny_mc"])
    seed0 = _lls(result.samples["tiny_mc"][:2])
    assert got == pytest.approx(want, abs=1e-5)
    assert got != pytest.approx(seed0, abs=1e-3)


def test_group_gets_its_own_row(tiny, tm):
    res = _run(tiny, tm, ["tiny_group"], limit=2, log_samples=False)
    assert res.group_subtasks == {"tiny_group": ["tiny_mc", "tiny_mc_alt"]}
    assert {"tiny_mc", "tiny_mc_alt", "tiny_group"} <= set(res.scores)
    assert list(res.scores["tiny_group"]) == ["acc"]
    members = [res.scores[t]["acc"] for t in ("tiny_mc", "tiny_mc_alt")]
    assert res.scores["tiny_group"]["acc"] == pytest.approx(sum(members) / 2)
    assert res.n_samples["tiny_group"] == 4
    assert res.samples == {"tiny_mc": [], "tiny_mc_alt": []}


def test_per_task_fewshot_counts(tiny, tm):
    """A mapping sets each named task (all members of a group) and leaves the rest."""
    res = _run(tiny, tm, ["tiny_gen", "tiny_group"], num_fewshot={"tiny_group": 2}, limit=2)
    assert res.n_shot["tiny_mc"] == res.n_shot["tiny_mc_alt"] == 2
    assert res.n_shot["tiny_gen"] == 0
    zero = _run(tiny, tm, ["tiny_group"], limit=2)
    prompt = res.samples["tiny_mc"][0]["arguments"][0][0]
    assert len(prompt) > len(zero.samples["tiny_mc"][0]["arguments"][0][0])
    with pytest.raises(ValueError, match="not among the requested tasks"):
        _run(tiny, tm, ["tiny_gen"], num_fewshot={"tiny_mcc": 1})
    with pytest.raises(ValueError, match="int >= 0"):
        _run(tiny, tm, ["tiny_gen"], num_fewshot={"tiny_gen": -1})


def test_bf16_model(tm):
    model, tokenizer = make_tiny_lm(seed=0, dtype=torch.bfloat16)
    res = evaluate(model, tokenizer, "tiny_mc", task_manager=tm, limit=2, batch_size=2)
    assert all(0.0 <= v <= 1.0 for v in res.scores["tiny_mc"].values())
    assert all(math.isfinite(ll) for ll in _lls(res.samples["tiny_mc"]))
    assert model.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_moves_model(tm):
    model, tokenizer = make_tiny_lm(seed=0)
    res = evaluate(model, tokenizer, "tiny_mc", task_manager=tm, limit=2, device="cuda")
    assert model.device.type == "cuda"
    assert 0.0 <= res.scores["tiny_mc"]["acc"] <= 1.0


def test_evaluate_revalidates_when_manager_lacks_a_name(tiny, tasks_dir, tmp_path):
    model, tokenizer = tiny
    empty = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    res = evaluate(model, tokenizer, "tiny_mc", task_manager=empty, include_path=tasks_dir, limit=1)
    assert res.n_samples == {"tiny_mc": 1}


# --------------------------------------------------------------------------- helpers


def test_metric_key_and_row_parsing():
    assert metric_key("acc", "none") == "acc"
    assert metric_key("exact_match", "strict-match") == "exact_match/strict-match"
    row = {
        "name": "t",
        "alias": "t",
        "sample_len": 3,
        "exact_match,strict-match": np.float64(0.5),
        "exact_match_stderr,strict-match": "N/A",
        "acc,none": 1.0,
        "acc_stderr,none": np.float64(0.0),
        "sample_count": {"acc,none": 3},
        "text_metric,none": "not a number",
    }
    scores, stderr = _parse_row(row)
    assert scores == {"exact_match/strict-match": 0.5, "acc": 1.0}
    assert list(scores) == ["exact_match/strict-match", "acc"]
    assert stderr == {"exact_match/strict-match": None, "acc": 0.0}
    assert all(type(v) is float for v in scores.values())


def test_check_limit():
    assert _check_limit(None) is None
    assert _check_limit(3) == 3
    assert _check_limit(0.25) == 0.25
    assert _check_limit(1.0) is None  # "all", not lm-eval's "one doc"
    for bad in (0, -1, 0.0, 1.5, True):
        with pytest.raises((ValueError, TypeError)):
            _check_limit(bad)


def test_write_samples_jsonl(result, tmp_path):
    out = write_samples_jsonl(result.samples, tmp_path / "deep" / "samples.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == N_MC + 2 * N_GEN
    assert [rec["task"] for rec in lines] == ["tiny_mc"] * N_MC + ["tiny_gen"] * (2 * N_GEN)
    assert lines[0]["doc"] == TINY_MC_DOCS[0]
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind
