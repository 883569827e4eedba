"""Knowledge: 4-way multiple-choice questions about the seeded world (MMLU-style).

Format (scored by log-likelihood of each choice after the prompt, lm-eval ``acc``)::

    Q: Where does Kalo live?
    A: Paris

Knowledge is memorised, not inferred: the train split asks every question of the world once
in the test format (its answer is the fact) and states every entity's facts once more in a
profile sentence, so a test question is never unseen; the test
measures how much of the world a model has memorised (and kept through merging). The test
split asks about distinct facts, one question each, with 4 choices (the right value and 3
other values of the same attribute; chance = 25%); its ``group`` is the fact
(``entity/attribute``). The default world (432 entities x 3 attributes = 1,296 facts) is
large enough for 1,200 test facts and 64 calibration facts outside them; calibration wraps
around to test facts only when the world has fewer facts than test + calibration.
"""

from __future__ import annotations

import random

from evals.suite.world import ATTRIBUTES, Attribute, Entity, World, make_world, rng

__all__ = ["DEFAULT_SIZES", "TASK", "make_splits", "question_prompt"]

TASK = "mergelab_knowledge"
DEFAULT_SIZES = {"entities": 432, "test": 1200, "calibration": 64}
N_CHOICES = 4


def question_prompt(entity: Entity, attribute: Attribute) -> str:
    return f"Q: {attribute.question.format(name=entity.name)}\nA:"


def _question_doc(r: random.Random, doc_id: str, entity: Entity, attribute: Attribute) -> dict:
    answer = entity.get(attribute.name)
    wrong = r.sample([v for v in attribute.values if v != answer], N_CHOICES - 1)
    choices = [answer, *wrong]
    r.shuffle(choices)
    prompt = question_prompt(entity, attribute)
    return {
        "id": doc_id,
        "prompt": prompt,
        "target": f" {answer}",
        "text": f"{prompt} {answer}",
        "choices": choices,
        "label": choices.index(answer),
        "answer": answer,
        "entity": entity.name,
        "attribute": attribute.name,
        "group": f"{entity.name}/{attribute.name}",
    }


def _train_records(world: World, seed: int) -> list[dict]:
    lines: list[tuple[str, str, str]] = []  # (kind, prompt, target)
    for entity in world.entities:
        for attribute in ATTRIBUTES:
            lines.append(
                ("qa", question_prompt(entity, attribute), f" {entity.get(attribute.name)}")
            )
        city, color, job = (entity.get(a.name) for a in ATTRIBUTES)
        lines.append(
            ("profile", "", f"{entity.name} lives in {city}, likes {color} and works as a {job}.")
        )
    rng(seed, "knowledge/train").shuffle(lines)
    return [
        {"id": f"knowledge-train-{i:05d}", "kind": kind, "prompt": p, "target": t, "text": p + t}
        for i, (kind, p, t) in enumerate(lines)
    ]


def make_splits(seed: int, sizes: dict) -> dict[str, dict[str, list[dict]]]:
    """``{TASK: {"train": [...], "calibration": [...], "test": [...]}}``."""
    world = make_world(seed, int(sizes["entities"]))
    facts = world.facts()
    n_test, n_cal = int(sizes["test"]), int(sizes["calibration"])
    if n_test > len(facts):
        raise ValueError(
            f"knowledge test size {n_test} > {len(facts)} facts "
            f"({len(world.entities)} entities x {len(ATTRIBUTES)} attributes); "
            "raise sizes.knowledge.entities or lower sizes.knowledge.test"
        )
    order = list(range(len(facts)))
    rng(seed, "knowledge/split").shuffle(order)
    test_idx = order[:n_test]
    rest = order[n_test:] + order[:n_test]  # calibration prefers facts outside the test split
    cal_idx = [rest[i % len(rest)] for i in range(n_cal)]
    r = rng(seed, "knowledge/choices")
    test = [_question_doc(r, f"knowledge-test-{i:05d}", *facts[j]) for i, j in enumerate(test_idx)]
    cal = [
        _question_doc(r, f"knowledge-calibration-{i:05d}", *facts[j]) for i, j in enumerate(cal_idx)
    ]
    return {TASK: {"train": _train_records(world, seed), "calibration": cal, "test": test}}
