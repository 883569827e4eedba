"""Code: one-line Python functions from a one-line comment (HumanEval/MBPP-style, pass@1).

Format (greedy generation until a newline; the program ``prompt + completion`` plus three
hidden asserts runs in :mod:`evals.sandbox`)::

    # add 3 to x
    def f(x):
        return x + 3

Thirteen templates (add/subtract/multiply by k, max/min with k, remainder, divisible by k,
square plus k, length plus k, upper case / reversed plus a letter, repeat k times, first k
characters), each with a constant ``k`` (a number or a letter). A task's *key* is
``(template, k)``; the function and argument names are surface only. Per template, about a
quarter of the constants are held out for the test split; train and calibration use the
others, so no test ``(template, k)`` is ever seen in training.

The hidden tests are three ``assert f(input) == expected`` lines with inputs chosen per
template to tell a right answer from near misses (e.g. one input below and one above ``k``
for max/min); expected values come from a trusted reference implementation here.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evals.suite.world import split_by_key

__all__ = ["DEFAULT_SIZES", "TASK", "TEMPLATES", "make_splits"]

TASK = "mergelab_code"
DEFAULT_SIZES = {"train": 3000, "test": 150, "calibration": 64}
HELD_OUT_FRACTION = 0.25

FUNCTION_NAMES = ("f", "g", "h", "calc")
INT_ARGS = ("x", "n", "a", "y")
STR_ARGS = ("s", "t", "w")
WORDS = ("cat", "dog", "sun", "hello", "tree", "apple", "Blue", "house", "moon", "River",
         "Bob", "zebra", "pen", "Lamp", "sky", "mountain", "Sunflower", "basketball",
         "watermelon")  # fmt: skip
LETTERS = tuple(string.ascii_lowercase)


@dataclass(frozen=True)
class Template:
    name: str
    comment: str  # placeholders {v} (argument) and {k} (constant)
    body: str  # the expected one-line return expression
    constants: tuple[Any, ...]
    reference: Callable[[Any, Any], Any]  # (input, k) -> expected
    kind: str  # "int" | "str"


TEMPLATES: tuple[Template, ...] = (
    Template("add", "add {k} to {v}", "{v} + {k}", tuple(range(1, 31)), lambda x, k: x + k, "int"),
    Template(
        "sub", "subtract {k} from {v}", "{v} - {k}", tuple(range(1, 31)), lambda x, k: x - k, "int"
    ),
    Template(
        "mul", "multiply {v} by {k}", "{v} * {k}", tuple(range(2, 16)), lambda x, k: x * k, "int"
    ),
    Template(
        "max",
        "the larger of {v} and {k}",
        "max({v}, {k})",
        tuple(range(0, 31)),
        lambda x, k: max(x, k),
        "int",
    ),
    Template(
        "min",
        "the smaller of {v} and {k}",
        "min({v}, {k})",
        tuple(range(0, 31)),
        lambda x, k: min(x, k),
        "int",
    ),
    Template(
        "mod",
        "the remainder of {v} divided by {k}",
        "{v} % {k}",
        tuple(range(2, 16)),
        lambda x, k: x % k,
        "int",
    ),
    Template(
        "divisible",
        "check if {v} is divisible by {k}",
        "{v} % {k} == 0",
        tuple(range(2, 16)),
        lambda x, k: x % k == 0,
        "int",
    ),
    Template(
        "square_plus",
        "{v} squared plus {k}",
        "{v} * {v} + {k}",
        tuple(range(1, 31)),
        lambda x, k: x * x + k,
        "int",
    ),
    Template(
        "len_plus",
        "the length of {v} plus {k}",
        "len({v}) + {k}",
        tuple(range(1, 31)),
        lambda s, k: len(s) + k,
        "str",
    ),
    Template(
        "upper_plus",
        '{v} in upper case plus "{k}"',
        '{v}.upper() + "{k}"',
        LETTERS,
        lambda s, k: s.upper() + k,
        "str",
    ),
    Template(
        "reverse_plus",
        '{v} reversed plus "{k}"',
        '{v}[::-1] + "{k}"',
        LETTERS,
        lambda s, k: s[::-1] + k,
        "str",
    ),
    Template(
        "repeat",
        "repeat {v} {k} times",
        "{v} * {k}",
        tuple(range(2, 10)),
        lambda s, k: s * k,
        "str",
    ),
    Template(
        "first_k",
        "the first {k} characters of {v}",
        "{v}[:{k}]",
        tuple(range(1, 10)),
        lambda s, k: s[:k],
        "str",
    ),
)


def _inputs(r: random.Random, template: Template, k: Any) -> list[Any]:
    """Three distinct inputs that separate the right function from near misses."""
    if template.kind == "str":
        if template.name == "first_k":  # two longer than k, one shorter (or empty)
            longer = [w for w in WORDS if len(w) > k]
            shorter = [w for w in WORDS if len(w) < k] or [""]
            return r.sample(longer, 2) + [r.choice(shorter)]
        return r.sample(WORDS, 3)
    if template.name in ("max", "min"):  # one below k, one above, one at k or far away
        return [k - r.randint(1, 5), k + r.randint(1, 5), r.choice([k, k + 7, k - 8])]
    if template.name == "divisible":  # a multiple, a non-multiple, a larger multiple
        m = r.randint(1, 5)
        return [k * m, k * m + r.randint(1, k - 1), k * r.randint(6, 9)]
    if template.name == "mod":
        return r.sample(range(k + 1, 60), 3)
    return r.sample(range(-5, 21), 3)


def _doc(r: random.Random, doc_id: str, t_index: int, k: Any) -> dict:
    template = TEMPLATES[t_index]
    fn = r.choice(FUNCTION_NAMES)
    var = r.choice(INT_ARGS if template.kind == "int" else STR_ARGS)
    comment = template.comment.format(v=var, k=k)
    prompt = f"# {comment}\ndef {fn}({var}):\n    return"
    target = " " + template.body.format(v=var, k=k)
    inputs = _inputs(r, template, k)
    tests = [f"assert {fn}({x!r}) == {template.reference(x, k)!r}" for x in inputs]
    return {
        "id": doc_id,
        "prompt": prompt,
        "target": target,
        "text": prompt + target,
        "tests": tests,
        "entry_point": fn,
        "template": template.name,
        "constant": str(k),
    }


def _draw(r: random.Random, pools: list[list[Any]], n: int, split: str) -> list[dict]:
    """``n`` docs, templates round-robin, constants cycling through each (re)shuffled pool;
    a repeated prompt is redrawn a few times to keep the surface varied."""
    pools = [r.sample(pool, len(pool)) for pool in pools]
    docs: list[dict] = []
    seen: set[str] = set()
    cursors = [0] * len(pools)
    for i in range(n):
        t = i % len(pools)
        for _attempt in range(8):
            k = pools[t][cursors[t] % len(pools[t])]
            cursors[t] += 1
            doc = _doc(r, f"code-{split}-{i:05d}", t, k)
            if doc["prompt"] not in seen:
                break
        seen.add(doc["prompt"])
        docs.append(doc)
    return docs


def make_splits(seed: int, sizes: dict) -> dict[str, dict[str, list[dict]]]:
    """``{TASK: {"train": [...], "calibration": [...], "test": [...]}}``; test (template, k)
    keys are disjoint from train and calibration keys."""
    pools = [template.constants for template in TEMPLATES]
    return split_by_key(seed, "code", TASK, pools, _draw, sizes, HELD_OUT_FRACTION)
