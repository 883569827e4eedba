"""Sandboxed HumanEval / MBPP (evals/code_benchmarks.py, evals/tasks/*.yaml).

The hub datasets cannot be downloaded here, so the real task YAMLs are included by local
stand-ins that change only the data source (records in the hub datasets' schemas) and, for
MBPP, the few-shot source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import evals.code_benchmarks
from evals.code_benchmarks import (
    filter_humaneval,
    filter_mbpp,
    humaneval_program,
    mbpp_program,
    process_humaneval,
    process_mbpp,
)
from evals.lm_eval import evaluate, validate_tasks
from tests.helpers.tiny_lm import make_tiny_lm

TASKS_DIR = Path(evals.code_benchmarks.__file__).resolve().parent / "tasks"  # the real YAMLs

HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n"
        "    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def double(x):\n    """Return 2 x."""\n',
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n",
        "entry_point": "double",
    },
]
MBPP = [
    {
        "task_id": 11 + i,
        "text": f"Write a function to add {i} to a number.",
        "code": f"def add_{i}(n):\n    return n + {i}",
        "test_list": [
            f"assert add_{i}(1) == {1 + i}",
            f"assert add_{i}(0) == {i}",
            f"assert add_{i}(-{i}) == 0",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
    for i in range(1, 6)
]


def test_programs_and_sandboxed_scores():
    he = HUMANEVAL[0]
    solution, tests = humaneval_program(he, "    return a + b")
    assert solution.endswith("    return a + b\n") and tests.endswith("check(add)\n")
    assert process_humaneval(he, [he["canonical_solution"]]) == {"pass@1": 1.0}
    assert process_humaneval(he, ["    return a - b\n"]) == {"pass@1": 0.0}
    assert process_humaneval(he, [None]) == {"pass@1": 0.0}
    mb = MBPP[0]
    solution, tests = mbpp_program({**mb, "test_setup_code": "import math"}, "x")
    assert solution == "import math\nx\n" and tests.startswith("assert add_1(1) == 2\n")
    assert process_mbpp(mb, [mb["code"]]) == {"pass@1": 1.0}
    assert process_mbpp(mb, ["def add_1(n):\n    return n"]) == {"pass@1": 0.0}


def test_filters_run_every_program_and_process_results_score_the_outcomes():
    he = HUMANEVAL[0]
    outcomes = filter_humaneval([[he["canonical_solution"]], ["    return a - b\n"]], [he, he])
    assert [o["status"] for o in outcomes] == ["passed", "failed"]
    assert outcomes[0]["completion"] == he["canonical_solution"]
    assert [process_humaneval(he, [o]) for o in outcomes] == [{"pass@1": 1.0}, {"pass@1": 0.0}]
    mb = MBPP[0]
    outcomes = filter_mbpp([[mb["code"]], ["def add_1(n):\n    return n +"]], [mb, mb])
    assert [o["status"] for o in outcomes] == ["passed", "error"]
    assert [process_mbpp(mb, [o]) for o in outcomes] == [{"pass@1": 1.0}, {"pass@1": 0.0}]


def test_generated_code_cannot_write_outside_its_sandbox_or_loop_forever(tmp_path):
    he = HUMANEVAL[0]
    target = tmp_path / "escaped"
    escape = f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n"
    assert process_humaneval(he, [escape]) == {"pass@1": 0.0}
    assert not target.exists()
    assert process_humaneval(he, ["    while True:\n        pass\n"]) == {"pass@1": 0.0}


@pytest.mark.parametrize(
    "exit_early",
    [
        "import os\nos._exit(0)\n",
        "import sys\nsys.exit(0)\n",
        "import os\nos.write(1, b'@@MERGELAB_SANDBOX_OK@@\\n')\nos._exit(0)\n",
        "import __main__, os\nprint(getattr(__main__, '_nonce', ''))\nos._exit(0)\n",
    ],
    ids=["os-exit", "sys-exit", "fake-mark", "read-nonce"],
)
def test_a_wrong_answer_that_exits_early_scores_zero(exit_early):
    """The red team's forgery: a wrong completion that ends the program (after printing
    what an earlier design took as its pass mark) before the hidden tests run."""
    he, mb = HUMANEVAL[0], MBPP[0]
    assert process_humaneval(he, ["    return a - b\n" + exit_early]) == {"pass@1": 0.0}
    assert process_mbpp(mb, ["def add_1(n):\n    return n\n" + exit_early]) == {"pass@1": 0.0}


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    """Stand-ins that `include` the real YAMLs and read local records."""
    root = tmp_path_factory.mktemp("code_tasks")
    real = TASKS_DIR
    for name, docs, extra in (
        ("humaneval", HUMANEVAL, {}),
        (
            "mbpp",
            MBPP[2:],
            {
                "fewshot_config": {
                    "sampler": "first_n",
                    "samples": [{**d, "is_fewshot": True} for d in MBPP[:2]],
                },
                "num_fewshot": 2,
            },
        ),
    ):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        spec = {
            "include": str(real / f"mergelab_{name}.yaml"),
            "task": f"local_{name}",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            **extra,
        }
        (root / f"local_{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def test_real_task_yamls_index_without_network():
    tm = validate_tasks(["mergelab_humaneval", "mergelab_mbpp"], TASKS_DIR)
    assert {"mergelab_humaneval", "mergelab_mbpp"} <= set(tm.task_index)


def test_tasks_run_through_lm_eval_and_score_in_the_sandbox(local_tasks):
    tm = validate_tasks(["local_humaneval", "local_mbpp"], local_tasks)
    loaded = tm.load(["local_humaneval", "local_mbpp"])["tasks"]
    for name, process in (("local_humaneval", process_humaneval), ("local_mbpp", process_mbpp)):
        task = loaded[name]
        assert task.config.output_type == "generate_until"
        assert not task.config.unsafe_code
        docs = list(task.test_docs())
        solution = "canonical_solution" if name == "local_humaneval" else "code"
        assert [process(d, [d[solution]]) for d in docs] == [{"pass@1": 1.0}] * len(docs)

    model, tokenizer = make_tiny_lm(seed=0)
    res = evaluate(
        model,
        tokenizer,
        ["local_humaneval", "local_mbpp"],
        task_manager=tm,
        gen_kwargs={"max_gen_toks": 8},
        batch_size=2,
    )
    assert set(res.scores) == {"local_humaneval", "local_mbpp"}
    assert 0.0 <= res.scores["local_humaneval"]["pass@1"] <= 1.0
    for sample in res.samples["local_humaneval"] + res.samples["local_mbpp"]:
        (outcome,) = sample["filtered_resps"]  # run in the filter; the generation is kept
        assert outcome["completion"] == sample["resps"][0][0]
        assert sample["pass@1"] == float(outcome["status"] == "passed")
    assert res.n_shot == {"local_humaneval": 0, "local_mbpp": 2}
    prompt = res.samples["local_mbpp"][0]["arguments"][0][0]
    assert prompt.count("[BEGIN]") == 3 and prompt.count("[DONE]") == 2
    assert "def add_1(n)" in prompt and prompt.endswith("[BEGIN]\n")
