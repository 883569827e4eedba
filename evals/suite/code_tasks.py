"""Code: one-line Python functions from a one-line comment (HumanEval/MBPP-style, pass@1).

Format (greedy generation until a newline; the program ``prompt + completion`` plus three
hidden asserts runs in :mod:`evals.sandbox`)::

    # add 3 to x
    def f(x):
        return x + 3

Twenty templates, each a one-line ``return`` expression with a constant ``k``: arithmetic
with a number (add, subtract, subtract from, multiply, max/min, remainder, floor division,
divisible by, greater than, square plus, length plus; ``k`` up to 99), string operations
with a letter (upper/lower case plus, reversed plus, letter in front, count of a letter;
``k`` any upper- or lower-case letter) and slicing/repetition with a small count (repeat,
first/last ``k`` characters). A task's *key* is ``(template, k)``; the function and argument
names are surface only. Per template, 40% of the constants are held out for the test split
(a larger share than math's because there are fewer code keys); train and calibration use
the others, so no test ``(template, k)`` is ever seen in training. The test split uses every
held-out key once before any repeats (:func:`evals.suite.world.key_order`; a repeated key
gets other names and inputs), and its ``group`` is the key, ``template:k``.

The hidden tests are three ``assert f(input) == expected`` lines with inputs chosen per
template to tell a right answer from near misses (one input below, one above and one at
``k`` for max/min; ``k`` and ``k + 1`` for greater than; a letter's other case and a double
occurrence for count...); expected values come from a trusted reference implementation here.
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
DEFAULT_SIZES = {"train": 3000, "test": 1200, "calibration": 64}
HELD_OUT_FRACTION = 0.4

FUNCTION_NAMES = ("f", "g", "h", "calc")
INT_ARGS = ("x", "n", "a", "y")
STR_ARGS = ("s", "t", "w")
WORDS = ("cat", "dog", "sun", "hello", "tree", "apple", "Blue", "house", "moon", "River",
         "Bob", "zebra", "pen", "Lamp", "sky", "mountain", "Sunflower", "basketball",
         "watermelon", "Strawberries", "understanding", "Constellation",
         "extraordinary")  # fmt: skip
CAPITALISED = tuple(w for w in WORDS if not w.islower())
LETTERS = tuple(string.ascii_letters)
NUMBERS = tuple(range(1, 100))


@dataclass(frozen=True)
class Template:
    name: str
    comment: str  # placeholders {v} (argument) and {k} (constant)
    body: str  # the expected one-line return expression
    constants: tuple[Any, ...]
    reference: Callable[[Any, Any], Any]  # (input, k) -> expected
    kind: str  # "int" | "str"


TEMPLATES: tuple[Template, ...] = (
    Template("add", "add {k} to {v}", "{v} + {k}", NUMBERS, lambda x, k: x + k, "int"),
    Template("sub", "subtract {k} from {v}", "{v} - {k}", NUMBERS, lambda x, k: x - k, "int"),
    Template("rsub", "subtract {v} from {k}", "{k} - {v}", NUMBERS, lambda x, k: k - x, "int"),
    Template("mul", "multiply {v} by {k}", "{v} * {k}", NUMBERS[1:], lambda x, k: x * k, "int"),
    Template("max", "the larger of {v} and {k}", "max({v}, {k})", (0, *NUMBERS), max, "int"),
    Template("min", "the smaller of {v} and {k}", "min({v}, {k})", (0, *NUMBERS), min, "int"),
    Template(
        "mod",
        "the remainder of {v} divided by {k}",
        "{v} % {k}",
        NUMBERS[1:],
        lambda x, k: x % k,
        "int",
    ),
    Template(
        "floordiv",
        "{v} divided by {k}, rounded down",
        "{v} // {k}",
        NUMBERS[1:],
        lambda x, k: x // k,
        "int",
    ),
    Template(
        "divisible",
        "check if {v} is divisible by {k}",
        "{v} % {k} == 0",
        NUMBERS[1:],
        lambda x, k: x % k == 0,
        "int",
    ),
    Template(
        "greater",
        "check if {v} is greater than {k}",
        "{v} > {k}",
        (0, *NUMBERS),
        lambda x, k: x > k,
        "int",
    ),
    Template(
        "square_plus",
        "{v} squared plus {k}",
        "{v} * {v} + {k}",
        NUMBERS,
        lambda x, k: x * x + k,
        "int",
    ),
    Template(
        "len_plus",
        "the length of {v} plus {k}",
        "len({v}) + {k}",
        NUMBERS,
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
        "lower_plus",
        '{v} in lower case plus "{k}"',
        '{v}.lower() + "{k}"',
        LETTERS,
        lambda s, k: s.lower() + k,
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
        "prefix", '{v} with "{k}" in front', '"{k}" + {v}', LETTERS, lambda s, k: k + s, "str"
    ),
    Template(
        "count",
        'the number of "{k}" in {v}',
        '{v}.count("{k}")',
        LETTERS,
        lambda s, k: s.count(k),
        "str",
    ),
    Template(
        "repeat",
        "repeat {v} {k} times",
        "{v} * {k}",
        tuple(range(2, 21)),
        lambda s, k: s * k,
        "str",
    ),
    Template(
        "first_k",
        "the first {k} characters of {v}",
        "{v}[:{k}]",
        tuple(range(1, 13)),
        lambda s, k: s[:k],
        "str",
    ),
    Template(
        "last_k",
        "the last {k} characters of {v}",
        "{v}[-{k}:]",
        tuple(range(1, 13)),
        lambda s, k: s[-k:],
        "str",
    ),
)


def _insert(r: random.Random, word: str, letter: str, times: int) -> str:
    """``word`` with ``letter`` inserted ``times`` times at random places."""
    for _ in range(times):
        i = r.randint(0, len(word))
        word = word[:i] + letter + word[i:]
    return word


def _inputs(r: random.Random, template: Template, k: Any) -> list[Any]:
    """Three distinct inputs that separate the right function from near misses."""
    name = template.name
    if name in ("first_k", "last_k"):  # two longer than k, one shorter (or empty)
        longer = [w for w in WORDS if len(w) > k]
        shorter = [w for w in WORDS if len(w) < k] or [""]
        return r.sample(longer, 2) + [r.choice(shorter)]
    if name == "count":  # k zero times (its other case once), once and twice
        a, b, c = (w.replace(k, "") for w in r.sample(WORDS, 3))
        return [_insert(r, a, k.swapcase(), 1), _insert(r, b, k, 1), _insert(r, c, k, 2)]
    if name == "lower_plus":  # at least one word with a capital letter
        first = r.choice(CAPITALISED)
        return [first, *r.sample([w for w in WORDS if w != first], 2)]
    if template.kind == "str":
        return r.sample(WORDS, 3)
    if name in ("max", "min"):  # one below k, one above, one at k or far away
        return [k - r.randint(1, 5), k + r.randint(1, 5), r.choice([k, k + 7, k - 8])]
    if name == "greater":  # below, equal (tells > from >=) and just above (> from > k + 1)
        return [k - r.randint(1, 5), k, k + 1]
    if name == "divisible":  # a multiple, a non-multiple, a larger multiple
        m = r.randint(1, 5)
        return [k * m, k * m + r.randint(1, k - 1), k * r.randint(6, 9)]
    if name == "mod":  # in (k, 2k), in (2k, 3k) and in [3k, 4k): tells % from - and //
        return [k + r.randint(1, k - 1), 2 * k + r.randint(1, k - 1), 3 * k + r.randint(0, k - 1)]
    if name == "floordiv":  # below k (0), a non-multiple (tells // from /), a multiple
        return [r.randint(1, k - 1), k * r.randint(1, 5) + r.randint(1, k - 1), k * r.randint(2, 9)]
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
        "group": f"{template.name}:{k}",
    }


def make_splits(seed: int, sizes: dict) -> dict[str, dict[str, list[dict]]]:
    """``{TASK: {"train": [...], "calibration": [...], "test": [...]}}``; test (template, k)
    keys are disjoint from train and calibration keys."""
    pools = [template.constants for template in TEMPLATES]
    return split_by_key(seed, "code", TASK, pools, _doc, sizes, HELD_OUT_FRACTION)
