"""Built-in demo data: three small, deterministic, learnable tasks and their offline tokenizer.

Paths `demo:<task>/<split>` (tasks nli, emotion, news; splits train, dev, test) name these
data sets anywhere a data file is expected, so the whole system runs with no files and no
network. Labels follow from the words: each emotion/news label owns a set of keywords mixed
with shared filler words; an nli label follows from the overlap and negation relation
between its two sentences (plus an occasional hedge word for `neutral`).
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEMO_PREFIX = "demo:"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPLITS = ("train", "dev", "test")

FILLER = (
    "the a this that today yesterday we they people city day time new old very really "
    "just about after before some many one two three with from for and then here there "
    "again still also report said says week year morning evening local group team place "
    "home street event friend family work plan idea thing way part point"
).split()

EMOTION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "anger": ("furious", "rage", "angry", "outraged", "yell", "hate", "annoyed", "slam", "livid", "fuming"),
    "disgust": ("gross", "nasty", "filthy", "rotten", "vile", "stench", "yuck", "revolting", "greasy", "slimy"),
    "fear": ("scared", "afraid", "terrified", "panic", "nervous", "dread", "horror", "frightened", "anxious", "creepy"),
    "happiness": ("joy", "cheerful", "laugh", "delighted", "smile", "glad", "celebrate", "sunshine", "merry", "yay"),
    "like": ("adore", "love", "admire", "fond", "cherish", "favorite", "cute", "lovely", "sweet", "charming"),
    "sadness": ("tears", "lonely", "grief", "miss", "sorrow", "gloomy", "heartbroken", "weep", "mourning", "blue"),
    "surprise": ("wow", "unexpected", "shocked", "sudden", "astonished", "unbelievable", "amazed", "whoa", "suddenly", "stunned"),
}

NEWS_KEYWORDS: dict[str, tuple[str, ...]] = {
    "agriculture": ("farmer", "harvest", "crop", "wheat", "rice", "tractor", "fertilizer", "livestock"),
    "car": ("engine", "sedan", "suv", "electric", "driver", "dealership", "horsepower", "tire"),
    "culture": ("museum", "poetry", "painting", "calligraphy", "heritage", "opera", "artist", "festival"),
    "edu": ("exam", "student", "teacher", "university", "campus", "admission", "tuition", "homework"),
    "entertainment": ("celebrity", "movie", "actor", "singer", "concert", "drama", "premiere", "idol"),
    "finance": ("bank", "loan", "interest", "economy", "inflation", "budget", "tax", "currency"),
    "game": ("esports", "console", "player", "level", "quest", "multiplayer", "gamer", "arcade"),
    "house": ("apartment", "rent", "mortgage", "property", "housing", "landlord", "estate", "renovation"),
    "military": ("army", "navy", "missile", "soldier", "troops", "defense", "warship", "general"),
    "sports": ("football", "match", "goal", "championship", "coach", "athlete", "basketball", "olympic"),
    "stock": ("shares", "index", "investor", "dividend", "nasdaq", "bull", "bear", "ipo"),
    "story": ("legend", "tale", "mystery", "ancient", "hero", "village", "ghost", "fable"),
    "tech": ("smartphone", "chip", "software", "robot", "internet", "algorithm", "startup", "gadget"),
    "travel": ("tourist", "hotel", "beach", "flight", "passport", "scenic", "resort", "itinerary"),
    "world": ("diplomat", "summit", "embassy", "treaty", "president", "election", "minister", "sanctions"),
}

NLI_SUBJECTS = ("boy", "girl", "man", "woman", "doctor", "dog", "cat", "pilot", "chef", "nurse", "baker", "sailor")
NLI_VERBS = ("eats", "reads", "plays", "watches", "builds", "paints", "carries", "cleans", "buys", "sells")
NLI_OBJECTS = ("apple", "book", "guitar", "ball", "picture", "box", "kite", "lamp", "bicycle", "cake", "hat", "clock")
NLI_PLACES = ("park", "kitchen", "garden", "library", "river", "market", "office", "lake")
NLI_NEGATIONS = ("never", "not", "hardly")
NLI_HEDGES = ("maybe", "perhaps", "probably")
NLI_LABELS = ("contradiction", "entailment", "neutral")

SIZES: dict[str, dict[str, int]] = {
    "nli": {"train": 1200, "dev": 200, "test": 200},
    "emotion": {"train": 900, "dev": 200, "test": 200},
    "news": {"train": 1500, "dev": 200, "test": 200},
}
PAIR_TASKS = frozenset({"nli"})


@dataclass(frozen=True)
class DemoRow:
    """One generated sample, before it becomes a `data.Example`."""

    id: str
    text_a: str
    text_b: str | None
    label: str


def demo_tasks() -> tuple[str, ...]:
    """Names of the built-in demo tasks."""
    return tuple(sorted(SIZES))


def demo_labels(task: str) -> list[str]:
    """Sorted label list of a demo task."""
    if task == "nli":
        return list(NLI_LABELS)
    return sorted(EMOTION_KEYWORDS if task == "emotion" else NEWS_KEYWORDS)


def parse_demo_path(path: str) -> tuple[str, str]:
    """Split `demo:<task>/<split>` into (task, split); ValueError with one line when malformed."""
    rest = path[len(DEMO_PREFIX):] if path.startswith(DEMO_PREFIX) else path
    task, sep, split = rest.partition("/")
    if not sep or task not in SIZES or split not in SPLITS:
        raise ValueError(
            f"{path}: expected demo:<task>/<split> with task in {{{', '.join(demo_tasks())}}} "
            f"and split in {{{', '.join(SPLITS)}}}"
        )
    return task, split


def _fillers(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(rng.randint(lo, hi))]


def _keyword_text(rng: random.Random, keywords: dict[str, tuple[str, ...]], label: str) -> str:
    """2-3 of the label's keywords, sometimes one distractor keyword, among 3-8 filler words."""
    words = rng.sample(keywords[label], rng.randint(2, 3)) + _fillers(rng, 3, 8)
    if rng.random() < 0.15:
        other = rng.choice([k for k in keywords if k != label])
        words.append(rng.choice(keywords[other]))
    rng.shuffle(words)
    return " ".join(words)


def _nli_pair(rng: random.Random, label: str) -> tuple[str, str]:
    """Premise about (subject, verb, object); the hypothesis keeps, negates or replaces them."""
    subj, verb, obj = rng.choice(NLI_SUBJECTS), rng.choice(NLI_VERBS), rng.choice(NLI_OBJECTS)
    place = rng.choice(NLI_PLACES)
    premise = " ".join([subj, verb, "the", obj, "in", "the", place, *_fillers(rng, 0, 3)])
    if label == "entailment":
        hyp = [subj, verb, "the", obj, *_fillers(rng, 0, 2)]
    elif label == "contradiction":
        hyp = [subj, rng.choice(NLI_NEGATIONS), verb, "the", obj, *_fillers(rng, 0, 2)]
    else:
        subj2 = rng.choice([s for s in NLI_SUBJECTS if s != subj])
        obj2 = rng.choice([o for o in NLI_OBJECTS if o != obj])
        hyp = [subj2, rng.choice(NLI_VERBS), "the", obj2, *_fillers(rng, 0, 2)]
        if rng.random() < 0.5:
            hyp.insert(rng.randint(0, len(hyp)), rng.choice(NLI_HEDGES))
    return premise, " ".join(hyp)


@lru_cache(maxsize=32)
def demo_rows(task: str, split: str) -> tuple[DemoRow, ...]:
    """Generate a demo split: balanced labels (round robin, then shuffled), fixed seed per split."""
    if task not in SIZES or split not in SPLITS:
        raise ValueError(f"unknown demo data set {task}/{split}")
    rng = random.Random(zlib.crc32(f"mtl_dist-demo/{task}/{split}".encode()))
    labels = demo_labels(task)
    order = [labels[i % len(labels)] for i in range(SIZES[task][split])]
    rng.shuffle(order)
    rows = []
    for i, label in enumerate(order):
        if task == "nli":
            a, b = _nli_pair(rng, label)
        else:
            a, b = _keyword_text(rng, EMOTION_KEYWORDS if task == "emotion" else NEWS_KEYWORDS, label), None
        rows.append(DemoRow(f"{split}-{i}", a, b, label))
    return tuple(rows)


def demo_fingerprint(task: str, split: str) -> str:
    """sha256 of the generated content (stands in for a file's hash)."""
    h = hashlib.sha256()
    for r in demo_rows(task, split):
        h.update(json.dumps([r.id, r.text_a, r.text_b, r.label], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def demo_words() -> list[str]:
    """Every word the generator can emit, sorted."""
    words: set[str] = set(FILLER) | {"the", "in"}
    for table in (EMOTION_KEYWORDS, NEWS_KEYWORDS):
        for kws in table.values():
            words.update(kws)
    for group in (NLI_SUBJECTS, NLI_VERBS, NLI_OBJECTS, NLI_PLACES, NLI_NEGATIONS, NLI_HEDGES):
        words.update(group)
    return sorted(words)


@lru_cache(maxsize=1)
def demo_vocab() -> tuple[str, ...]:
    """Special tokens (ids 0-4), the generator's words, then characters and ##-pieces for the rest."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()")
    pieces = [f"##{c}" for c in chars]
    seen: set[str] = set(SPECIAL_TOKENS)
    vocab = list(SPECIAL_TOKENS)
    for tok in [*demo_words(), *chars, *pieces]:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return tuple(vocab)


def demo_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build a BERT-style WordPiece fast tokenizer over `demo_vocab()`, entirely offline."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(demo_vocab())}
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = BertPreTokenizer()
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def is_demo_path(path: object) -> bool:
    """True for strings of the form `demo:...`."""
    return isinstance(path, str) and path.startswith(DEMO_PREFIX)
