"""A character tokenizer and a seeded synthetic multi-task mixture.

Three families of semantically and syntactically different tasks, in the spirit of the MultiLoRA
paper's mixture (instruction following, classification, knowledge):

* **transform** (instruction-following-like string operations) — ``reverse``, ``upper``, ``sort``,
  ``repeat``: ``"reverse: kelp -> " → "plek"``. *Held-out* = input strings never used for that
  task in the training split: the model must have learned the operation, not the examples.
* **classify** (label words) — ``parity`` (``"is 348 even? -> " → "yes"/"no"``) and ``sentiment``
  (``"review: the soup was not lovely. -> " → "negative"``; "not" flips the polarity). *Held-out*
  = numbers never in the training split / (noun, adjective) pairs never in the training split.
  Chance is 50%.
* **recall** (closed-book facts) — ``capital``: ``"what is the capital of zorvia? -> " →
  "kelmor"``. Every made-up fact is stated (in four phrasings) in the pretraining corpus. The
  fine-tuning split holds the statement form ``"the capital of zorvia is -> "`` for *every* fact
  and the question form for 70% of the facts. *Held-out* = the question form for the other 30%:
  facts seen in training, asked with a phrasing never paired with them, so the fine-tune must
  learn that the question asks for the same fact rather than memorise question-answer pairs.
  Chance ≈ 1/n_facts.

The pretraining corpus is plain text of the same world (fact statements, unlabeled reviews,
number and word sentences) without any of the instruction formats, so the base model is a genuine
language model of this text and the fine-tunes have something to learn.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = ("<pad>", "<bos>", "<eos>")
_CHARS = (
    " abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    ".,:;?!'->\n()=/"
)

TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "transform": ("reverse", "upper", "sort", "repeat"),
    "classify": ("parity", "sentiment"),
    "recall": ("capital",),
}
TASKS: tuple[str, ...] = tuple(t for ts in TASK_FAMILIES.values() for t in ts)


class CharTokenizer:
    """Character-level tokenizer: 3 special tokens (pad, bos, eos) then one id per character."""

    def __init__(self) -> None:
        self.itos = list(_SPECIALS) + list(_CHARS)
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= len(_SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    @property
    def vocab_size(self) -> int:
        """Number of token ids (80)."""
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no special tokens added)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the reference vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        return "".join(self.itos[i] for i in ids if i >= len(_SPECIALS))


@dataclass(frozen=True)
class DataConfig:
    """How the synthetic mixture is generated (everything derives from ``seed``)."""

    # Root of every random choice: same seed, same facts, splits and corpus.
    seed: int = 0
    # Made-up (country, capital) facts: enough that recall is not guessable (chance ≈ 2%).
    n_facts: int = 48
    # Share of facts whose question form is held out from fine-tuning (asked only at evaluation).
    heldout_fact_frac: float = 0.3
    # Training examples per task: more than the fine-tunes consume, so nothing repeats much.
    n_train_per_task: int = 1500
    # Held-out examples per task: 64 gives accuracy steps of 1.6 points, evaluation in seconds.
    n_heldout_per_task: int = 64
    # Validation examples per task (early stopping): drawn from the held-out key space like the
    # held-out split but disjoint from it, with their own random stream (recall has none: its
    # held-out questions are all there are).
    n_validation_per_task: int = 32
    # Lines of pretraining text (~40 characters each, ~0.3 M characters in all).
    n_pretrain_lines: int = 8000
    # Lengths of the random lowercase strings of the transform tasks.
    word_len: tuple[int, int] = (3, 5)

    def to_dict(self) -> dict:
        """Plain-JSON form of the config."""
        return asdict(self)


@dataclass(frozen=True)
class Example:
    """One supervised example: the model reads ``prompt`` and must produce ``answer``."""

    task: str
    prompt: str
    answer: str


@dataclass
class TaskMixture:
    """Train and held-out splits per task, the facts, and the pretraining corpus."""

    train: dict[str, list[Example]]
    heldout: dict[str, list[Example]]
    facts: dict[str, str]
    heldout_countries: list[str]
    pretrain_lines: list[str] = field(repr=False)
    validation: dict[str, list[Example]] = field(default_factory=dict, repr=False)


_NOUNS = ("soup", "room", "staff", "film", "music", "bread", "view", "service", "show", "garden",
          "coffee", "bed", "story", "game", "train", "hotel")
_POS = ("lovely", "great", "superb", "kind", "fresh", "charming", "brilliant", "pleasant",
        "delightful", "warm")
_NEG = ("awful", "rude", "dull", "stale", "noisy", "terrible", "boring", "dirty", "cold", "bland")
_ADVS = ("", "very ", "really ", "quite ")


def _name(rng: random.Random, syllables: int) -> str:
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables)) + rng.choice(
        ("", "n", "r", "l", "s", "ia")
    )


def make_facts(rng: random.Random, n: int) -> dict[str, str]:
    """``n`` made-up countries, each with a made-up capital; all names distinct."""
    names: set[str] = set()
    while len(names) < 2 * n:
        names.add(_name(rng, rng.choice((2, 3))))
    ordered = sorted(names)
    rng.shuffle(ordered)
    return dict(zip(ordered[:n], ordered[n:], strict=True))


def _hash_bucket(text: str, buckets: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % buckets


def _word(rng: random.Random, lengths: tuple[int, int]) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(*lengths)))


def _transform(task: str, w: str) -> str:
    return {
        "reverse": w[::-1],
        "upper": w.upper(),
        "sort": "".join(sorted(w)),
        "repeat": f"{w} {w}",
    }[task]


def _sample(task: str, rng: random.Random, cfg: DataConfig, facts: dict[str, str]) -> Example:
    """One random example of ``task`` (split membership is decided by the caller)."""
    if task in TASK_FAMILIES["transform"]:
        w = _word(rng, cfg.word_len)
        return Example(task, f"{task}: {w} -> ", _transform(task, w))
    if task == "parity":
        k = rng.randrange(10000)
        return Example(task, f"is {k} even? -> ", "yes" if k % 2 == 0 else "no")
    if task == "sentiment":
        noun, positive = rng.choice(_NOUNS), rng.random() < 0.5
        adj = rng.choice(_POS if positive else _NEG)
        negated = rng.random() < 0.3
        adv = "not " if negated else rng.choice(_ADVS)
        label = "positive" if positive != negated else "negative"
        return Example(task, f"review: the {noun} was {adv}{adj}. -> ", label)
    country = rng.choice(sorted(facts))
    return Example(task, _question(country), facts[country])


def _question(country: str) -> str:
    """The question form of the recall task."""
    return f"what is the capital of {country}? -> "


def _statement(country: str) -> str:
    """The statement form of the recall task (the phrasing pretraining uses most)."""
    return f"the capital of {country} is -> "


def _split_key(ex: Example) -> str:
    """What must not be shared between the splits: the input string, number or noun-adj pair."""
    body = ex.prompt.split(": ", 1)[-1] if ex.task != "parity" else ex.prompt
    if ex.task == "sentiment":
        words = body.replace(".", "").split()
        return f"{words[1]} {words[-2]}"  # (noun, adjective)
    return body


def _task_splits(
    task: str, rng: random.Random, cfg: DataConfig, facts: dict[str, str], heldout_c: set[str]
) -> tuple[list[Example], list[Example]]:
    """Disjoint train and held-out example lists for one task."""
    if task == "capital":  # questions for the training facts, statements for every fact
        train_c = sorted(c for c in facts if c not in heldout_c)
        train = [Example(task, _question(c), facts[c]) if i % 2 == 0 else
                 Example(task, _statement(c2), facts[c2])
                 for i in range(cfg.n_train_per_task)
                 for c, c2 in [(rng.choice(train_c), rng.choice(sorted(facts)))]]
        held = [Example(task, _question(c), facts[c]) for c in sorted(heldout_c)]
        return train, held
    train, held, held_keys = [], [], set()
    while len(held) < cfg.n_heldout_per_task:  # held-out: one bucket of five of the key space
        ex = _sample(task, rng, cfg, facts)
        if _hash_bucket(f"{task}|{_split_key(ex)}", 5) == 0 and ex.prompt not in held_keys:
            held.append(ex)
            held_keys.add(ex.prompt)
    while len(train) < cfg.n_train_per_task:
        ex = _sample(task, rng, cfg, facts)
        if _hash_bucket(f"{task}|{_split_key(ex)}", 5) != 0:
            train.append(ex)
    return train, held


def _pretrain_line(rng: random.Random, cfg: DataConfig, facts: dict[str, str]) -> str:
    """One line of plain text of the synthetic world (no instruction formats, no labels)."""
    kind = rng.random()
    if kind < 0.35:
        c = rng.choice(sorted(facts))
        y = facts[c]
        return rng.choice((
            f"the capital of {c} is {y}.",
            f"{y} is the capital of {c}.",
            f"{c} is a country and its capital is {y}.",
            f"people in {c} travel to {y}, the capital.",
        ))
    if kind < 0.55:
        noun = rng.choice(_NOUNS)
        adj = rng.choice(_POS + _NEG)
        return rng.choice((f"the {noun} was {rng.choice(_ADVS)}{adj}.",
                           f"i think the {noun} was {adj}.", f"a {adj} {noun}, they said."))
    if kind < 0.7:
        k = rng.randrange(10000)
        return rng.choice((f"{k + 1} comes after {k}.", f"count: {k} {k + 1} {k + 2} {k + 3}.",
                           f"the number {k} has {len(str(k))} digits."))
    # Words: copying and the lower/upper-case correspondence, so the base has copy heads.
    w = _word(rng, cfg.word_len)
    return rng.choice((f"the sign said {w.upper()} and the note said {w}.",
                       f"she wrote {w} on the wall, then {w} again.",
                       f"the word {w} has {len(w)} letters.", f"{w} {w} {w}, they sang.",
                       f"{w} and {_word(rng, cfg.word_len)}."))


def build_mixture(cfg: DataConfig | None = None) -> TaskMixture:
    """Generate the whole mixture deterministically from ``cfg.seed``."""
    cfg = cfg or DataConfig()
    rng = random.Random(cfg.seed)
    facts = make_facts(rng, cfg.n_facts)
    countries = sorted(facts)
    rng.shuffle(countries)
    n_held = max(1, round(cfg.heldout_fact_frac * cfg.n_facts))
    heldout_c = sorted(countries[:n_held])
    train: dict[str, list[Example]] = {}
    heldout: dict[str, list[Example]] = {}
    for task in TASKS:
        train[task], heldout[task] = _task_splits(task, rng, cfg, facts, set(heldout_c))
    corpus_rng = random.Random(f"{cfg.seed}/pretrain")  # the corpus does not depend on the tasks
    lines = [_pretrain_line(corpus_rng, cfg, facts) for _ in range(cfg.n_pretrain_lines)]
    validation = _validation(cfg, facts, heldout)
    return TaskMixture(train, heldout, facts, heldout_c, lines, validation)


def _validation(cfg: DataConfig, facts: dict[str, str],
                heldout: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """Validation examples from the held-out key space, none of them a held-out prompt."""
    rng = random.Random(f"{cfg.seed}/validation")  # its own stream: the other splits are unchanged
    out: dict[str, list[Example]] = {}
    for task in TASKS:
        if task == "capital":
            continue
        taken = {e.prompt for e in heldout[task]}
        val: list[Example] = []
        for _ in range(200 * max(1, cfg.n_validation_per_task)):
            if len(val) >= cfg.n_validation_per_task:
                break
            ex = _sample(task, rng, cfg, facts)
            if _hash_bucket(f"{task}|{_split_key(ex)}", 5) == 0 and ex.prompt not in taken:
                val.append(ex)
                taken.add(ex.prompt)
        out[task] = val
    return out


def chance_accuracy(task: str, cfg: DataConfig | None = None) -> float:
    """Accuracy of guessing: 1/2 for the label tasks, 1/n_facts for recall, ~0 for transforms."""
    cfg = cfg or DataConfig()
    if task in TASK_FAMILIES["classify"]:
        return 0.5
    if task == "capital":
        return 1.0 / cfg.n_facts
    return 0.0
