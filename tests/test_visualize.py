"""Alignment / layer-map pictures: valid PNG files of sensible size, token labels, bad input rejected."""
import struct

import numpy as np
import pytest
import torch

from kvfuse.align.layers import layer_map
from kvfuse.align.time import time_alignment
from kvfuse.align.tokens import token_spans
from kvfuse.data import Example, render
from kvfuse.eval.visualize import plot_alignment, plot_layer_map
from kvfuse.models import tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_alignment_of_a_real_pair(tmp_path):
    example = Example(id="v", question="Sara reads 12 pages a day for 5 days.",
                      rationale="12*5=60 pages. #### 60", answer="60")
    student_tok, teacher_tok = tiny_tokenizer("tiny-llama"), tiny_tokenizer("tiny-gemma3")
    s_r = render(student_tok, "", example)
    t_r = render(teacher_tok, "Answer briefly.", example)
    s_ids, s_spans = token_spans(student_tok, s_r.text, add_special_tokens=s_r.add_special_tokens)
    t_ids, t_spans = token_spans(teacher_tok, t_r.text, add_special_tokens=t_r.add_special_tokens)
    A, _ = time_alignment(s_spans, s_r.segments, t_spans, t_r.segments, student_text=s_r.text, teacher_text=t_r.text)
    labels_s = [s_r.text[a:b] for a, b in s_spans.tolist()]
    labels_t = [t_r.text[a:b] for a, b in t_spans.tolist()]
    path = plot_alignment(A, labels_s, labels_t, tmp_path / "sub" / "alignment.png")
    width, height = _png_size(path)
    assert 300 < width < 4000 and 300 < height < 4000
    assert 5_000 < (tmp_path / "sub" / "alignment.png").stat().st_size < 2_000_000
    with pytest.raises(ValueError, match="student"):
        plot_alignment(A, labels_s[:-1], labels_t, tmp_path / "bad.png")


def test_plot_long_alignment_and_layer_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(300, 350, generator=g) * (torch.rand(300, 350, generator=g) < 0.01)
    path = plot_alignment(dense, [f"s{i}" for i in range(300)], [f"t{i}" for i in range(350)], tmp_path / "long.png")
    width, height = _png_size(path)
    assert width < 4100 and height < 4100
    for n_t, n_s in [(18, 30), (30, 30), (5, 1)]:
        path = plot_layer_map(layer_map(n_t, n_s), tmp_path / f"map_{n_t}_{n_s}.png")
        width, height = _png_size(path)
        assert 150 < width < 4000 and 100 < height < 4000
    with pytest.raises(ValueError, match="2-D"):
        plot_layer_map(np.ones(3), tmp_path / "bad.png")


def test_plot_embedding_writes_a_png(tmp_path):
    from kvfuse.eval.visualize import plot_embedding

    gen = torch.Generator().manual_seed(5)
    points = torch.cat([torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen) + 4])
    sources = ["student"] * 30 + ["teacher0"] * 30
    samples = [f"s{i % 3}" for i in range(60)]
    path = plot_embedding(points, sources, samples, tmp_path / "z.png", title="Z")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with pytest.raises(ValueError, match="plot_embedding needs"):
        plot_embedding(points[:3], sources[:3], samples[:3], tmp_path / "bad.png")
