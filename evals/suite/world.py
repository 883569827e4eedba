"""A seeded random world of made-up people and their attributes (the knowledge category).

Every entity has a made-up two-syllable name (``Kalo``, ``Mirez``...) and one value per
attribute (home city, favourite colour, job). Values come from small fixed vocabularies so a
tiny BPE tokenizer learns them as whole tokens; the *assignment* of values to entities is the
knowledge a model must memorise, and it is fixed by the seed.

Also home to the shared :func:`rng` helper: every random choice in the suite draws from a
``random.Random`` seeded with a string built from ``(seed, SUITE_VERSION, purpose)``, which
Python hashes with SHA-512 (independent of ``PYTHONHASHSEED`` and of the platform).

And the shared key-split machinery of the math and code categories (:func:`split_by_key`,
:func:`key_order`): a problem's *key* is what makes two problems the same problem (a
template and its numbers); everything else is surface.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Entity",
    "World",
    "key_order",
    "make_world",
    "rng",
    "split_by_key",
]

# 2: benign safety look-alikes split by frame; math answers show steps.
# 3: 1,200-item test splits of (nearly) distinct keys; every doc names its cluster ("group").
SUITE_VERSION = "3"


def rng(seed: int, purpose: str) -> random.Random:
    """A ``random.Random`` for one purpose, deterministic from ``(seed, SUITE_VERSION)``."""
    return random.Random(f"mergelab-suite/v{SUITE_VERSION}/seed={int(seed)}/{purpose}")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its values and the question that asks it."""

    name: str
    values: tuple[str, ...]
    question: str  # "{name}" placeholder; the test format wraps it as "Q: ...\nA:"


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        name="city",
        values=("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid"),
        question="Where does {name} live?",
    ),
    Attribute(
        name="color",
        values=("red", "blue", "green", "yellow", "black", "white", "pink", "orange"),
        question="What color does {name} like?",
    ),
    Attribute(
        name="job",
        values=("baker", "doctor", "farmer", "pilot", "teacher", "singer", "painter", "driver"),
        question="What is the job of {name}?",
    ),
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = ("", "", "", "n", "r", "s")  # most names end in a vowel
# Made-up names must not collide with ordinary words or with names used elsewhere in the suite.
_RESERVED = frozenset(
    {"Dana", "Lara", "Tina", "Nina", "Sara", "Mara", "Rosa", "Pete", "Kate", "Mike", "Rose"}
)


@dataclass(frozen=True)
class Entity:
    name: str
    attrs: tuple[tuple[str, str], ...]  # ((attribute, value), ...) in ATTRIBUTES order

    def get(self, attribute: str) -> str:
        return dict(self.attrs)[attribute]


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple[Entity, ...]

    def facts(self) -> list[tuple[Entity, Attribute]]:
        """Every (entity, attribute) pair, in a fixed order."""
        return [(e, a) for e in self.entities for a in ATTRIBUTES]


def _make_names(r: random.Random, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        syllables = "".join(r.choice(_CONSONANTS) + r.choice(_VOWELS) for _ in range(2))
        name = (syllables + r.choice(_CODAS)).capitalize()
        if name in seen or name in _RESERVED:
            continue
        seen.add(name)
        names.append(name)
    return names


def make_world(seed: int, n_entities: int = 64) -> World:
    """``n_entities`` made-up people with one value per attribute, fixed by ``seed``.

    Values are assigned round-robin over a shuffled order, so every value of an attribute is
    used about equally often (a model cannot beat chance by always answering the most common
    value).
    """
    if n_entities < 1:
        raise ValueError(f"n_entities must be >= 1, got {n_entities}")
    r = rng(seed, "world")
    names = _make_names(r, n_entities)
    columns: list[list[str]] = []
    for attr in ATTRIBUTES:
        column = [attr.values[i % len(attr.values)] for i in range(n_entities)]
        r.shuffle(column)
        columns.append(column)
    entities = tuple(
        Entity(name, tuple((a.name, columns[j][i]) for j, a in enumerate(ATTRIBUTES)))
        for i, name in enumerate(names)
    )
    return World(seed=seed, entities=entities)


def key_order(
    r: random.Random, pools: Sequence[Sequence[Any]], n: int, *, distinct_first: bool
) -> list[tuple[int, Any]]:
    """``n`` ``(pool index, key)`` pairs; each pool is used in its own shuffled order,
    starting again (reshuffled) when all its keys are used.

    ``distinct_first=False`` (training): pools take turns, so every template gets an equal
    share however many keys it has. ``distinct_first=True`` (test): pools still take turns,
    but a pool whose keys are all used skips its turn until every pool's are, so no key
    repeats while another is unused (the share of a template with few keys is its key count).
    """
    orders = [r.sample(list(pool), len(pool)) for pool in pools]
    live = [t for t, keys in enumerate(orders) if keys]
    if n > 0 and not live:
        raise ValueError("no keys to draw from")
    used = [0] * len(orders)
    cap = [len(keys) for keys in orders]  # draws allowed per pool in the current pass
    out: list[tuple[int, Any]] = []
    while len(out) < n:
        turn = [t for t in live if not distinct_first or used[t] < cap[t]]
        if not turn:  # every key used once more: a new pass
            cap = [c + len(keys) for c, keys in zip(cap, orders, strict=True)]
            continue
        for t in turn[: n - len(out)]:
            keys = orders[t]
            if used[t] and used[t] % len(keys) == 0:
                keys[:] = r.sample(keys, len(keys))
            out.append((t, keys[used[t] % len(keys)]))
            used[t] += 1
    return out


def split_by_key(
    seed: int,
    name: str,
    task: str,
    key_pools: Sequence[Sequence[Any]],
    make_doc: Callable[[random.Random, str, int, Any], dict],
    sizes: Mapping[str, int],
    held_out: float,
) -> dict[str, dict[str, list[dict]]]:
    """Hold out a ``held_out`` share (at least one) of each pool's keys for the test split;
    train and calibration draw from the rest (:func:`key_order`, distinct keys first for
    test). ``make_doc(r, doc_id, pool_index, key)`` draws the surface; a prompt already in
    the split is redrawn (a few times), so repeated keys still vary in wording. Each split
    has its own seeded generator: ``{task: {split: docs}}`` is deterministic from
    ``(seed, name)``."""
    r = rng(seed, f"{name}/split")
    train_pools, test_pools = [], []
    for pool in key_pools:
        keys = list(pool)
        r.shuffle(keys)
        n_out = max(1, round(len(keys) * held_out))
        test_pools.append(keys[:n_out])
        train_pools.append(keys[n_out:])
    pools = {"train": train_pools, "calibration": train_pools, "test": test_pools}
    out: dict[str, list[dict]] = {}
    for split in ("train", "calibration", "test"):
        rs = rng(seed, f"{name}/{split}")
        docs: list[dict] = []
        seen: set[str] = set()
        order = key_order(rs, pools[split], int(sizes[split]), distinct_first=split == "test")
        for i, (t, key) in enumerate(order):
            for _attempt in range(8):
                doc = make_doc(rs, f"{name}-{split}-{i:05d}", t, key)
                if doc["prompt"] not in seen:
                    break
            seen.add(doc["prompt"])
            docs.append(doc)
        out[split] = docs
    return {task: out}
