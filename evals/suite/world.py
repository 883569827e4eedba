"""A seeded random world of made-up people and their attributes (the knowledge category).

Every entity has a made-up two-syllable name (``Kalo``, ``Mirez``...) and one value per
attribute (home city, favourite colour, job). Values come from small fixed vocabularies so a
tiny BPE tokenizer learns them as whole tokens; the *assignment* of values to entities is the
knowledge a model must memorise, and it is fixed by the seed.

Also home to the shared :func:`rng` helper: every random choice in the suite draws from a
``random.Random`` seeded with a string built from ``(seed, SUITE_VERSION, purpose)``, which
Python hashes with SHA-512 (independent of ``PYTHONHASHSEED`` and of the platform).
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
    "make_world",
    "rng",
]

SUITE_VERSION = "2"  # 2: benign safety look-alikes split by frame; math answers show steps


def rng(seed: int, purpose: str) -> random.Random:
    """A ``random.Random`` for one purpose, deterministic from ``(seed, SUITE_VERSION)``."""
    return random.Random(f"mergelab-suite/v{SUITE_VERSION}/seed={int(seed)}/{purpose}")


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its values, the test question and the statement phrasings."""

    name: str
    values: tuple[str, ...]
    question: str  # "{name}" placeholder; the test format wraps it as "Q: ...\nA:"
    statements: tuple[str, ...]  # "{name}" and "{value}" placeholders


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        name="city",
        values=("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid"),
        question="Where does {name} live?",
        statements=(
            "{name} lives in {value}.",
            "{name} has a home in {value}.",
            "The home of {name} is in {value}.",
        ),
    ),
    Attribute(
        name="color",
        values=("red", "blue", "green", "yellow", "black", "white", "pink", "orange"),
        question="What color does {name} like?",
        statements=(
            "{name} likes the color {value}.",
            "The favorite color of {name} is {value}.",
            "{name} loves {value} things.",
        ),
    ),
    Attribute(
        name="job",
        values=("baker", "doctor", "farmer", "pilot", "teacher", "singer", "painter", "driver"),
        question="What is the job of {name}?",
        statements=(
            "{name} works as a {value}.",
            "{name} is a {value}.",
            "The job of {name} is {value}.",
        ),
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


def split_by_key(
    seed: int,
    name: str,
    task: str,
    key_pools: Sequence[Sequence[Any]],
    draw: Callable[[random.Random, list[list[Any]], int, str], list[dict]],
    sizes: Mapping[str, int],
    held_out: float,
) -> dict[str, dict[str, list[dict]]]:
    """Hold out a ``held_out`` share (at least one) of each pool's keys for the test split;
    train and calibration draw from the rest. Each split has its own seeded generator, so
    ``{task: {split: docs}}`` is deterministic from ``(seed, name)``."""
    r = rng(seed, f"{name}/split")
    train_pools, test_pools = [], []
    for pool in key_pools:
        keys = list(pool)
        r.shuffle(keys)
        n_out = max(1, round(len(keys) * held_out))
        test_pools.append(keys[:n_out])
        train_pools.append(keys[n_out:])
    pools = {"train": train_pools, "calibration": train_pools, "test": test_pools}
    return {
        task: {
            split: draw(rng(seed, f"{name}/{split}"), pools[split], int(sizes[split]), split)
            for split in ("train", "calibration", "test")
        }
    }
