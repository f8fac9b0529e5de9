"""kvfuse.data: sources, malformed input errors, split, rendering of shared segments, pad+mask."""
from __future__ import annotations

import json
import random

import pytest
import torch

from kvfuse.data import (
    COT_PROMPT, DEFAULT_PROMPT, Example, extract_final_number, load_examples, load_gsm8k, load_jsonl,
    normalize_number, pad_and_mask, render, render_prompt, resolve_prompt, shakespeare, shakespeare_plays,
    train_val_split,
)
from kvfuse.models import tiny_tokenizer


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k()


def test_gsm8k_loads_all_items(gsm8k):
    assert len(gsm8k) == 1319
    first = gsm8k[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.answer == "18"
    assert "<<" not in first.rationale and "####" not in first.rationale
    assert first.rationale.endswith("every day at the farmer’s market.")
    assert "16 - 3 - 4 = 9 duck eggs" in first.rationale
    assert len({e.id for e in gsm8k}) == 1319
    assert all(e.question and e.rationale and e.answer for e in gsm8k)
    assert all("<<" not in e.rationale for e in gsm8k)
    # Every gold answer is a canonical number string.
    assert all(normalize_number(e.answer) == e.answer for e in gsm8k)


def test_gsm8k_keeps_calculator_annotations_on_request(gsm8k):
    kept = load_gsm8k(keep_calculator=True)
    assert "<<16-3-4=9>>" in kept[0].rationale
    assert [e.answer for e in kept] == [e.answer for e in gsm8k]


def test_gsm8k_answer_normalisation(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"question": "q1?", "answer": "a\n#### 70,000"}, {"question": "q2?", "answer": "b\n#### -3.50"},
            {"question": "q3?", "answer": "c\n#### $1,234"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.answer for e in load_gsm8k(path)] == ["70000", "-3.5", "1234"]


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "How many?", "answer": "2 + 2 = 4\n#### 4"})


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "q", "answer": ', "invalid JSON"),
    (json.dumps({"answer": "x\n#### 1"}), "missing field 'question'"),
    (json.dumps({"question": "q", "answer": "no final answer here"}), "no '#### <number>'"),
    (json.dumps({"question": "q", "answer": "x\n#### seven"}), "not a number"),
    (json.dumps(["a", "list"]), "expected a JSON object"),
])
def test_gsm8k_malformed_record_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(ValueError, match=message) as info:
        load_gsm8k(path)
    assert f"{path}:4:" in str(info.value)


def test_load_jsonl_field_names_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"uid": f"u{i}", "q": f"question {i}", "why": f"because {i}", "a": i * 7} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_jsonl(path, question_field="q", rationale_field="why", answer_field="a", id_field="uid")
    assert examples[3] == Example(id="u3", question="question 3", rationale="because 3", answer="21")
    assert [e.id for e in load_jsonl(path, "q", "why", "a")] == [f"mine-{i}" for i in range(5)]

    with pytest.raises(ValueError, match=rf"{path}:1: missing field 'question'"):
        load_jsonl(path)
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"uid": "u0", "q": "x", "why": "y", "a": 1})
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="duplicate id 'u0'"):
        load_jsonl(path, "q", "why", "a", id_field="uid")
    lines[2] = json.dumps({"uid": "u9", "q": "  ", "why": "y", "a": 1})
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"{path}:3: field 'q' is empty"):
        load_jsonl(path, "q", "why", "a", id_field="uid")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_train_val_split_deterministic_and_disjoint(gsm8k):
    train, val = train_val_split(gsm8k, 32, 8, seed=3)
    again_train, again_val = train_val_split(gsm8k, 32, 8, seed=3)
    assert [e.id for e in train] == [e.id for e in again_train] and [e.id for e in val] == [e.id for e in again_val]
    assert len(train) == 32 and len(val) == 8
    assert not {e.id for e in train} & {e.id for e in val}
    other_train, _ = train_val_split(gsm8k, 32, 8, seed=4)
    assert [e.id for e in other_train] != [e.id for e in train]
    # Growing the validation set keeps the training set (the split is one shuffled order, cut in two).
    assert [e.id for e in train_val_split(gsm8k, 32, 100, seed=3)[0]] == [e.id for e in train]
    all_train, all_val = train_val_split(gsm8k, 1000, 319, seed=0)
    assert sorted(e.id for e in all_train + all_val) == sorted(e.id for e in gsm8k)
    with pytest.raises(ValueError, match="exceeds the 1319 examples"):
        train_val_split(gsm8k, 1300, 20, seed=0)
    with pytest.raises(ValueError, match="n_val"):
        train_val_split(gsm8k, 3, -1, seed=0)
    with pytest.raises(ValueError, match="duplicate ids"):
        train_val_split(gsm8k[:3] + gsm8k[:1], 2, 1, seed=0)


@pytest.mark.parametrize("text, expected", [
    ("so she makes 9 * 2 = $18 every day.", "18"),
    ("The answer is 1,234.50 dollars", "1234.5"),
    ("16-3-4=9", "9"),
    ("it drops to -7 degrees", "-7"),
    ("He earns 3, 4 or 5.", "5"),
    ("first 12 then\n#### 70,000\nand 3 more", "70000"),
    ("no digits at all", None),
    ("#### nothing after", None),
    ("total 42.", "42"),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_shakespeare_text():
    plays = shakespeare_plays()
    assert len(plays) == 38 and "hamlet" in plays
    hamlet = shakespeare("hamlet")
    assert "To be, or not to be" in hamlet
    assert "**" not in hamlet and not any(line.startswith("#") for line in hamlet.splitlines())
    assert shakespeare().count("To be, or not to be") >= 1 and len(shakespeare()) > 10 * len(hamlet)
    with pytest.raises(ValueError, match="unknown play 'hamlett'"):
        shakespeare("hamlett")


def _check_segments(rendered, example):
    qs, qe = rendered.question
    rs, re_ = rendered.rationale
    assert rendered.text[qs:qe] == example.question
    assert rendered.text[rs:re_] == example.rationale
    assert qe <= rs
    assert rendered.segments == [rendered.question, rendered.rationale]


def test_render_tiny_tokenizers(gsm8k):
    example = gsm8k[5]
    chat = render(tiny_tokenizer("tiny-llama"), COT_PROMPT, example)
    assert chat.chat_template and not chat.add_special_tokens and "<|im_start|>assistant\n" in chat.text
    assert COT_PROMPT in chat.text
    _check_segments(chat, example)
    plain = render(tiny_tokenizer("tiny-gemma3"), DEFAULT_PROMPT, example)
    assert not plain.chat_template and plain.add_special_tokens and "<|im_start|>" not in plain.text
    _check_segments(plain, example)
    forced_plain = render(tiny_tokenizer("tiny-llama"), "", example, use_chat_template=False)
    assert forced_plain.text.startswith("Question: ")
    _check_segments(forced_plain, example)
    # The generation prompt is the teacher-forcing text cut where the rationale starts.
    prompt = render_prompt(tiny_tokenizer("tiny-llama"), COT_PROMPT, example.question)
    assert chat.text.startswith(prompt) and chat.rationale[0] == len(prompt)
    assert plain.text[:plain.rationale[0]] == render_prompt(tiny_tokenizer("tiny-gemma3"), DEFAULT_PROMPT,
                                                            example.question)


def test_render_refuses_a_template_that_rewrites_content(gsm8k):
    tok = tiny_tokenizer("tiny-llama")
    tok.chat_template = "{% for m in messages %}{{ m['content'] | trim }}\n{% endfor %}"
    example = Example(id="x", question="  padded question ", rationale="why", answer="1")
    with pytest.raises(ValueError, match="rewrites message content of example 'x'"):
        render(tok, DEFAULT_PROMPT, example)
    _check_segments(render(tok, DEFAULT_PROMPT, example, use_chat_template=False), example)


def test_pad_and_mask_never_truncates():
    rng = random.Random(11)
    seqs = [[rng.randrange(1, 500) for _ in range(n)] for n in (5, 13, 1, 9)]
    ids, mask = pad_and_mask(seqs, pad_id=0)
    assert ids.shape == mask.shape == (4, 13) and ids.dtype == mask.dtype == torch.long
    for b, seq in enumerate(seqs):
        assert ids[b, :len(seq)].tolist() == seq
        assert mask[b].tolist() == [1] * len(seq) + [0] * (13 - len(seq))
        assert (ids[b, len(seq):] == 0).all()
    ids2, _ = pad_and_mask([torch.tensor(s) for s in seqs], pad_id=7, max_length=13)
    assert ids2[2, 1:].eq(7).all() and ids2[1].tolist() == seqs[1]
    with pytest.raises(ValueError, match="sequence 1 has 13 tokens, more than max_length=12"):
        pad_and_mask(seqs, pad_id=0, max_length=12)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_and_mask([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="sequence 0 must hold int token ids"):
        pad_and_mask([[1.5, 2.0]], pad_id=0)
    with pytest.raises(ValueError, match="at least one"):
        pad_and_mask([], pad_id=0)


def test_resolve_prompt_and_load_examples(tmp_path, gsm8k):
    assert resolve_prompt("default") == DEFAULT_PROMPT and resolve_prompt("cot") == COT_PROMPT
    assert resolve_prompt("Answer briefly.") == "Answer briefly."
    with pytest.raises(ValueError, match="prompt"):
        resolve_prompt(None)
    train, val = load_examples("gsm8k", 6, 2, seed=1)
    expected = train_val_split(gsm8k, 6, 2, seed=1)
    assert [e.id for e in train + val] == [e.id for e in expected[0] + expected[1]]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "rationale": f"r{i}", "answer": str(i)}) + "\n"
                            for i in range(9)))
    train, val = load_examples(str(path), 5, 3, seed=2)
    assert len(train) == 5 and len(val) == 3 and not {e.id for e in train} & {e.id for e in val}
