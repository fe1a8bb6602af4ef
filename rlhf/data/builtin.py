"""The built-in verifiable dataset: preference pairs whose right answer a program can check.

Every prompt comes from a task family whose answer can be recomputed from the prompt text alone, so `score` can
grade any response (the gold scorer later stages use to measure a policy honestly). Chosen answers are correct and
helpful; rejected ones are plausible wrong answers or unhelpful replies. Deterministic for a seed, no download.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    family: str


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[random.Random], tuple[str, str]]  # -> (prompt, canonical answer)
    solve: Callable[[str], str | None]  # prompt -> canonical answer, None if the prompt is not of this family
    explain: Callable[[str, str], str]  # (prompt, answer) -> a helpful response stating that answer


UNHELPFUL = [
    "I'm not sure, you should work it out yourself.",
    "That is a hard question. I cannot help with that.",
    "Sorry, I don't know.",
    "It depends.",
]

ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cookies", "cards"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jo"]
WORDS = [
    "planet",
    "garden",
    "silver",
    "rocket",
    "window",
    "basket",
    "forest",
    "candle",
    "bridge",
    "mirror",
    "orange",
    "pocket",
    "rabbit",
    "summer",
    "tunnel",
    "violet",
    "wonder",
    "yellow",
    "zipper",
    "banana",
    "letter",
    "coffee",
    "butter",
    "pepper",
    "little",
    "bottle",
    "puzzle",
    "kitten",
    "hammer",
    "dinner",
]
UNITS = [  # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("days", "hours", 24),
    ("liters", "milliliters", 1000),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("dozens", "items", 12),
    ("years", "months", 12),
    ("meters", "millimeters", 1000),
    ("hours", "seconds", 3600),
    ("gigabytes", "megabytes", 1000),
]
UNIT_FACTORS = {(src, dst): factor for src, dst, factor in UNITS}
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

ARITH_RE = re.compile(r"^What is (\d+) ([+\-*]) (\d+)\?$")
WORD_RE = re.compile(r"^(\w+) has (\d+) (\w+) and (buys|gives away) (\d+)\. How many \3 does \1 have now\?$")
UNIT_RE = re.compile(r"^Convert (\d+) (\w+) to (\w+)\.$")
COUNT_RE = re.compile(r"^How many times does the letter '(\w)' appear in '(\w+)'\?$")
SORT_RE = re.compile(r"^Sort these numbers from smallest to largest: ([\d, ]+)\.$")
REVERSE_RE = re.compile(r"^Write the word '(\w+)' backwards\.$")


def _arith_make(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(list(OPS))
    a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op != "*" else (rng.randint(2, 30), rng.randint(2, 12))
    if op == "-" and b > a:
        a, b = b, a
    return f"What is {a} {op} {b}?", str(OPS[op](a, b))


def _arith_solve(prompt: str) -> str | None:
    m = ARITH_RE.match(prompt)
    return str(OPS[m[2]](int(m[1]), int(m[3]))) if m else None


def _arith_explain(prompt: str, answer: str) -> str:
    m = ARITH_RE.match(prompt)
    return f"{m[1]} {m[2]} {m[3]} = {answer}. The answer is {answer}."


def _word_make(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have = rng.randint(5, 60)
    verb = rng.choice(["buys", "gives away"])
    change = rng.randint(1, 30) if verb == "buys" else rng.randint(1, have)
    prompt = f"{name} has {have} {item} and {verb} {change}. How many {item} does {name} have now?"
    return prompt, _word_solve(prompt)


def _word_solve(prompt: str) -> str | None:
    m = WORD_RE.match(prompt)
    if not m:
        return None
    have, change = int(m[2]), int(m[5])
    return str(have + change if m[4] == "buys" else have - change)


def _word_explain(prompt: str, answer: str) -> str:
    m = WORD_RE.match(prompt)
    op = "+" if m[4] == "buys" else "-"
    return f"{m[1]} starts with {m[2]} {m[3]}, and {m[2]} {op} {m[5]} = {answer}. The answer is {answer}."


def _unit_make(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    amount = rng.randint(2, 99)
    return f"Convert {amount} {src} to {dst}.", str(amount * factor)


def _unit_solve(prompt: str) -> str | None:
    m = UNIT_RE.match(prompt)
    factor = UNIT_FACTORS.get((m[2], m[3])) if m else None
    return str(int(m[1]) * factor) if factor else None


def _unit_explain(prompt: str, answer: str) -> str:
    m = UNIT_RE.match(prompt)
    factor = UNIT_FACTORS[(m[2], m[3])]
    return f"One of the {m[2]} is {factor} {m[3]}, so {m[1]} x {factor} = {answer}. The answer is {answer}."


def _word(rng: random.Random) -> str:
    """A real word or, half the time, a pronounceable made-up one (so the families have room for thousands)."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 4)))


def _count_make(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    letter = rng.choice(sorted(set(word))) if rng.random() < 0.85 else rng.choice("aeioulnrst")
    prompt = f"How many times does the letter '{letter}' appear in '{word}'?"
    return prompt, str(word.count(letter))


def _count_solve(prompt: str) -> str | None:
    m = COUNT_RE.match(prompt)
    return str(m[2].count(m[1])) if m else None


def _count_explain(prompt: str, answer: str) -> str:
    m = COUNT_RE.match(prompt)
    return f"Spelling it out: {'-'.join(m[2])}. The letter '{m[1]}' appears {answer} times. The answer is {answer}."


def _sort_make(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    prompt = f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}."
    return prompt, ", ".join(map(str, sorted(numbers)))


def _sort_solve(prompt: str) -> str | None:
    m = SORT_RE.match(prompt)
    return ", ".join(map(str, sorted(int(x) for x in m[1].split(", ")))) if m else None


def _sort_explain(prompt: str, answer: str) -> str:
    return f"From smallest to largest: {answer}. The answer is {answer}."


def _reverse_make(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Write the word '{word}' backwards.", word[::-1]


def _reverse_solve(prompt: str) -> str | None:
    m = REVERSE_RE.match(prompt)
    return m[1][::-1] if m else None


def _reverse_explain(prompt: str, answer: str) -> str:
    return f"Reading the letters from the end: {'-'.join(answer)}. The answer is {answer}."


FAMILIES = [
    Family("arithmetic", _arith_make, _arith_solve, _arith_explain),
    Family("word_problem", _word_make, _word_solve, _word_explain),
    Family("unit_conversion", _unit_make, _unit_solve, _unit_explain),
    Family("letter_count", _count_make, _count_solve, _count_explain),
    Family("sorting", _sort_make, _sort_solve, _sort_explain),
    Family("reverse", _reverse_make, _reverse_solve, _reverse_explain),
]


def _wrong_answer(family: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same shape as the right one."""
    if family == "reverse":
        letters = list(answer)
        i = rng.randrange(len(letters) - 1)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        wrong = "".join(letters)
        return wrong if wrong != answer else answer[::-1]
    if family == "sorting":
        numbers = answer.split(", ")
        i = rng.randrange(len(numbers) - 1)
        numbers[i], numbers[i + 1] = numbers[i + 1], numbers[i]
        return ", ".join(numbers)
    value = int(answer)
    delta = rng.choice([-10, -2, -1, 1, 2, 10]) if family != "letter_count" else rng.choice([-1, 1, 2])
    return str(max(value + delta, 0) if value + delta != value else value + 1)


def generate(size: int, seed: int, families: Sequence[str] = ()) -> list[Pair]:
    """`size` distinct preference pairs of the named task families (empty: all), families in turn, deterministic for
    `seed`."""
    drawn = [f for f in FAMILIES if f.name in families] if families else FAMILIES
    rng = random.Random(seed)
    pairs: list[Pair] = []
    seen: set[str] = set()
    attempts = 0
    while len(pairs) < size:
        attempts += 1
        if attempts > size * 50:
            raise ValueError(f"cannot draw {size} distinct built-in prompts (got {len(pairs)})")
        family = drawn[len(pairs) % len(drawn)]
        prompt, answer = family.make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        chosen = family.explain(prompt, answer)
        if rng.random() < 0.2:
            rejected = rng.choice(UNHELPFUL)
        else:
            wrong = _wrong_answer(family.name, answer, rng)
            rejected = family.explain(prompt, wrong) if wrong != answer else rng.choice(UNHELPFUL)
        pairs.append(Pair(prompt, chosen, rejected, family.name))
    return pairs


def reference_answer(prompt: str) -> str | None:
    """The right answer to a built-in prompt, recomputed from its text; None if no family matches."""
    for family in FAMILIES:
        answer = family.solve(prompt.strip())
        if answer is not None:
            return answer
    return None


def _final_answer(response: str, expected: str) -> str | None:
    """The answer a response commits to: after its last 'answer is', else its last token(s) of the expected kind."""
    tail = response.rsplit("answer is", 1)[-1]
    if re.fullmatch(r"\d+(, \d+)*", expected):
        numbers = re.findall(r"-?\d+", tail)
        count = expected.count(",") + 1
        return ", ".join(numbers[-count:]) if len(numbers) >= count else None
    words = re.findall(r"[A-Za-z]+", tail)
    return words[-1].lower() if words else None


def grade(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: 1 when the response's final answer is right, 0 otherwise or for unknown prompts."""
    expected = reference_answer(prompt)
    if expected is None:
        return 0.0
    return 1.0 if _final_answer(response, expected) == expected else 0.0


def gold_reward(prompts: list, completions: list[str], **columns) -> list[float | None]:
    """The gold score as a PPO reward function (`stage.reward_funcs=[rlhf.data.builtin:gold_reward]`): 1.0 for a
    right final answer, 0.0 for a wrong one, None for a prompt that is not a built-in task (chat messages included)."""
    return [
        grade(p, c) if isinstance(p, str) and reference_answer(p) is not None else None
        for p, c in zip(prompts, completions, strict=True)
    ]
