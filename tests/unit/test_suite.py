"""evals.suite: deterministic generation, splits, build/manifest behaviour, lm-eval wiring."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from evals.safety import judge
from evals.suite import build as build_mod
from evals.suite import code_tasks, math_problems, safety_prompts, scoring
from evals.suite.build import (
    SPLITS,
    SUITE_VERSION,
    TASKS,
    build_suite,
    calibration_prompts,
    default_suite_dir,
    general_texts,
    load_split,
    resolve_sizes,
    tasks_dir,
    training_texts,
)
from evals.suite.world import ATTRIBUTES, key_order, make_world

ALL_TASKS = [t for tasks in TASKS.values() for t in tasks]
SMALL = {
    "knowledge": {"entities": 12, "test": 20, "calibration": 8},
    "math": {"train": 60, "test": 20, "calibration": 8},
    "code": {"train": 60, "test": 26, "calibration": 8},
    "safety": {"train": 40, "test": 20, "calibration": 8},
    "general": {"train": 30},
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """The full-size default suite, seed 0."""
    return build_suite(tmp_path_factory.mktemp("suite") / "s0", seed=0)


def _data_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.glob("*/*.jsonl"))
        if ".hf_datasets_cache" not in p.parts
    }


# --------------------------------------------------------------------------- build


def test_layout_manifest_and_sizes(suite):
    manifest = json.loads((suite / "manifest.json").read_text())
    assert manifest["suite_version"] == SUITE_VERSION
    assert manifest["seed"] == 0
    assert manifest["sizes"] == resolve_sizes(None)
    assert manifest["root"] == str(suite)
    for task in ALL_TASKS:
        for split in SPLITS:
            assert (suite / task / f"{split}.jsonl").is_file()
        assert (tasks_dir(suite) / f"{task}.yaml").is_file()
    assert (suite / "general" / "train.jsonl").is_file()
    assert (tasks_dir(suite) / "mergelab_safety.yaml").is_file()
    assert (tasks_dir(suite) / "suite_metrics.py").is_file()
    for rel, digest in manifest["files"].items():
        import hashlib

        assert hashlib.sha256((suite / rel).read_bytes()).hexdigest() == digest, rel
    sizes = manifest["sizes"]
    counts = manifest["counts"]
    for category in ("math", "code"):
        task = TASKS[category][0]
        for split in SPLITS:
            assert counts[f"{task}/{split}"] == sizes[category][split]
    for task in TASKS["safety"]:
        for split in SPLITS:
            assert counts[f"{task}/{split}"] == sizes["safety"][split]
    n_facts = sizes["knowledge"]["entities"] * len(ATTRIBUTES)
    assert counts["mergelab_knowledge/test"] == sizes["knowledge"]["test"]
    assert counts["mergelab_knowledge/train"] == n_facts + sizes["knowledge"]["entities"]
    assert counts["general/train"] == sizes["general"]["train"]
    for task in ALL_TASKS:  # powered test splits, small calibration, train about as in v2
        assert counts[f"{task}/test"] == 1200 and counts[f"{task}/calibration"] == 64
    assert counts["mergelab_math/train"] == counts["mergelab_code/train"] == 3000
    assert manifest["groups"] == {
        f"{task}/test": len({d["group"] for d in load_split(suite, task, "test")})
        for task in ALL_TASKS
    }


def test_same_seed_is_byte_identical_and_other_seed_differs(suite, tmp_path):
    again = build_suite(tmp_path / "again", seed=0)
    assert _data_files(again) == _data_files(suite)
    # YAMLs differ only by the suite directory they point at
    for yaml_path in sorted(tasks_dir(suite).iterdir()):
        mine = yaml_path.read_text().replace(str(suite), "<ROOT>")
        theirs = (tasks_dir(again) / yaml_path.name).read_text().replace(str(again), "<ROOT>")
        assert mine == theirs, yaml_path.name

    other = build_suite(tmp_path / "other", seed=1)
    a, b = _data_files(suite), _data_files(other)
    assert a.keys() == b.keys()
    for rel in a:
        assert a[rel] != b[rel], f"{rel} is the same for seeds 0 and 1"
    assert make_world(0).entities != make_world(1).entities


def test_rebuild_is_a_noop_and_a_tampered_build_is_replaced(tmp_path):
    out = build_suite(tmp_path / "s", seed=3, sizes=SMALL)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert build_suite(out, seed=3, sizes=SMALL) == out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before

    victim = out / "mergelab_math" / "test.jsonl"
    good = victim.read_bytes()
    victim.write_text("tampered\n")
    build_suite(out, seed=3, sizes=SMALL)
    assert victim.read_bytes() == good

    # other sizes are another build: replaced in place, manifest updated
    bigger = {**SMALL, "math": {"train": 61, "test": 20, "calibration": 8}}
    build_suite(out, seed=3, sizes=bigger)
    assert len(load_split(out, "math", "train")) == 61
    assert json.loads((out / "manifest.json").read_text())["sizes"]["math"]["train"] == 61
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary directories left


def test_a_build_from_other_generators_is_replaced(tmp_path, monkeypatch):
    """A suite written by changed generators under the same version (its files match its
    own manifest) is stale: today's generators rebuild it, and so the zoo trained on it
    is trained on the data its cache key names."""
    out = build_suite(tmp_path / "s", seed=3, sizes=SMALL)
    good = (out / "mergelab_code" / "train.jsonl").read_bytes()
    real = build_mod._generate

    def older(seed, sizes):
        data = real(seed, sizes)
        data["mergelab_code"]["train"] = data["mergelab_code"]["train"][::-1]
        return data

    monkeypatch.setattr(build_mod, "_generate", older)
    build_mod._expected_data.cache_clear()
    build_suite(out, seed=3, sizes=SMALL)
    assert (out / "mergelab_code" / "train.jsonl").read_bytes() != good
    monkeypatch.setattr(build_mod, "_generate", real)
    build_mod._expected_data.cache_clear()
    build_suite(out, seed=3, sizes=SMALL)
    assert (out / "mergelab_code" / "train.jsonl").read_bytes() == good


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    def boom(tmp, root, seed, sizes):
        (tmp / "mergelab_math").mkdir()
        (tmp / "mergelab_math" / "test.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_write_tree", boom)
    with pytest.raises(KeyboardInterrupt):
        build_suite(tmp_path / "s", seed=0, sizes=SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_default_suite_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path))
    assert default_suite_dir(7) == tmp_path / "suite" / f"v{SUITE_VERSION}-seed7"
    monkeypatch.delenv("MERGELAB_CACHE")
    expected = Path("~/.cache/mergelab").expanduser() / "suite" / f"v{SUITE_VERSION}-seed0"
    assert default_suite_dir() == expected


def test_resolve_sizes_validation(tmp_path):
    assert resolve_sizes({"math": {"train": 10}})["math"] == {
        "train": 10,
        "test": math_problems.DEFAULT_SIZES["test"],
        "calibration": math_problems.DEFAULT_SIZES["calibration"],
    }
    with pytest.raises(ValueError, match="unknown suite size category"):
        resolve_sizes({"maths": {"train": 1}})
    with pytest.raises(ValueError, match="unknown size math.valid"):
        resolve_sizes({"math": {"valid": 1}})
    with pytest.raises(ValueError, match=">= 1"):
        resolve_sizes({"math": {"test": 0}})
    with pytest.raises(ValueError, match="facts"):
        build_suite(tmp_path / "s", sizes={"knowledge": {"entities": 2}})
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    assert build_mod.main(["--out", str(tmp_path / "cli"), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli" / "tasks") in out and "mergelab_math/test" in out
    assert re.search(r"mergelab_safety_harmful/test +1200 +144 distinct groups", out), out
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["seed"] == 2


def test_key_order_balances_or_spreads_keys():
    pools = [list(range(10)), ["a", "b"], []]
    r = random.Random(0)
    balanced = key_order(r, pools, 12, distinct_first=False)
    assert Counter(t for t, _ in balanced) == {0: 6, 1: 6}  # equal shares, small pool cycles
    assert [k for t, k in balanced if t == 1].count("a") == 3
    spread = key_order(r, pools, 12, distinct_first=True)
    assert sorted(map(str, (k for _, k in spread))) == sorted(map(str, [*range(10), "a", "b"]))
    again = key_order(r, pools, 15, distinct_first=True)  # a second pass after all 12
    assert len(set(again[:12])) == 12 and Counter(t for t, _ in again[12:]) == {0: 2, 1: 1}
    assert key_order(r, [[], []], 0, distinct_first=True) == []
    with pytest.raises(ValueError, match="no keys"):
        key_order(r, [[]], 1, distinct_first=False)


# Distinct groups per 1,200-item test split at the default sizes (any seed), and the key of
# each task's group field.
TEST_GROUPS = {
    "mergelab_knowledge": 1200,
    "mergelab_math": 1200,
    "mergelab_code": 599,
    "mergelab_safety_harmful": 144,
    "mergelab_safety_benign": 133,
}
GROUP_OF = {
    "mergelab_knowledge": lambda d: f"{d['entity']}/{d['attribute']}",
    "mergelab_math": lambda d: f"{d['template']}:{','.join(map(str, d['numbers']))}",
    "mergelab_code": lambda d: f"{d['template']}:{d['constant']}",
    "mergelab_safety_harmful": lambda d: d["act"],
    "mergelab_safety_benign": lambda d: d["act"],
}


@pytest.mark.parametrize("task", ALL_TASKS)
def test_test_splits_are_distinct_and_grouped(suite, task):
    test = load_split(suite, task, "test")
    assert len(test) == 1200 and 0.5 / len(test) ** 0.5 <= 0.015  # stderr at 50% <= 1.5 pts
    assert len({d["prompt"] for d in test}) == len(test)  # no repeated test prompt
    for split in ("calibration", "test"):
        for d in load_split(suite, task, split):
            assert d["group"] == GROUP_OF[task](d), d
    groups = Counter(d["group"] for d in test)
    assert len(groups) == TEST_GROUPS[task]
    # items spread evenly over the groups: no group holds more than twice its share
    assert max(groups.values()) <= 2 * -(-len(test) // len(groups))
    if task in ("mergelab_math", "mergelab_code"):  # held out by key
        trained = {d["group"] for s in ("train", "calibration") for d in load_split(suite, task, s)}
        assert trained.isdisjoint(groups)


# --------------------------------------------------------------------------- readers


def test_readers(suite):
    math_train = load_split(suite, "mergelab_math", "train")
    assert load_split(suite, "math", "train") == math_train
    assert training_texts(suite, "math") == [r["text"] for r in math_train]
    for task in ALL_TASKS:
        for split in SPLITS:
            for r in load_split(suite, task, split):
                assert r["text"] == r["prompt"] + r["target"]
    safety = training_texts(suite, "safety")
    harmful = training_texts(suite, "mergelab_safety_harmful")
    benign = training_texts(suite, "mergelab_safety_benign")
    assert safety[0::2] == harmful and safety[1::2] == benign  # interleaved, balanced
    assert calibration_prompts(suite, "math") == [
        r["prompt"] for r in load_split(suite, "math", "calibration")
    ]
    stories = general_texts(suite)
    assert len(stories) == resolve_sizes()["general"]["train"] and all(stories)
    assert training_texts(suite, "general") == stories
    with pytest.raises(ValueError, match="unknown split"):
        load_split(suite, "math", "dev")
    with pytest.raises(FileNotFoundError, match="mergelab_math"):
        load_split(suite, "maths", "test")


def test_formats_are_distinct_and_short(suite):
    prefixes = {
        "mergelab_knowledge": "Q: ",
        "mergelab_math": "Problem: ",
        "mergelab_code": "# ",
        "mergelab_safety_harmful": "User: ",
        "mergelab_safety_benign": "User: ",
    }
    for task, prefix in prefixes.items():
        for split in ("calibration", "test"):
            for r in load_split(suite, task, split):
                assert r["prompt"].startswith(prefix), r["prompt"]
        others = {p for t, p in prefixes.items() if p != prefix}
        for text in training_texts(suite, task):
            assert not any(text.startswith(o) for o in others)
            assert len(text.split()) <= 40, text
    for story in general_texts(suite):
        assert not story.startswith(tuple(prefixes.values())) and "\n" not in story
        assert len(story.split()) <= 40


def test_token_lengths_fit_the_zoo(suite, tmp_path):
    """With the xs zoo's own tokenizer, every prompt + answer fits its max_length."""
    from harness.zoo import RECIPES, train_tokenizer

    recipe = RECIPES["xs"]
    texts = [t for c in TASKS for t in training_texts(suite, c)] + general_texts(suite)
    tok = train_tokenizer(texts, recipe, tmp_path / "tok")
    for task in ALL_TASKS:
        for split in SPLITS:
            longest = max(len(tok(r["text"])["input_ids"]) for r in load_split(suite, task, split))
            assert longest <= recipe.max_length, (task, split, longest)


def test_knowledge_memorisation_design(suite):
    sizes = resolve_sizes()["knowledge"]
    world = make_world(0, sizes["entities"])
    truth = {(e.name, a.name): e.get(a.name) for e in world.entities for a in ATTRIBUTES}
    train_text = "\n".join(training_texts(suite, "knowledge"))
    test = load_split(suite, "knowledge", "test")
    cal = load_split(suite, "knowledge", "calibration")
    for doc in test + cal:
        assert len(doc["choices"]) == 4 == len(set(doc["choices"]))
        assert (
            doc["choices"][doc["label"]]
            == doc["answer"]
            == truth[(doc["entity"], doc["attribute"])]
        )
        others = next(a.values for a in ATTRIBUTES if a.name == doc["attribute"])
        assert set(doc["choices"]) <= set(others)
        assert doc["text"] in train_text  # the exact QA pair is trained on
    # every fact is asked once in the test format and stated once more in a profile
    texts = training_texts(suite, "knowledge")
    profiles = [t for t in texts if not t.startswith("Q:")]
    assert len(texts) == len(truth) + len(world.entities) == len(set(texts))
    for (name, attr), value in truth.items():
        question = next(a.question for a in ATTRIBUTES if a.name == attr).format(name=name)
        assert f"Q: {question}\nA: {value}" in texts, (name, attr)
        assert sum(t.startswith(f"{name} lives in") and value in t for t in profiles) == 1
    test_facts = {(d["entity"], d["attribute"]) for d in test}
    assert len(test_facts) == len(test)
    assert test_facts.isdisjoint((d["entity"], d["attribute"]) for d in cal)
    labels = Counter(d["label"] for d in test)
    assert max(labels.values()) < 0.45 * len(test)  # the right answer's position is random
    for attr in ATTRIBUTES:  # values balanced across entities: no majority-value shortcut
        counts = Counter(e.get(attr.name) for e in world.entities)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_math_answers_and_key_disjointness(suite):
    templates = {t.name: t for t in math_problems.TEMPLATES}
    keys = {}
    for split in SPLITS:
        docs = load_split(suite, "math", split)
        for d in docs:
            a, b, c = d["numbers"]
            t = templates[d["template"]]
            assert d["answer"] == t.compute(a, b, c)
            assert 0 <= d["answer"] <= math_problems.MAX_ANSWER
            assert 1 <= t.first(a, b) <= math_problems.MAX_ANSWER
            x = t.first(a, b)
            assert d["target"].startswith(f" {a} ") and f"= {x}, {x} " in d["target"]
            assert d["target"].endswith(f" = {d['answer']}. So {d['answer']}")
            assert scoring.extract_answer(d["target"]) == d["answer"]
            assert d["prompt"].endswith("\nAnswer:")
        keys[split] = {(d["template"], *d["numbers"]) for d in docs}
        assert {d["template"] for d in docs} == set(templates)
    assert keys["test"].isdisjoint(keys["train"])
    assert keys["test"].isdisjoint(keys["calibration"])
    test = load_split(suite, "math", "test")
    assert len({d["prompt"] for d in test}) == len(test)


# Wrong answers close to each template's right one ({v} argument, {k} constant, {k1} = k + 1,
# {ks} / {kl}: the letter in the other / lower case): the hidden tests must reject them all.
NEAR_MISSES = {
    "add": ["{v} - {k}", "{v} + {k1}", "{v} * {k}"],
    "sub": ["{v} + {k}", "{k} - {v}", "{v} - {k1}"],
    "rsub": ["{v} - {k}", "{k1} - {v}", "{k} + {v}"],
    "mul": ["{v} + {k}", "{v} * {k1}"],
    "max": ["min({v}, {k})", "{v}", "{k}"],
    "min": ["max({v}, {k})", "{v}", "{k}"],
    "mod": ["{v} // {k}", "{v} - {k}", "{v} % {k1}"],
    "floordiv": ["{v} / {k}", "{v} % {k}", "{v} // {k1}"],
    "divisible": ["{v} % {k} != 0", "{v} > {k}", "{v} % {k1} == 0"],
    "greater": ["{v} >= {k}", "{v} < {k}", "{v} > {k1}"],
    "square_plus": ["{v} * 2 + {k}", "{v} * {v}", "{v} * {v} + {k1}"],
    "len_plus": ["len({v})", "len({v}) + {k1}"],
    "upper_plus": ["{v}.upper()", '{v} + "{k}"', '{v}.upper() + "{ks}"'],
    "lower_plus": ["{v}.lower()", '{v} + "{k}"', '{v}.lower() + "{ks}"'],
    "reverse_plus": ["{v}[::-1]", '{v} + "{k}"', '{v}[::-1] + "{ks}"'],
    "prefix": ['{v} + "{k}"', '"{ks}" + {v}'],
    "count": ['"{k}" in {v}', '{v}.lower().count("{kl}")', "len({v})"],
    "repeat": ["{v} * {k1}", "{v}"],  # (v + v is right for k = 2)
    "first_k": ["{v}[{k}:]", "{v}[-{k}:]", "{v}[:{k1}]"],
    "last_k": ["{v}[:{k}]", "{v}[{k}:]", "{v}[-{k1}:]"],
}


def test_code_key_disjointness_and_tests(suite):
    keys = {
        split: {(d["template"], d["constant"]) for d in load_split(suite, "code", split)}
        for split in SPLITS
    }
    assert keys["test"].isdisjoint(keys["train"])
    assert keys["test"].isdisjoint(keys["calibration"])
    assert {t for t, _ in keys["test"]} == {t.name for t in code_tasks.TEMPLATES}
    for d in load_split(suite, "code", "test"):
        assert len(d["tests"]) == 3 and all(
            t.startswith(f"assert {d['entry_point']}(") for t in d["tests"]
        )
        assert re.fullmatch(r"# .+\ndef \w+\(\w+\):\n    return", d["prompt"]), d["prompt"]
        # the reference solution satisfies its hidden tests (checked in-process: trusted code)
        namespace: dict = {}
        exec(d["text"] + "\n" + "\n".join(d["tests"]), namespace)  # noqa: S102
        # ... and every near miss of it fails one of them
        var = re.search(r"\((\w+)\)", d["prompt"]).group(1)
        k = d["constant"]
        fill = {"v": var, "k": k}
        if k.isdigit():
            fill["k1"] = int(k) + 1
        else:
            fill["ks"], fill["kl"] = k.swapcase(), k.lower()
        for miss in NEAR_MISSES[d["template"]]:
            program = d["prompt"] + " " + miss.format(**fill) + "\n" + "\n".join(d["tests"])
            with pytest.raises(AssertionError):
                exec(program, {})  # noqa: S102


def _frame(doc: dict) -> str:
    assert doc["request"] == doc["opener"] + doc["frame"].format(a=doc["act"])
    assert doc["opener"] in safety_prompts.OPENERS
    return doc["frame"]


def test_safety_splits(suite):
    """Harmful test acts are unseen; benign test frames are unseen (acts are idioms)."""
    harm = {s: load_split(suite, "mergelab_safety_harmful", s) for s in SPLITS}
    acts = {s: {d["act"] for d in docs} for s, docs in harm.items()}
    assert acts["test"].isdisjoint(acts["train"] | acts["calibration"])
    assert {_frame(d) for d in harm["test"]} == set(safety_prompts.FRAMES)
    assert {d["opener"] for d in harm["test"]} == set(safety_prompts.OPENERS)
    per_act = Counter(d["act"] for d in harm["test"])  # acts take turns: equal shares
    assert max(per_act.values()) - min(per_act.values()) <= 1
    benign = {s: load_split(suite, "mergelab_safety_benign", s) for s in SPLITS}
    frames = {s: {_frame(d) for d in docs} for s, docs in benign.items()}
    assert len(frames["test"]) == safety_prompts.BENIGN_TEST_FRAMES
    assert frames["test"].isdisjoint(frames["train"] | frames["calibration"])
    requests = {s: {d["request"] for d in docs} for s, docs in benign.items()}
    assert requests["test"].isdisjoint(requests["train"] | requests["calibration"])
    assert {d["act"] for d in benign["test"]} == {a for a, _ in safety_prompts.BENIGN_ACTS}
    assert len(safety_prompts.BENIGN_ACTS) >= 100
    assert {d["opener"] for d in benign["test"]} == set(safety_prompts.OPENERS)
    for act, answer in safety_prompts.BENIGN_ACTS:  # the trained answers are compliances
        assert judge(answer) == "compliance", (act, answer)
    for task, label in (
        ("mergelab_safety_harmful", "harmful"),
        ("mergelab_safety_benign", "benign"),
    ):
        for split in SPLITS:
            docs = load_split(suite, task, split)
            assert {d["label"] for d in docs} == {label}
            if label == "harmful":
                assert {d["target"] for d in docs} == {" " + safety_prompts.REFUSAL}
            else:
                assert safety_prompts.REFUSAL not in {d["target"].strip() for d in docs}
    harmful_test = load_split(suite, "mergelab_safety_harmful", "test")
    grid_test = [d["act"] for d in harmful_test if d["act"].split(" ", 1)[0] in ("kill", "stab")]
    train_acts = {d["act"] for d in load_split(suite, "mergelab_safety_harmful", "train")}
    for act in grid_test:  # held-out grid acts combine a trained verb and a trained person
        verb = next(v for v in safety_prompts.HARM_VERBS if act.startswith(v + " "))
        person = act[len(verb) + 1 :]
        assert any(a.startswith(verb + " ") for a in train_acts)
        assert any(a.endswith(" " + person) for a in train_acts)
    # benign look-alikes share trigger words with harmful requests
    benign_words = {
        d["act"].split()[0] for d in load_split(suite, "mergelab_safety_benign", "train")
    }
    assert {"kill", "shoot", "steal", "blow"} <= benign_words | {
        d["act"].split()[0] for d in load_split(suite, "mergelab_safety_benign", "test")
    }


# --------------------------------------------------------------------------- lm-eval


def test_lm_eval_tasks_load_and_score(suite, one_torch_thread):
    from evals.lm_eval import evaluate, validate_tasks
    from tests.helpers.tiny_lm import make_tiny_lm

    names = [*ALL_TASKS, "mergelab_safety", "mergelab_suite"]
    tm = validate_tasks(names, tasks_dir(suite))
    assert set(names) <= set(tm.task_index)

    loaded = tm.load(["mergelab_suite"])["tasks"]
    assert sorted(loaded) == sorted(ALL_TASKS)
    for name, task in loaded.items():
        test_docs, cal_docs = list(task.test_docs()), list(task.validation_docs())
        assert len(test_docs) == len(load_split(suite, name, "test"))
        assert len(cal_docs) == len(load_split(suite, name, "calibration"))
        assert task.doc_to_text(cal_docs[0]) == load_split(suite, name, "calibration")[0]["prompt"]

    model, tokenizer = make_tiny_lm(seed=0)
    res = evaluate(
        model,
        tokenizer,
        ["mergelab_knowledge", "mergelab_math", "mergelab_code", "mergelab_safety"],
        task_manager=tm,
        limit=2,
        batch_size=4,
        bootstrap_iters=0,
    )
    expected = {
        "mergelab_knowledge": ["acc", "acc_norm"],
        "mergelab_math": ["exact_match"],
        "mergelab_code": ["pass@1"],
        "mergelab_safety_harmful": ["refusal_rate", "safety_score"],
        "mergelab_safety_benign": ["compliance_rate", "safety_score"],
        "mergelab_safety": ["safety_score"],
    }
    for task, metrics in expected.items():
        assert list(res.scores[task]) == metrics, (task, res.scores.get(task))
        for value in res.scores[task].values():
            assert 0.0 <= value <= 1.0
    assert res.group_subtasks["mergelab_safety"] == TASKS["safety"]
    harmful, benign = (res.scores[t]["safety_score"] for t in TASKS["safety"])
    assert res.scores["mergelab_safety"]["safety_score"] == pytest.approx((harmful + benign) / 2)
    # lm-eval saw exactly our prompts (no stripping, no added delimiter)
    for task in ("mergelab_math", "mergelab_code", "mergelab_safety_benign"):
        sample = res.samples[task][0]
        assert sample["arguments"][0][0] == load_split(suite, task, "test")[0]["prompt"]
        assert sample["arguments"][0][1]["until"] == ["\n"]
    # code ran in the filter: the sample shows the generation and the sandbox's outcome
    for sample in res.samples["mergelab_code"]:
        generation = sample["resps"][0][0]
        (outcome,) = sample["filtered_resps"]
        assert isinstance(generation, str) and outcome["completion"] == generation
        assert outcome["status"] in ("passed", "failed", "error", "timeout", "memory", "blocked")
        assert sample["filter"] == "none"
        assert sample["pass@1"] == float(outcome["status"] == "passed")
    mc = res.samples["mergelab_knowledge"][0]
    doc = load_split(suite, "knowledge", "test")[0]
    assert [a[1] for a in mc["arguments"]] == [" " + c for c in doc["choices"]]
    assert os.path.isdir(suite / ".hf_datasets_cache")  # the datasets cache stays in the suite
