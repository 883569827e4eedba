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
import yaml
from lm_eval.tasks import TaskManager

from evals.lm_eval import (
    EvalResult,
    NonFiniteScoreError,
    _check_finite_results,
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
    assert list(scores) == ["acc", "acc_norm"]  # lm-eval's order
    assert result.primary("tiny_mc") == ("acc", scores["acc"])
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(result.stderr["tiny_mc"]) == set(scores)
    assert result.n_samples["tiny_mc"] == N_MC == result.n_samples_total["tiny_mc"]
    assert result.metrics["tiny_mc"] == {
        key: {
            "value": scores[key],
            "stderr": result.stderr["tiny_mc"][key],
            "higher_is_better": True,
            "aggregation": "mean",
            "primary": key == "acc",
        }
        for key in ("acc", "acc_norm")
    }

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
    primary = {k: m["primary"] for k, m in result.metrics["tiny_gen"].items()}
    assert primary == {"exact_match/strict-match": True, "exact_match": False}
    assert result.n_shot["tiny_gen"] == 0
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
    assert res.groups == {
        "tiny_group": {
            "subtasks": ["tiny_mc", "tiny_mc_alt"],
            "weight_by_size": True,
            "aggregation": "mean",
        }
    }
    group_acc = res.metrics["tiny_group"]["acc"]
    assert group_acc["primary"] and group_acc["aggregation"] == "mean"
    assert group_acc["higher_is_better"] is True
    assert _run(tiny, tm, ["tiny_mc"], limit=1).groups == {}


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
    parsed = _parse_row(row)
    assert parsed == [("exact_match", "strict-match", 0.5, None), ("acc", "none", 1.0, 0.0)]
    assert all(type(value) is float for _, _, value, _ in parsed)


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


# --------------------------------------------------------------------------- metric semantics

_NORM_FIRST_METRICS = """\
metric_list:
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc
    aggregation: !function agg.my_mean
    higher_is_better: true
"""

_ROLLING = {
    "task": "tiny_rolling",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "loglikelihood_rolling",  # no metric_list: lm-eval's perplexity defaults
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
}


@pytest.fixture(scope="module")
def semantics_tm(tasks_dir, tmp_path_factory) -> TaskManager:
    """``tiny_norm_first``: tiny_mc listing acc_norm first, acc aggregated by a ``!function``;
    ``tiny_rolling``: a loglikelihood_rolling task (lower-is-better perplexities)."""
    root = tmp_path_factory.mktemp("semantics")
    mc = (tasks_dir / "tiny_mc.yaml").read_text()
    head, _ = mc.split("metric_list:\n")
    tail = mc.split("metadata:\n")[1]
    text = head.replace("task: tiny_mc", "task: tiny_norm_first")
    (root / "norm_first.yaml").write_text(text + _NORM_FIRST_METRICS + "metadata:\n" + tail)
    (root / "agg.py").write_text("def my_mean(items):\n    return sum(items) / len(items)\n")
    (root / "rolling.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ("the sky is blue", "two and two"))
    )
    data = {"data_files": {"test": str(root / "rolling.jsonl")}, "cache_dir": str(root / ".c")}
    (root / "rolling.yaml").write_text(yaml.safe_dump({**_ROLLING, "dataset_kwargs": data}))
    return validate_tasks(["tiny_norm_first", "tiny_rolling", "tiny_gen"], [tasks_dir, root])


def test_primary_is_the_first_metric_list_entry_not_the_first_reported(tiny, semantics_tm):
    res = _run(tiny, semantics_tm, ["tiny_norm_first"], limit=2)
    metrics = res.metrics["tiny_norm_first"]
    assert list(metrics) == ["acc", "acc_norm"]  # lm-eval reports acc first all the same
    assert {k: m["primary"] for k, m in metrics.items()} == {"acc": False, "acc_norm": True}
    assert res.primary("tiny_norm_first") == ("acc_norm", metrics["acc_norm"]["value"])
    assert metrics["acc"]["aggregation"] == "my_mean"  # a !function aggregation, by name
    assert metrics["acc_norm"]["aggregation"] == "mean"


def test_perplexity_metrics_record_lower_is_better(tiny, semantics_tm):
    res = _run(tiny, semantics_tm, ["tiny_rolling"])
    metrics = res.metrics["tiny_rolling"]
    assert list(metrics) == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    assert metrics["word_perplexity"]["higher_is_better"] is False
    assert metrics["word_perplexity"]["aggregation"] == "weighted_perplexity"
    assert metrics["bits_per_byte"]["aggregation"] == "bits_per_byte"
    assert [m["primary"] for m in metrics.values()] == [True, False, False]
    assert all(math.isfinite(m["value"]) and m["value"] > 0 for m in metrics.values())


# --------------------------------------------------------------------------- non-finite scores


def _inf_model():
    model, tokenizer = make_tiny_lm(seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
    return model, tokenizer


@pytest.mark.parametrize(
    "task, kind",
    [
        ("tiny_norm_first", "loglikelihood"),
        ("tiny_rolling", "loglikelihood_rolling"),
        ("tiny_gen", "generate_until"),
    ],
)
def test_non_finite_logits_stop_evaluation_naming_the_task(semantics_tm, task, kind):
    model, tokenizer = _inf_model()
    with pytest.raises(NonFiniteScoreError) as info:
        evaluate(model, tokenizer, task, task_manager=semantics_tm, limit=2, batch_size=2)
    msg = str(info.value)
    assert f"NaN/inf logits while lm-eval ran {kind} requests of task(s) {task}:" in msg
    assert "hyperparameters" in msg and "scaling" in msg
    assert not model._forward_hooks  # the check is removed, on error too


def test_logits_check_is_removed_after_a_clean_run(result, tiny):
    assert result.scores and not tiny[0]._forward_hooks


def test_non_finite_log_likelihood_or_metric_in_results_raises():
    ok = {
        "configs": {"t": {"output_type": "multiple_choice"}, "g": {"output_type": "gen"}},
        "results": {"t": {"acc,none": 0.5, "acc_stderr,none": float("nan")}},
        "samples": {
            "t": [{"doc_id": 3, "resps": [[(-1.0, False)], [(-2.0, True)]]}],
            "g": [{"doc_id": 0, "resps": [["nan"]]}],  # generated text is not a number
        },
    }
    _check_finite_results(ok)  # a NaN stderr (e.g. one sample) is not a score
    bad_ll = json.loads(json.dumps(ok))
    bad_ll["samples"]["t"][0]["resps"][1][0][0] = float("nan")
    with pytest.raises(NonFiniteScoreError, match=r"task 't' \(multiple_choice\): doc 3 got"):
        _check_finite_results(bad_ll)
    bad_metric = {**ok, "samples": {}, "results": {"t": {"word_perplexity,none": math.inf}}}
    with pytest.raises(NonFiniteScoreError, match=r"task 't': metric 'word_perplexity' is inf"):
        _check_finite_results(bad_metric)
