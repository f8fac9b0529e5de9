"""Time alignment: shared-segment coordinates, A against a brute-force char-set IoU, K' = A·K, pad + mask."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvfuse.align.time import apply_alignment, pad_aligned, pick_bucket, shared_text, time_alignment, to_shared_coords
from kvfuse.align.tokens import token_spans
from kvfuse.data import Example, render
from kvfuse.models import tiny_tokenizer

EXAMPLES = [
    Example(id="a", question="Tom has 3 apples and buys 14 more.", rationale="3 + 14 = 17, so he has 17. #### 17", answer="17"),
    Example(id="b", question="A train goes 60 km/h for 2.5 hours; how far?", rationale="60*2.5=150 km.\n#### 150", answer="150"),
]


def _word_tokenizer(texts):
    """A second, unrelated fast tokenizer: word-level on \\w+ / punctuation runs, offsets without spaces."""
    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _view(tokenizer, prompt, example):
    rendered = render(tokenizer, prompt, example)
    ids, spans = token_spans(tokenizer, rendered.text, add_special_tokens=rendered.add_special_tokens)
    return rendered, ids, spans


def _brute_force(s_spans, s_segs, t_spans, t_segs):
    """IoU over *sets* of shared-character indices, pair by pair, row-normalised (dense float64)."""
    def shared_index(segs):
        index, k = {}, 0
        for a, b in segs:
            for c in range(a, b):
                index[c] = k
                k += 1
        return index

    si, ti = shared_index(s_segs), shared_index(t_segs)
    s_sets = [{si[c] for c in range(a, b) if c in si} for a, b in s_spans.tolist()]
    t_sets = [{ti[c] for c in range(a, b) if c in ti} for a, b in t_spans.tolist()]
    dense = np.zeros((len(s_sets), len(t_sets)))
    for s, ss in enumerate(s_sets):
        for t, tt in enumerate(t_sets):
            if ss and tt and ss & tt:
                dense[s, t] = len(ss & tt) / len(ss | tt)
        if dense[s].sum() > 0:
            dense[s] /= dense[s].sum()
    return dense, np.array([bool(x) for x in s_sets])


def test_to_shared_coords_by_hand():
    text = "<u>Hi. Q: ab cd</u><a>ef g</a>"
    segs = [(10, 15), (22, 26)]
    assert shared_text(text, segs) == "ab cdef g"
    spans = np.array([[0, 3], [3, 6], [6, 9], [9, 12], [12, 15], [15, 23], [23, 25], [25, 26], [26, 30], [0, 0]])
    out, mask = to_shared_coords(spans, segs)
    assert mask.tolist() == [False, False, False, True, True, True, True, True, False, False]
    # " ab" loses its space; the straddler "</u><a>e" keeps only "e"; zero-width and template tokens are masked
    assert out[mask].tolist() == [[0, 2], [2, 5], [5, 6], [6, 8], [8, 9]]
    assert (out[~mask] == 0).all()
    # A token over the template between two segments spans both parts in shared coordinates.
    out, mask = to_shared_coords(np.array([[12, 24]]), segs)
    assert mask.tolist() == [True] and out.tolist() == [[2, 7]]
    with pytest.raises(ValueError, match="overlap"):
        to_shared_coords(spans, [(9, 14), (12, 20)])
    with pytest.raises(ValueError, match="end < start"):
        to_shared_coords(np.array([[5, 2]]), segs)


def test_same_tokenizer_prompt_offset_gives_shifted_identity():
    tok = tiny_tokenizer("tiny-llama")
    for example in EXAMPLES:
        s_r, _, s_spans = _view(tok, "", example)
        t_r, _, t_spans = _view(tok, "You are a careful math tutor. Think step by step.", example)
        A, mask = time_alignment(s_spans, s_r.segments, t_spans, t_r.segments, student_text=s_r.text, teacher_text=t_r.text)
        dense = A.to_dense()
        rows = torch.nonzero(mask).flatten()
        offset = len(t_spans) - len(s_spans)  # only the prompt differs, and it sits in front
        assert offset > 0 and len(rows) > 10
        expected = torch.zeros_like(dense)
        expected[rows, rows + offset] = 1.0
        torch.testing.assert_close(dense, expected)
        in_segments = [any(a < e and b > s for s, e in s_r.segments) for a, b in s_spans.tolist()]
        assert mask.tolist() == in_segments


def test_cross_tokenizer_matches_brute_force():
    student = tiny_tokenizer("tiny-qwen2")
    texts = [render(student, "", ex).text for ex in EXAMPLES] + [ex.question + " " + ex.rationale for ex in EXAMPLES]
    teacher = _word_tokenizer(texts)
    for example in EXAMPLES:
        s_r, _, s_spans = _view(student, "", example)
        t_r, _, t_spans = _view(teacher, "Let us think.", example)
        assert not t_r.chat_template and s_r.chat_template  # different layouts around the same shared text
        A, mask = time_alignment(s_spans, s_r.segments, t_spans, t_r.segments, student_text=s_r.text, teacher_text=t_r.text)
        ref, ref_mask = _brute_force(s_spans, s_r.segments, t_spans, t_r.segments)
        np.testing.assert_allclose(A.to_dense().numpy(), ref, rtol=1e-6, atol=1e-7)
        # Student tokens that are only whitespace inside a segment overlap no word token: masked out.
        assert mask.tolist() == (ref_mask & (ref.sum(axis=1) > 0)).tolist()
        assert 0 < mask.sum() < len(mask)


def test_mismatched_shared_text_is_an_error():
    tok = tiny_tokenizer("tiny-llama")
    s_r, _, s_spans = _view(tok, "", EXAMPLES[0])
    t_r, _, t_spans = _view(tok, "", EXAMPLES[1])
    with pytest.raises(ValueError, match="shared segments differ"):
        time_alignment(s_spans, s_r.segments, t_spans, t_r.segments, student_text=s_r.text, teacher_text=t_r.text)
    with pytest.raises(ValueError, match="chars"):
        time_alignment(s_spans, s_r.segments, t_spans, t_r.segments)


def test_apply_alignment_against_dense_float64():
    g = torch.Generator().manual_seed(0)
    t_s, t_t = 13, 17
    dense = torch.rand(t_s, t_t, generator=g) * (torch.rand(t_s, t_t, generator=g) < 0.2)
    dense[3] = 0.0  # an empty row
    x = torch.randn(2, 3, t_t, 5, generator=g)
    ref = torch.einsum("st,bhtd->bhsd", dense.double(), x.double())
    out = apply_alignment(dense.to_sparse_csr(), x)
    assert out.shape == (2, 3, t_s, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(apply_alignment(dense, x[0]).double(), ref[0], rtol=1e-5, atol=1e-6)
    assert (out[:, :, 3] == 0).all()
    half = apply_alignment(dense.to_sparse_csr(), x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="T_t=17"):
        apply_alignment(dense.to_sparse_csr(), x[..., :16, :])


def test_pad_aligned_masks_and_never_truncates():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, n, 4, generator=g) for n in (5, 9, 2)]
    masks = [torch.rand(n, generator=g) > 0.3 for n in (5, 9, 2)]
    out, mask = pad_aligned(xs, masks)
    assert out.shape == (3, 3, 9, 4) and mask.shape == (3, 9)
    for i, (x, m) in enumerate(zip(xs, masks)):
        n = x.shape[-2]
        torch.testing.assert_close(out[i, :, :n], x)
        assert (out[i, :, n:] == 0).all()
        assert mask[i, :n].tolist() == m.tolist() and not mask[i, n:].any()
    out, mask = pad_aligned(xs, buckets=[4, 16, 64])
    assert out.shape[-2] == 16 and mask.sum().item() == 16
    with pytest.raises(ValueError, match="sample 1: length 9 exceeds max_len 8"):
        pad_aligned(xs, max_len=8)
    with pytest.raises(ValueError, match="sample 7: length 70 exceeds the largest bucket 64"):
        pick_bucket(70, [16, 64], sample=7)
    with pytest.raises(ValueError, match="sample 2 has shape"):
        pad_aligned([xs[0], xs[1], torch.randn(2, 3, 4)])


def test_no_shared_token_gives_empty_alignment():
    spans = np.array([[0, 4], [4, 8]])
    A, mask = time_alignment(spans, [(20, 25)], np.array([[0, 3]]), [(10, 15)])
    assert A.shape == (2, 1) and A.layout == torch.sparse_csr and A.values().numel() == 0
    assert not mask.any()
