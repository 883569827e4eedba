"""General text: short templated English stories, the bulk of the base model's pretraining.

Plain narrative sentences ("Lily went to the park with her dad. It was a sunny day..."),
deliberately *unlike* the four task formats (no "Q:", "Problem:", "#" or "User:"), but
sharing much of their vocabulary (colours, cities, jobs, numbers, everyday objects) so a BPE
tokenizer trained on the suite has tokens for every category and the base model has seen
the words before any expert is fine-tuned.
"""

from __future__ import annotations

import random

from evals.suite.world import ATTRIBUTES, rng

__all__ = ["DEFAULT_SIZES", "make_texts"]

DEFAULT_SIZES = {"train": 5000}

PEOPLE = (("Lily", "her"), ("Jack", "his"), ("Emma", "her"), ("Noah", "his"),
          ("Grace", "her"), ("Oscar", "his"), ("Ruby", "her"), ("Henry", "his"),
          ("Alice", "her"), ("Felix", "his"))  # fmt: skip
RELATIVES = ("mom", "dad", "sister", "brother", "friend", "grandma", "uncle", "dog")
PLACES = ("park", "market", "school", "beach", "library", "farm", "river", "forest", "shop",
          "garden", "station", "museum")  # fmt: skip
ANIMALS = ("cat", "dog", "bird", "horse", "fox", "rabbit", "duck", "cow", "frog", "goat")
ADJECTIVES = ("small", "big", "quiet", "happy", "old", "young", "funny", "tired", "brave", "kind")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy", "bright", "snowy")
SEASONS = ("spring", "summer", "autumn", "winter")
FOODS = ("apples", "bread", "soup", "cake", "eggs", "rice", "cookies", "pears", "cheese")
THINGS = ("ball", "kite", "book", "hat", "box", "cup", "letter", "map", "bag", "shell")
FEELINGS = ("happy", "sleepy", "proud", "calm", "full", "glad", "excited", "warm")
TOPICS = ("stars", "boats", "trains", "birds", "old castles", "the sea", "music", "plants")
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ACTIVITIES = ("played a game", "sang a song", "drew a picture", "built a small fort",
              "read a story", "cooked dinner", "planted seeds", "fixed a bike")  # fmt: skip
ENDINGS = ("At night, {n} slept well.", "It was a good day.", "Then everyone went home.",
           "{N} wanted to come back soon.", "The sun went down slowly.")  # fmt: skip

_CITIES, _COLORS, _JOBS = (a.values for a in ATTRIBUTES)


def _sentence(r: random.Random, name: str, pos: str) -> str:
    kind = r.randrange(10)
    if kind == 0:
        return f"{name} went to the {r.choice(PLACES)} with {pos} {r.choice(RELATIVES)}."
    if kind == 1:
        return f"It was a {r.choice(WEATHER)} day in {r.choice(SEASONS)}."
    if kind == 2:
        return (
            f"{name} saw a {r.choice(ADJECTIVES)} {r.choice(ANIMALS)} near the {r.choice(PLACES)}."
        )
    if kind == 3:
        return (
            f"{name} ate {r.choice(NUMBER_WORDS)} {r.choice(FOODS)} and felt {r.choice(FEELINGS)}."
        )
    if kind == 4:
        return f"After lunch, {name} read a book about {r.choice(TOPICS)}."
    if kind == 5:
        return f"The {r.choice(_JOBS)} gave {name} a {r.choice(_COLORS)} {r.choice(THINGS)}."
    if kind == 6:
        return f"{name} and {pos} {r.choice(RELATIVES)} {r.choice(ACTIVITIES)}."
    if kind == 7:
        return f"One day, {name} took a train to {r.choice(_CITIES)}."
    if kind == 8:
        n = r.randint(2, 12)
        animal = r.choice(ANIMALS)
        plural = animal + ("es" if animal.endswith("x") else "s")
        return f"There were {n} {plural} in the {r.choice(PLACES)}."
    return f"The {r.choice(ANIMALS)} was {r.choice(ADJECTIVES)} and {r.choice(ADJECTIVES)}."


def _story(r: random.Random) -> str:
    name, pos = r.choice(PEOPLE)
    sentences = [_sentence(r, name, pos) for _ in range(r.randint(2, 3))]
    if r.random() < 0.3:
        sentences.append(r.choice(ENDINGS).format(n=name, N=name))
    return " ".join(sentences)


def make_texts(seed: int, sizes: dict) -> list[dict]:
    """``sizes["train"]`` short stories as ``{"id", "text"}`` records."""
    r = rng(seed, "general")
    return [{"id": f"general-{i:05d}", "text": _story(r)} for i in range(int(sizes["train"]))]
