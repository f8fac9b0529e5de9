"""The shipped gsm_symbolic training set: well-formed items, no GSM8K test question among them, the filters that
made it, and that reasoning-gym regenerates it item for item."""
from __future__ import annotations

import json

import pytest

from kvfuse import gsm_symbolic as gs
from kvfuse.data import DATASETS, extract_final_number, load_examples, load_gsm8k, load_gsm_symbolic


@pytest.fixture(scope="module")
def items():
    return load_gsm_symbolic()


def test_shipped_items_are_well_formed_and_unique(items):
    meta = json.loads(gs.META_FILE.read_text())
    assert len(items) == meta["items"] >= 6000
    assert len({e.id for e in items}) == len(items)
    assert len({gs.normalise_question(e.question) for e in items}) == len(items)
    for e in items:
        assert e.question and e.rationale and e.answer
        assert "####" not in e.rationale and "Give the result as your final answer" not in e.question
        assert extract_final_number(f"{e.rationale}\n#### {e.answer}") == e.answer


def test_no_gsm8k_test_question_is_a_training_item(items):
    test = {gs.normalise_question(e.question) for e in load_gsm8k()}
    assert not test & {gs.normalise_question(e.question) for e in items}
    # the sidecar names the GSM8K items the templates were written from: the evaluation's "clean" subset leaves
    # them out, so they must be real GSM8K ids
    meta = json.loads(gs.META_FILE.read_text())
    ids = {e.id for e in load_gsm8k()}
    assert meta["gsm8k_near_template_ids"] and set(meta["gsm8k_near_template_ids"]) <= ids


def test_trainer_accepts_the_dataset_name():
    assert "gsm_symbolic" in DATASETS
    train, val = load_examples("gsm_symbolic", 40, 8, seed=3)
    assert len(train) == 40 and len(val) == 8 and not {e.id for e in train} & {e.id for e in val}
    assert [e.id for e in train] == [e.id for e in load_examples("gsm_symbolic", 40, 8, seed=3)[0]]


def _item(cot: str, answer: str = "12", question: str = "How many?") -> dict:
    return {"question": question + gs._SUFFIX, "answer": answer, "metadata": {"answer_cot": cot}}


@pytest.mark.parametrize("cot, answer, reason", [
    ("He has 3*4=12 apples.\n#### 12", "12", None),
    ("Each walk is 14/56 = 1/4 blocks per minute, 2 * 1/4 = 1/2.\n#### 12", "12", None),     # fractions
    ("5 / 10 = 50.0% of them.\n#### 12", "12", None),                                        # a percentage
    ("There are 100 questions x 20/100 = 20 of them.\n#### 12", "12", None),   # only the tail of a calculation
    ("10 / 3 = 3.33 each\n#### 12", "12", None),                                             # rounded as shown
    ("He has 3*4=12 apples.", "12", "no '####' in the rationale"),
    ("He has 3*4=12 apples.\n#### 13", "12", "the rationale's final number is not the answer"),
    ("He has 3*4=12 apples.\n#### twelve", "twelve", "answer is not a number"),
    ("0.74*40 = 29 students leave.\n#### 12", "12", "a calculation in the rationale does not hold"),
    ("Robert receives 40=40 emails.\n#### 12", "12", "degenerate N=N in the rationale"),
])
def test_malformed_items_are_named(cot, answer, reason):
    assert gs.malformed_reason(_item(cot, answer)) == reason


def test_filter_drops_duplicates_and_gsm8k_questions():
    gsm8k = load_gsm8k()[:3]
    good = "3*4=12\n#### 12"
    items = [(0, _item(good, question="A new question?")), (0, _item(good, question="A new question?")),
             (1, _item(good, question=gsm8k[1].question)), (2, _item("3*4=13\n#### 12")),
             (3, _item(good, question="Another one?"))]
    kept, dropped = gs.filter_items(items, gsm8k, n=10)
    assert [e.question for _, e in kept] == ["A new question?", "Another one?"]
    assert dropped == {"duplicate question": 1, "equal to a GSM8K test question": 1,
                       "a calculation in the rationale does not hold": 1}


def test_reasoning_gym_regenerates_the_shipped_items(items):
    """The file is what `python -m kvfuse.gsm_symbolic` makes (seeded generators; the pinned reasoning-gym)."""
    meta = json.loads(gs.META_FILE.read_text())
    kept, _ = gs.generate(n=60, seed=meta["seed"], candidates=200)
    assert [e for _, e in kept] == items[:60]
