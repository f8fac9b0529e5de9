"""`python -m kvfuse align-demo`: cross-tokenizer alignment of GSM8K between the packaged SmolLM2 (student) and
Gemma3 (teacher) tokenizers, each rendering the example in its own format (chat template vs plain).

Saves the alignment matrix of one example as a PNG (student tokens × teacher tokens) and prints, over the whole
dataset, how many student tokens in the shared segments found a teacher partner, nnz per row and the builder's
speed (tokenisation excluded).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvfuse.align.time import time_alignment
from kvfuse.align.tokens import token_spans
from kvfuse.data import load_gsm8k, render, resolve_prompt
from kvfuse.eval.visualize import plot_alignment
from kvfuse.models import load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", default="smollm2-135m-instruct")
    parser.add_argument("--teacher", default="gemma3-270m")
    parser.add_argument("--student_prompt", default="default")
    parser.add_argument("--teacher_prompt", default="cot")
    parser.add_argument("--n", type=int, default=None, help="number of GSM8K items (default all 1319)")
    parser.add_argument("--example", type=int, default=0, help="index of the example to draw")
    parser.add_argument("--max_tokens_drawn", type=int, default=80, help="draw the first N student tokens")
    parser.add_argument("--out", default="runs/align-demo")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s_tok, t_tok = load_tokenizer(args.student), load_tokenizer(args.teacher)
    print(f"tokenizers loaded in {time.perf_counter() - t0:.1f} s")
    examples = load_gsm8k()[: args.n]
    s_prompt, t_prompt = resolve_prompt(args.student_prompt), resolve_prompt(args.teacher_prompt)
    build_s = aligned = shared = nnz = 0
    drawn = None
    for i, ex in enumerate(tqdm(examples, desc="align GSM8K", unit="ex")):
        views = []
        for tok, prompt in ((s_tok, s_prompt), (t_tok, t_prompt)):
            rendered = render(tok, prompt, ex)
            _, spans = token_spans(tok, rendered.text, add_special_tokens=rendered.add_special_tokens)
            views.append((rendered, spans))
        (rs, ss), (rt, ts) = views
        start = time.perf_counter()
        A, mask = time_alignment(ss, rs.segments, ts, rt.segments, student_text=rs.text, teacher_text=rt.text,
                                 fallback="none")
        build_s += time.perf_counter() - start
        in_shared = ((ss[:, 1] > rs.question[0]) & (ss[:, 0] < rs.rationale[1])).sum()
        shared += int(in_shared)
        aligned += int(mask.sum())
        nnz += int(A.values().numel())
        if i == args.example:
            drawn = (A, rs, ss, rt, ts)
    A, rs, ss, rt, ts = drawn
    n = min(args.max_tokens_drawn, A.shape[0])
    dense = A.to_dense()[:n]
    cols = np.nonzero(dense.sum(0).numpy())[0]
    last_col = int(cols.max()) + 1 if len(cols) else A.shape[1]
    picture = plot_alignment(dense[:, :last_col], [rs.text[a:b] for a, b in ss[:n]],
                             [rt.text[a:b] for a, b in ts[:last_col]], out / "alignment.png",
                             title=f"IoU alignment A, GSM8K item {args.example}: {args.student} × {args.teacher}")
    print(f"{len(examples)} examples: {aligned}/{shared} shared-segment student tokens aligned "
          f"({100 * aligned / max(shared, 1):.1f} %), {nnz / max(aligned, 1):.2f} teacher tokens per row, "
          f"alignment built in {build_s:.2f} s ({aligned / max(build_s, 1e-9):,.0f} tokens/s, tokenisation excluded)")
    print(f"picture: {picture}")
    return 0
