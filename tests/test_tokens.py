"""kvfuse.align.tokens on real tokenizers: SmolLM2 (byte-level BPE) vs Gemma3 (SentencePiece) over GSM8K."""
import numpy as np
import pytest
import torch

from kvfuse import _C
from kvfuse.align.tokens import (alignment_matrices, alignment_matrix, check_spans, dense_iou,
                                 reference_iou_alignment, token_spans)
from kvfuse.data import load_gsm8k
from kvfuse.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    # The packaged GGUFs are converted once into the user cache by kvfuse.models; later loads take seconds.
    return {"smollm2": load_tokenizer("smollm2-135m-instruct"), "gemma3": load_tokenizer("gemma3-270m")}


@pytest.fixture(scope="module")
def gsm8k_texts():
    examples = load_gsm8k()
    picks = np.random.default_rng(0).choice(len(examples), size=4, replace=False)
    return [f"{examples[i].question}\n{examples[i].rationale}\n#### {examples[i].answer}" for i in picks]


TRICKY = "  Janet’s 16 ducks\tlay  eggs\n\n— héllo 日本語 🤖, x=3.5%  "


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_token_spans_are_monotone_and_cover_the_text(tokenizers, gsm8k_texts, name):
    tok = tokenizers[name]
    for text in gsm8k_texts + [TRICKY]:
        ids, spans = token_spans(tok, text)
        assert ids.dtype == np.int64 and spans.dtype == np.int64 and spans.shape == (len(ids), 2)
        check_spans(spans, name)  # raises on any violation of the builder's span rules
        covered = np.zeros(len(text), dtype=bool)
        for a, b in spans.tolist():
            covered[a:b] = True
        assert covered.all(), f"{name} leaves characters of the text without a token"
        special = set(tok.all_special_ids)
        for token_id, (a, b) in zip(ids.tolist(), spans.tolist()):
            if token_id in special:
                assert a == b  # special tokens are zero-width: they match nothing
    ids, _ = token_spans(tok, TRICKY, add_special_tokens=False)
    assert not set(ids.tolist()) & set(tok.all_special_ids)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_trim_whitespace(tokenizers, name):
    tok = tokenizers[name]
    ids, raw = token_spans(tok, TRICKY)
    ids_t, trimmed = token_spans(tok, TRICKY, trim_whitespace=True)
    assert np.array_equal(ids, ids_t)
    check_spans(trimmed, name)
    n_whitespace_only = 0
    for (a, b), (c, d) in zip(raw.tolist(), trimmed.tolist()):
        piece = TRICKY[a:b]
        if piece.strip():
            assert TRICKY[c:d] == piece.strip() and a <= c <= d <= b
        else:
            assert (c, d) == (a, a)  # whitespace-only (or special) token: zero-width at its own start
            n_whitespace_only += a < b
    assert n_whitespace_only > 0  # the text has tokens of pure whitespace; the branch is exercised


@pytest.mark.parametrize("trim", [False, True])
def test_real_alignment_matches_reference_and_brute_force(tokenizers, gsm8k_texts, trim):
    for text in gsm8k_texts[:2]:
        _, s = token_spans(tokenizers["smollm2"], text, trim_whitespace=trim)
        _, t = token_spans(tokenizers["gemma3"], text, trim_whitespace=trim)
        for student, teacher in ((s, t), (t, s)):
            for kw in (dict(), dict(threshold=0.3, fallback="nearest"), dict(normalize=False)):
                got = _C.iou_alignment(student, teacher, **kw)
                want = reference_iou_alignment(student, teacher, **kw)
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w)
                dense = alignment_matrix(student, teacher, **kw).to_dense().numpy()
                np.testing.assert_array_equal(dense, dense_iou(student, teacher, **kw))


def test_real_alignment_properties(tokenizers, gsm8k_texts):
    text = gsm8k_texts[2]
    _, s = token_spans(tokenizers["smollm2"], text)
    _, t = token_spans(tokenizers["gemma3"], text)
    a = alignment_matrix(s, t)
    sums = a.to_dense().sum(1)
    nonempty = s[:, 1] > s[:, 0]
    torch.testing.assert_close(sums[torch.from_numpy(nonempty)], torch.ones(int(nonempty.sum())))
    # Tokenizers split most words alike, so most entries are exact one-to-one matches.
    assert (a.values() == 1).float().mean() > 0.5
    # Gemma's <bos> is a zero-width row: empty without fallback, one entry with the nearest fallback.
    a_t = alignment_matrix(t, s)
    assert a_t.crow_indices()[1] == 0
    a_t = alignment_matrix(t, s, fallback="nearest")
    assert torch.all(a_t.crow_indices().diff() >= 1)
    # A is ready for the teacher-side time alignment K' = A·K.
    k = torch.randn(len(t), 5, dtype=torch.float32)
    torch.testing.assert_close(a @ k, a.to_dense() @ k)


def test_real_batch_equals_unbatched(tokenizers, gsm8k_texts):
    ss = [token_spans(tokenizers["smollm2"], x)[1] for x in gsm8k_texts]
    ts = [token_spans(tokenizers["gemma3"], x)[1] for x in gsm8k_texts]
    for m, s, t in zip(alignment_matrices(ss, ts, threshold=0.1, num_threads=2), ss, ts):
        single = alignment_matrix(s, t, threshold=0.1)
        assert torch.equal(m.crow_indices(), single.crow_indices())
        assert torch.equal(m.col_indices(), single.col_indices())
        assert torch.equal(m.values(), single.values())


class _SlowTokenizer:
    is_fast = False
    name_or_path = "some/slow-model"


class _NoOffsetsTokenizer:
    is_fast = True
    name_or_path = "some/model"

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        raise NotImplementedError("return_offset_mapping is not available")


class _BadOffsetsTokenizer:
    is_fast = True
    name_or_path = "some/odd-model"

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        return {"input_ids": [5, 6, 7], "offset_mapping": [(0, 3), (4, 6), (2, 7)]}


def test_token_spans_bad_input(tokenizers):
    with pytest.raises(ValueError, match=r"offsets of tokenizer _BadOffsetsTokenizer\(some/odd-model\)\[2\] = "
                                         r"\(2, 7\) is not monotone"):
        token_spans(_BadOffsetsTokenizer(), "abcdefgh")
    with pytest.raises(ValueError, match=r"_SlowTokenizer\(some/slow-model\) is not a fast tokenizer"):
        token_spans(_SlowTokenizer(), "text")
    with pytest.raises(ValueError, match=r"_NoOffsetsTokenizer\(some/model\) cannot return char offsets"):
        token_spans(_NoOffsetsTokenizer(), "text")
    with pytest.raises(ValueError, match="text must be a str, got list"):
        token_spans(tokenizers["smollm2"], ["a", "b"])
