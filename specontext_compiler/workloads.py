"""Synthetic long-context workloads: documents with one fact to retrieve (tests, demo, benchmarks)."""

from __future__ import annotations

import random

TOPICS = [
    "The river valley was known for its orchards, and every autumn the farmers carried baskets of apples to the market square.",
    "Engineers inspected the old stone bridge each spring, measuring the cracks and writing long reports for the town council.",
    "In the library, a quiet room held maps of distant coastlines, drawn by sailors who had crossed the northern sea.",
    "The weather station on the hill recorded wind, rain and temperature every hour, and the data filled many notebooks.",
    "Children in the village learned to play the violin, and the school held a concert in the hall at the end of the year.",
    "A small bakery near the harbor opened before dawn, and the smell of fresh bread drifted along the wooden piers.",
    "The museum displayed clocks from many centuries, some with gears of brass and others carved entirely from wood.",
    "Hikers followed the trail through the pine forest, stopping at the lake to rest and watch the herons fish.",
]

CODE_WORDS = ["PELICAN", "MARBLE", "TORNADO", "SAPPHIRE", "LANTERN", "BISCUIT", "VOLCANO", "HARMONICA",
              "CACTUS", "GLACIER", "PUMPKIN", "TRUMPET", "MEADOW", "COMPASS", "FALCON", "NUTMEG"]


def code_word_document(tokenizer, target_tokens: int = 2000, code_word: str = "PELICAN", depth: float = 0.5, seed: int = 0):
    """A chat prompt of about ``target_tokens`` tokens: filler paragraphs, one sentence with the code word
    at relative ``depth``, and the question. Returns (input_ids [1, T], code_word)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while len(tokenizer.encode(" ".join(sentences))) < target_tokens - 80:
        sentences.append(rng.choice(TOPICS))
    sentences.insert(int(len(sentences) * depth), f"Remember this: the secret code word is {code_word}.")
    question = "What is the secret code word? Answer with the code word only."
    messages = [{"role": "user", "content": " ".join(sentences) + "\n\n" + question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not hasattr(ids, "shape"):
        ids = ids["input_ids"]
    return ids, code_word
