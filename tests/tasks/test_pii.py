from collections import Counter

from tasks.pii import cpf_valid, scrub
from tests.fixtures.pii_fixture import fixture


def measure():
    items, negatives = fixture()
    found, total = Counter(), Counter()
    for sentence, kind, value in items:
        out, counts = scrub(sentence)
        total[kind] += 1
        found[kind] += value not in out and f"<{kind}>" in out
    false_pos = sum(scrub(n)[0] != n for n in negatives)
    return {k: found[k] / total[k] for k in total}, false_pos / len(negatives), len(items), len(negatives)


def test_recall_and_false_positives_on_the_fixture():
    recall, fp_rate, n_items, n_neg = measure()
    assert n_items >= 200 and n_neg >= 50
    assert recall["EMAIL"] >= 0.99 and recall["IP"] >= 0.99, recall
    assert recall["PHONE"] >= 0.95 and recall["CPF"] >= 0.95, recall
    assert fp_rate <= 0.01, fp_rate


def test_each_look_alike_negative_is_left_alone():
    _, negatives = fixture()
    changed = [n for n in set(negatives) if scrub(n)[0] != n]
    assert changed == []


def test_scrubbing_twice_changes_nothing():
    items, negatives = fixture()
    for text in [s for s, _, _ in items] + negatives:
        once = scrub(text)[0]
        assert scrub(once) == (once, Counter())


def test_cpf_check_digits():
    assert cpf_valid("52998224725") and not cpf_valid("52998224724") and not cpf_valid("11111111111")
