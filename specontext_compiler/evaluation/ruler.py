"""A RULER-style synthetic long-context suite, written from the task descriptions of NVIDIA's RULER
(Hsieh et al., 2024; Apache-2.0): no dataset, no download, every sample from a seed.

Tasks (RULER's names in brackets):

* needle in a haystack, the haystack being repeated noise sentences, natural text, or other needles:
  ``niah_single_noise`` [niah_single_1], ``niah_single_text`` [niah_single_2],
  ``niah_single_word`` (a word as the value), ``niah_single_uuid`` [niah_single_3],
  ``niah_multikey_text`` [niah_multikey_1: 4 keys, one asked], ``niah_multikey_needles``
  [niah_multikey_2: the haystack is needles], ``niah_multikey_uuid`` [niah_multikey_3: UUID keys and
  values among needles], ``niah_multivalue`` [4 values for one key], ``niah_multiquery`` [4 keys asked];
* ``variable_tracking`` [vt]: a chain of 4 hops of ``VAR X = VAR Y`` in noise; name every variable
  holding the value;
* ``common_words`` [cwe]: a numbered list where 10 words appear 30 times and the rest 3; name the 10;
* ``frequent_words`` [fwe]: coded words drawn from a Zipf law (alpha 2); name the 3 most frequent.

Each prompt ends with RULER's answer prefix (for a chat model, at the start of the assistant's turn),
so the answer is the first thing generated. Score: the share of the reference strings found in the
output, case-insensitively (RULER's ``string_match_all``). Lengths are in tokens of the whole input,
fitted by a binary search over the number of haystack units.

Splits: ``"fit"`` is :data:`FIT_TASKS` on the ``"reference"`` text source; ``"heldout"`` is every task
on the ``"docstrings"`` source, with other seeds (:mod:`.texts`). Whatever is tuned (a head, a guard
threshold) is tuned on ``"fit"`` only.
"""

from __future__ import annotations

import random
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import texts

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "calm", "careful", "cheerful", "clever", "cold", "crimson",
    "curious", "dark", "dusty", "eager", "early", "electric", "elegant", "empty", "fancy", "fierce",
    "fragile", "frozen", "gentle", "giant", "golden", "graceful", "green", "hidden", "hollow", "humble",
    "icy", "jolly", "lazy", "little", "lively", "lonely", "loud", "lucky", "magnetic", "massive",
    "mellow", "misty", "modern", "muddy", "narrow", "noble", "odd", "orange", "pale", "patient",
    "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "restless", "rough", "royal",
    "rustic", "salty", "scarlet", "shiny", "silent", "silver", "sleepy", "slow", "smooth", "solid",
    "sour", "spicy", "stormy", "strange", "sturdy", "sunny", "swift", "tall", "tame", "tender",
    "tidy", "tiny", "velvet", "vivid", "warm", "wild", "windy", "wise", "wooden", "young",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "bakery", "balloon", "banjo", "barrel", "beacon", "beetle",
    "blanket", "bottle", "bridge", "bucket", "cabin", "camera", "candle", "canyon", "carpet", "castle",
    "cedar", "chimney", "cloud", "comet", "compass", "cookie", "cottage", "crayon", "crystal", "dagger",
    "desert", "dolphin", "dragon", "drum", "eagle", "ember", "engine", "falcon", "feather", "fiddle",
    "forest", "fountain", "garden", "garlic", "glacier", "goblet", "harbor", "helmet", "hammer", "island",
    "jacket", "jungle", "kettle", "ladder", "lantern", "lemon", "lizard", "magnet", "mango", "marble",
    "meadow", "mirror", "monkey", "needle", "oasis", "orchard", "otter", "paddle", "parrot", "pebble",
    "pepper", "piano", "pillow", "planet", "pocket", "puzzle", "quartz", "rabbit", "raven", "ribbon",
    "river", "rocket", "saddle", "sailor", "salmon", "scarf", "shadow", "shovel", "spider", "spoon",
    "statue", "tiger", "tomato", "tractor", "trumpet", "tunnel", "turtle", "umbrella", "valley", "violin",
    "wagon", "walnut", "whistle", "window", "wizard", "zebra",
)

SPLITS = ("fit", "heldout")
SPLIT_SOURCES = {"fit": "reference", "heldout": "docstrings"}


@dataclass(frozen=True)
class Sample:
    """One prompt of the suite."""

    task: str
    split: str
    index: int
    input_ids: torch.Tensor  # [1, T]
    references: tuple[str, ...]
    max_new_tokens: int
    text: str = field(repr=False)  # the decoded input, for inspection

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def score(self, output: str) -> float:
        """Share of the reference strings found in ``output`` (case-insensitive)."""
        return string_match_all(output, self.references)


def string_match_all(output: str, references) -> float:
    """RULER's metric: the share of ``references`` that occur in ``output``, ignoring case."""
    output = output.lower()
    return sum(reference.lower() in output for reference in references) / len(references)


# -- values ---------------------------------------------------------------------------------------------
def _key(rng: random.Random, kind: str) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}" if kind == "words" else _uuid(rng)


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return rng.choice(NOUNS)
    return _uuid(rng)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, make: Callable[[random.Random], str], count: int, avoid=()) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = make(rng)
        if value not in out and value not in avoid:
            out.append(value)
    return out


# -- haystacks ------------------------------------------------------------------------------------------
def _text_units(rng: random.Random, source: str) -> Callable[[int], list[str]]:
    """``units(n)``: n consecutive sentences of the source from a random start (wrapping around)."""
    sentences = texts.sentences(source)
    start = rng.randrange(len(sentences))
    return lambda n: [sentences[(start + i) % len(sentences)] for i in range(n)]


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """``units`` with each needle inserted before the unit at its relative depth."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda pair: pair[1], reverse=True):
        out.insert(round(depth * len(units)), needle)
    return out


@dataclass(frozen=True)
class Prompt:
    """A task instance before its length is fitted: the haystack as ``units(n)`` -> context text."""

    context: Callable[[int], str]
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    max_new_tokens: int


# -- tasks ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Niah:
    """RULER's needle-in-a-haystack family."""

    haystack: str  # "noise", "text" or "needles"
    keys: str = "words"  # "words" or "uuids"
    values: str = "numbers"  # "numbers", "words" or "uuids"
    num_keys: int = 1  # needles with distinct keys
    num_values: int = 1  # values per asked key
    num_queries: int = 1  # keys asked

    def build(self, rng: random.Random, source: str) -> Prompt:
        keys = _distinct(rng, lambda r: _key(r, self.keys), max(self.num_keys, self.num_queries))
        values = {key: _distinct(rng, lambda r: _value(r, self.values), self.num_values) for key in keys}
        asked = keys[: self.num_queries]
        kind = {"numbers": "numbers", "words": "words", "uuids": "uuids"}[self.values]
        needles = [f"One of the special magic {kind} for {key} is: {value}." for key in keys for value in values[key]]
        depths = [rng.random() for _ in needles]
        if self.haystack == "noise":
            units = lambda n: [NOISE] * n
        elif self.haystack == "text":
            units = _text_units(rng, source)
        else:  # needles: other keys with their own values make up the haystack
            taken = set(keys)

            def units(n, seed=rng.random()):
                local = random.Random(seed)
                return [f"One of the special magic {kind} for {k} is: {_value(local, self.values)}."
                        for k in _distinct(local, lambda r: _key(r, self.keys), n, avoid=taken)]

        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + f", and {asked[-1]}"
        single = self.num_values == 1 and self.num_queries == 1
        noun = kind[:-1] if single else kind
        verb = "is" if single else "are"
        question = f"What {verb} {'the' if single else 'all the'} special magic {noun} for {query} mentioned in the provided text?"
        answer_prefix = f"The special magic {noun} for {query} mentioned in the provided text {verb}"
        preamble = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {kind} afterwards.")
        references = tuple(value for key in asked for value in values[key])
        per_value = {"numbers": 10, "words": 8, "uuids": 40}[self.values]
        return Prompt(
            context=lambda n: preamble + "\n" + " ".join(_insert(units(n), needles, depths)),
            question=question, answer_prefix=answer_prefix, references=references,
            max_new_tokens=per_value * len(references) + 4,
        )


@dataclass(frozen=True)
class VariableTracking:
    """RULER's vt: ``VAR A = 12345``, then ``VAR B = VAR A`` ... hidden in noise; name all of them."""

    hops: int = 4

    def build(self, rng: random.Random, source: str) -> Prompt:
        names = _distinct(rng, lambda r: "".join(r.choice(string.ascii_uppercase) for _ in range(5)), self.hops + 1)
        value = str(rng.randint(10_000, 99_999))
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.random() for _ in statements)
        return Prompt(
            context=lambda n: ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                               + " ".join(_insert([NOISE] * n, statements, depths))),
            question=f"Question: Find all variables that are assigned the value {value} in the text above.",
            answer_prefix=(f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                           f"variables are assigned the value {value}, they are:"),
            references=tuple(names), max_new_tokens=8 * len(names),
        )


def _source_words(source: str) -> list[str]:
    words = sorted({w.lower() for s in texts.sentences(source) for w in s.split()
                    if w.isalpha() and w.islower() and 4 <= len(w) <= 10})
    return words


@dataclass(frozen=True)
class CommonWords:
    """RULER's cwe: a numbered list; ``common`` words appear ``frequent`` times, the others ``rare`` times."""

    common: int = 10
    frequent: int = 30
    rare: int = 3

    def build(self, rng: random.Random, source: str) -> Prompt:
        pool = _source_words(source)
        rng.shuffle(pool)
        common, others = pool[: self.common], pool[self.common:]
        order_seed = rng.random()

        def context(n: int) -> str:  # n rare words
            words = common * self.frequent + others[:n] * self.rare
            random.Random(order_seed).shuffle(words)
            numbered = "\n".join(f"{i + 1}. {word}" for i, word in enumerate(words))
            return ("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n" + numbered)

        return Prompt(
            context=context, question=f"Question: What are the {self.common} most common words in the above list?",
            answer_prefix=f"Answer: The top {self.common} words that appear most often in the list are:",
            references=tuple(common), max_new_tokens=6 * self.common,
        )


@dataclass(frozen=True)
class FrequentWords:
    """RULER's fwe: coded words drawn from a Zipf law; the three most frequent are the answer."""

    alpha: float = 2.0
    vocabulary: int = 400

    def build(self, rng: random.Random, source: str) -> Prompt:
        coded = _distinct(rng, lambda r: "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(4, 6))),
                          self.vocabulary)
        weights = [rank ** -self.alpha for rank in range(1, self.vocabulary + 1)]
        draw_seed = rng.random()

        def words(n: int) -> list[str]:
            return random.Random(draw_seed).choices(coded, weights, k=n)

        def top3(n: int) -> tuple[str, ...]:
            counts = Counter(words(n)).most_common(4)
            return tuple(word for word, _ in counts[:3])

        def context(n: int) -> str:
            drawn = words(n)
            text = " ".join(w if i % 10 else "...." + " " + w for i, w in enumerate(drawn))
            return ("Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. " + text)

        return Prompt(
            context=context,
            question=("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                      "frequently appeared words in the above coded text?"),
            answer_prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
            references=top3, max_new_tokens=24,  # references depend on the fitted length (see make_sample)
        )


TASKS: dict[str, object] = {
    "niah_single_noise": Niah("noise"),
    "niah_single_text": Niah("text"),
    "niah_single_word": Niah("text", values="words"),
    "niah_single_uuid": Niah("text", values="uuids"),
    "niah_multikey_text": Niah("text", num_keys=4),
    "niah_multikey_needles": Niah("needles"),
    "niah_multikey_uuid": Niah("needles", keys="uuids", values="uuids"),
    "niah_multivalue": Niah("text", num_values=4),
    "niah_multiquery": Niah("text", num_keys=4, num_queries=4),
    "variable_tracking": VariableTracking(),
    "common_words": CommonWords(),
    "frequent_words": FrequentWords(),
}
NIAH_TASKS = tuple(name for name in TASKS if name.startswith("niah"))
#: The only tasks anything is fitted on (with the "reference" text source).
FIT_TASKS = ("niah_single_noise", "niah_single_text", "niah_multikey_text")


def tasks_of(split: str) -> tuple[str, ...]:
    """The tasks of a split: the fit tasks, or every task for the held-out split."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(map(repr, SPLITS))}")
    return FIT_TASKS if split == "fit" else tuple(TASKS)


def encode(tokenizer, prompt: str, answer_prefix: str, chat: bool) -> torch.Tensor:
    """Token ids [1, T] of the prompt: a chat turn with the answer prefix opening the reply, or plain text."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False) + answer_prefix
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt + "\n" + answer_prefix)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def make_sample(task: str, tokenizer, length: int, index: int, split: str = "fit", chat: bool = True) -> Sample:
    """Prompt ``index`` of ``task`` at about ``length`` input tokens (never more), for ``split``."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(map(repr, SPLITS))}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise ValueError(f"length must be an int of at least 256 tokens; got {length!r}")
    rng = random.Random(f"{task}/{split}/{length}/{index}")
    prompt = TASKS[task].build(rng, SPLIT_SOURCES[split])

    def ids(n: int) -> torch.Tensor:
        return encode(tokenizer, prompt.context(n) + "\n" + prompt.question, prompt.answer_prefix, chat)

    shortest = ids(1).shape[1]
    if shortest > length:
        raise ValueError(f"task {task!r} needs at least {shortest} tokens of input; got length={length}")
    low, high = 1, 8
    while ids(high).shape[1] <= length:  # grow until too long, then bisect
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if ids(middle).shape[1] <= length:
            low = middle
        else:
            high = middle
    input_ids = ids(low)
    references = prompt.references(low) if callable(prompt.references) else prompt.references
    return Sample(task, split, index, input_ids, tuple(references), prompt.max_new_tokens,
                  tokenizer.decode(input_ids[0]))


def suite(tokenizer, tasks, lengths, prompts: int, split: str = "fit", chat: bool = True, first: int = 0) -> list[Sample]:
    """Every (task, length, prompt index) sample, in that order."""
    return [make_sample(task, tokenizer, length, index, split, chat)
            for task in tasks for length in lengths for index in range(first, first + prompts)]
