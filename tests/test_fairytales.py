"""Tests for the built-in fairy-tale corpus (jaxlm.data.fairytales); no jax needed."""

import collections
import itertools
import math
import random
import re
import time

import pytest

from jaxlm.data.fairytales import generate_fairy_tales, iter_fairy_tales

# A sentence ends with . ! ? (possibly followed by a closing quote) and the next
# one starts with a capital letter or an opening quote. '"Where?" asked the fox.'
# stays one sentence because "asked" is lower case.
SENTENCE_SPLIT = re.compile(r'(?<=[.!?"])\s+(?=[A-Z"])')


@pytest.fixture(scope="module")
def megabyte() -> str:
    return generate_fairy_tales(1_000_000, seed=0)


def test_same_seed_gives_identical_text():
    assert generate_fairy_tales(200_000, seed=3) == generate_fairy_tales(200_000, seed=3)


def test_different_seeds_give_different_text():
    texts = {generate_fairy_tales(50_000, seed=s) for s in range(5)}
    assert len(texts) == 5


def test_iter_same_seed_gives_same_stream():
    a = list(itertools.islice(iter_fairy_tales(seed=7), 50))
    b = list(itertools.islice(iter_fairy_tales(seed=7), 50))
    assert a == b
    assert len(set(a)) == 50


def test_generated_text_starts_with_the_iter_stream():
    tales = generate_fairy_tales(100_000, seed=5).split("\n\n")
    assert tales[:20] == list(itertools.islice(iter_fairy_tales(seed=5), 20))


def test_global_random_state_is_untouched():
    state = random.getstate()
    generate_fairy_tales(50_000, seed=1)
    assert random.getstate() == state


@pytest.mark.parametrize("num_bytes", [20_000, 33_333, 100_000, 1_000_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_is_between_ninety_and_hundred_percent_of_num_bytes(num_bytes, seed):
    n = len(generate_fairy_tales(num_bytes, seed=seed).encode("utf-8"))
    assert 0.9 * num_bytes <= n <= num_bytes


@pytest.mark.parametrize("num_bytes", [0, 1, 500, 1_500, 5_000, 12_345])
def test_small_requests_never_exceed_num_bytes(num_bytes):
    text = generate_fairy_tales(num_bytes)
    assert len(text.encode("utf-8")) <= num_bytes
    assert text == "" or not text.endswith("\n")


def test_negative_num_bytes_is_rejected():
    with pytest.raises(ValueError):
        generate_fairy_tales(-1)


def test_text_is_ascii(megabyte):
    assert megabyte.isascii()


def test_tales_are_separated_by_blank_lines_and_well_formed(megabyte):
    tales = megabyte.split("\n\n")
    assert len(tales) > 300
    for tale in tales:
        assert tale.strip() == tale and "\n\n" not in tale
        assert tale[0].isupper(), tale[:60]
        assert tale.endswith((".", '"')), tale[-60:]
        assert 500 <= len(tale) <= 3_500


def test_no_template_placeholders_are_left(megabyte):
    assert "{" not in megabyte and "}" not in megabyte


def test_indefinite_article_agrees_with_vowels(megabyte):
    assert not re.search(r"\b[Aa] [aeiou]", megabyte)


def test_every_tale_has_balanced_quoted_dialogue(megabyte):
    tales = megabyte.split("\n\n")
    for tale in tales:
        quotes = tale.count('"')
        assert quotes >= 2 and quotes % 2 == 0, tale
    # Speech attributed to a speaker, e.g. '"Where are you going?" asked the fox.'
    attributed = re.findall(r'"[A-Z][^"]*[,?!.]" (?:said|asked|answered|roared|cried|begged)', megabyte)
    assert len(attributed) > len(tales)


def test_tales_use_several_openings_and_endings(megabyte):
    tales = megabyte.split("\n\n")
    openings = collections.Counter(" ".join(t.split()[:3]) for t in tales)
    assert len(openings) >= 5
    assert max(openings.values()) < 0.5 * len(tales)
    assert "Once upon a time" in megabyte and "happily ever after." in megabyte
    endings = collections.Counter(SENTENCE_SPLIT.split(t)[-1] for t in tales)
    assert max(endings.values()) < 0.25 * len(tales)


def test_many_distinct_sentences_and_none_dominates(megabyte):
    sentences = SENTENCE_SPLIT.split(megabyte.replace("\n", " "))
    counts = collections.Counter(sentences)
    assert len(counts) > 5_000  # measured about 9,300 distinct of 15,000
    assert counts.most_common(1)[0][1] < 0.03 * len(sentences)  # measured under 1%


def test_byte_entropy_is_in_the_range_of_english_text(megabyte):
    counts = collections.Counter(megabyte.encode("utf-8"))
    total = sum(counts.values())
    entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
    assert 3.5 < entropy < 5.0  # measured about 4.35 bits


def test_four_megabytes_generate_in_under_three_seconds():
    start = time.perf_counter()
    text = generate_fairy_tales(4_000_000)
    elapsed = time.perf_counter() - start
    assert len(text) >= 3_600_000
    assert elapsed < 3.0  # measured about 0.2 s
