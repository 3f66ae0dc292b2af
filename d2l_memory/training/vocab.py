"""Made-up names and values, split deterministically into train and held-out by a hash of the string.

A value's split depends only on its text, so a held-out entity, city or number can never be
generated for training, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

Split = Literal["train", "test"]
HELD_OUT_PERCENT = 15

_ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "qu",
           "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "zh", ""]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ei", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk", "st"]
_CITY_SUFFIXES = ["holt", "burg", "ford", "mere", "wick", "stad", "port", "dale", "haven", "ton"]
_STREET_KINDS = ["Lane", "Road", "Street", "Avenue", "Way"]
_COMPANY_SUFFIXES = [" Labs", " Works", " Systems", " & Co", " Group"]
_ERROR_SUFFIXES = ["Error", "Exception", "Fault", "Timeout"]

CLOSED_SETS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "teal", "black", "white", "grey", "pink", "brown"),
    "job": ("baker", "pilot", "nurse", "teacher", "carpenter", "chemist", "lawyer", "farmer", "painter", "engineer",
            "librarian", "plumber", "dentist", "architect", "journalist"),
    "food": ("pizza", "sushi", "pancakes", "lentil soup", "tacos", "dumplings", "risotto", "curry", "falafel",
             "lasagna", "noodles", "paella"),
    "instrument": ("violin", "piano", "cello", "flute", "trumpet", "drums", "guitar", "harp", "clarinet", "banjo"),
    "sport": ("tennis", "rowing", "chess", "cycling", "swimming", "fencing", "archery", "climbing", "judo", "golf"),
    "animal": ("cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "ferret", "iguana", "owl"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
}


def split_of(value: str) -> Split:
    h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:4], "big")
    return "test" if h % 100 < HELD_OUT_PERCENT else "train"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def in_split(make, rng: random.Random, split: Split, tries: int = 200) -> str:  # noqa: ANN001 - a small factory
    for _ in range(tries):
        value = make(rng)
        if split_of(value) == split:
            return value
    raise RuntimeError("could not draw a value in the requested split")  # pragma: no cover - p < 1e-14


def person_name(rng: random.Random, split: Split) -> str:
    def draw(r: random.Random) -> str:
        first = _word(r, r.randint(1, 2)).capitalize()
        last = _word(r, r.randint(2, 3)).capitalize()
        return f"{first} {last}"

    return in_split(draw, rng, split)


def pet_name(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: _word(r, 2).capitalize(), rng, split)


def city(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: _word(r, r.randint(1, 2)).capitalize() + r.choice(_CITY_SUFFIXES), rng, split)


def street(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: f"{r.randint(2, 98)} {_word(r, 2).capitalize()} {r.choice(_STREET_KINDS)}", rng, split)


def company(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: _word(r, 2).capitalize() + r.choice(_COMPANY_SUFFIXES), rng, split)


def number4(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: str(r.randint(1000, 9999)), rng, split)


def year(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: str(r.randint(1700, 2099)), rng, split)


def identifier(rng: random.Random, split: Split) -> str:
    """snake_case names for tools and parameters."""
    return in_split(lambda r: "_".join(_word(r, r.randint(1, 2)) for _ in range(r.randint(2, 3))), rng, split)


def error_name(rng: random.Random, split: Split) -> str:
    return in_split(lambda r: _word(r, 2).capitalize() + r.choice(_ERROR_SUFFIXES), rng, split)


def closed(rng: random.Random, kind: str) -> str:
    return rng.choice(CLOSED_SETS[kind])
