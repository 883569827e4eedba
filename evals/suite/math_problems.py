"""Math: two-step arithmetic word problems with small numbers (GSM8K-style, answers 0..20).

Format (greedy generation until a newline); the problem is one line, wrapped here. As in
GSM8K, the answer works the steps before the final number, one operation per step, and is
scored by exact match of the number after the last "So"::

    Problem: Tom has 5 apples. He gets 3 more and then gives away 2. How many apples does Tom
    have now?
    Answer: 5 + 3 = 8, 8 - 2 = 6. So 6

Eight templates, each two operations (``a + b - c``, ``a * b + c``, ``(a + b) * c``...).
A problem's *key* is ``(template, a, b, c)``; names and objects are surface only. Every
number stays in 0..20 (operands, the intermediate result and the answer), so the worked
answer is a few dozen single-digit tokens; within that bound the operands range as widely as
the template allows, giving every template all its valid keys (thousands in all). Per
template, a quarter of the keys are held out: the test split draws only from held-out keys
and train/calibration only from the others, so no test computation (template and numbers) is
ever seen in training, whatever the surface words. The test split uses each held-out key at
most once (:func:`evals.suite.world.key_order`; templates with few keys, the products,
simply get fewer items), and its ``group`` is the key, ``template:a,b,c``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from evals.suite.world import split_by_key

__all__ = ["DEFAULT_SIZES", "TASK", "TEMPLATES", "make_splits"]

TASK = "mergelab_math"
DEFAULT_SIZES = {"train": 3000, "test": 1200, "calibration": 64}
MAX_ANSWER = 20
HELD_OUT_FRACTION = 0.25

NAMES = (("Tom", "He"), ("Sam", "He"), ("Ben", "He"), ("Max", "He"), ("Leo", "He"),
         ("Ana", "She"), ("Mia", "She"), ("Eva", "She"), ("Zoe", "She"),
         ("Amy", "She"))  # fmt: skip
OBJECTS = ("apples", "pens", "eggs", "cards", "books", "coins", "shells", "stamps", "cups")


def _add(x: int, y: int) -> int:
    return x + y


def _sub(x: int, y: int) -> int:
    return x - y


def _mul(x: int, y: int) -> int:
    return x * y


_SYMBOL: dict[Callable[[int, int], int], str] = {_add: "+", _sub: "-", _mul: "*"}


@dataclass(frozen=True)
class Template:
    name: str
    text: str  # placeholders: {n} name, {p} pronoun, {o} objects, {a} {b} {c}
    first: Callable[[int, int], int]  # x = first(a, b)
    second: Callable[[int, int], int]  # answer = second(x, c)
    ranges: tuple[range, range, range]

    def compute(self, a: int, b: int, c: int) -> int:
        return self.second(self.first(a, b), c)


TEMPLATES: tuple[Template, ...] = (
    Template(
        "add_sub",
        "{n} has {a} {o}. {p} gets {b} more and then gives away {c}. "
        "How many {o} does {n} have now?",
        _add,
        _sub,
        (range(1, 20), range(1, 20), range(1, 21)),
    ),
    Template(
        "sub_add",
        "{n} has {a} {o}. {p} loses {b} and then finds {c} more. How many {o} does {n} have now?",
        _sub,
        _add,
        (range(2, 21), range(1, 20), range(1, 20)),
    ),
    Template(
        "add_add",
        "{n} has {a} {o}. {p} gets {b} more and then {c} more. How many {o} does {n} have now?",
        _add,
        _add,
        (range(1, 20), range(1, 20), range(1, 20)),
    ),
    Template(
        "sub_sub",
        "{n} has {a} {o}. {p} gives away {b} and then loses {c}. How many {o} does {n} have now?",
        _sub,
        _sub,
        (range(3, 21), range(1, 20), range(1, 20)),
    ),
    Template(
        "mul_add",
        "{n} buys {a} bags with {b} {o} in each. Then {lp} gets {c} more. "
        "How many {o} does {n} have now?",
        _mul,
        _add,
        (range(2, 11), range(2, 11), range(1, 20)),
    ),
    Template(
        "mul_sub",
        "{n} buys {a} bags with {b} {o} in each. Then {lp} gives away {c}. "
        "How many {o} does {n} have now?",
        _mul,
        _sub,
        (range(2, 11), range(2, 11), range(1, 21)),
    ),
    Template(
        "add_mul",
        "{n} has {a} red boxes and {b} blue boxes. Each box has {c} {o}. "
        "How many {o} does {n} have in all?",
        _add,
        _mul,
        (range(1, 20), range(1, 20), range(2, 11)),
    ),
    Template(
        "sub_mul",
        "{n} has {a} bags and gives away {b} of them. Each bag has {c} {o}. "
        "How many {o} does {n} have now?",
        _sub,
        _mul,
        (range(2, 21), range(1, 20), range(2, 11)),
    ),
)


def _keys(template: Template) -> list[tuple[int, int, int]]:
    """Every ``(a, b, c)`` in the template's ranges whose intermediate result is in
    1..MAX_ANSWER and whose answer is in 0..MAX_ANSWER."""
    ra, rb, rc = template.ranges
    return [
        (a, b, c)
        for a in ra
        for b in rb
        if 1 <= template.first(a, b) <= MAX_ANSWER
        for c in rc
        if 0 <= template.compute(a, b, c) <= MAX_ANSWER
    ]


def _doc(r: random.Random, doc_id: str, t_index: int, key: tuple[int, int, int]) -> dict:
    template = TEMPLATES[t_index]
    name, pronoun = r.choice(NAMES)
    obj = r.choice(OBJECTS)
    a, b, c = key
    question = template.text.format(n=name, p=pronoun, lp=pronoun.lower(), o=obj, a=a, b=b, c=c)
    answer = template.compute(a, b, c)
    x = template.first(a, b)
    s1, s2 = _SYMBOL[template.first], _SYMBOL[template.second]
    target = f" {a} {s1} {b} = {x}, {x} {s2} {c} = {answer}. So {answer}"
    prompt = f"Problem: {question}\nAnswer:"
    return {
        "id": doc_id,
        "prompt": prompt,
        "target": target,
        "text": prompt + target,
        "question": question,
        "answer": answer,
        "template": template.name,
        "numbers": [a, b, c],
        "group": f"{template.name}:{a},{b},{c}",
    }


def make_splits(seed: int, sizes: dict) -> dict[str, dict[str, list[dict]]]:
    """``{TASK: {"train": [...], "calibration": [...], "test": [...]}}``; test keys are
    disjoint from train and calibration keys."""
    pools = [_keys(template) for template in TEMPLATES]
    return split_by_key(seed, "math", TASK, pools, _doc, sizes, HELD_OUT_FRACTION)
