"""The fused loss on a real teacher store, Triton on the GPU against float64 torch on the decoded teachers.

Question answered: does the Triton loss give the reference's loss and gradients on a store as `kvfuse dump` wrote it
(any codec: real scales, offsets, ragged rows, the packaged models' head dims), where the benches use random KV at
the bench's shapes? Batches of several sizes are collated from the store's items; the student tensors, adapters and
router weights are random (seeded). The exit status is 1 when any relative error (norm of the difference over the
reference's) passes --tol; bf16 rounding sits near 2e-3 on the GPU (near 4e-3 under the interpreter, whose float to
bf16 casts truncate), a wrong decode at percents. On the CPU, --layers 2 --batches 2 takes about 10 minutes.

    PYTHONPATH=. python -m bench.check_store_loss runs/codecs/store-p1-int4        # GPU (or TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.bench_fused_loss import rel
from kvfuse.codecs import LowRankKV, QuantizedKV, decode
from kvfuse.loss import kv_distill_loss
from kvfuse.teacher.builder import collate
from kvfuse.teacher.store import TeacherKVStore

BATCHES = ([0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11])
GRADS = ("student_k", "student_v", "alpha", "w_k", "w_v")


def describe(x) -> str:
    if isinstance(x, QuantizedKV):
        return f"{x.kind} per {x.axis} ({x.scale.dtype} scales)"
    if isinstance(x, LowRankKV):
        return f"low rank {x.rank}"
    return str(x.dtype)


def first_layers(x, n: int | None):
    """A teacher entry cut to its first n layers (all when n is None)."""
    if n is None:
        return x
    if isinstance(x, QuantizedKV):
        return x._map(lambda t: t[:n])
    if isinstance(x, LowRankKV):
        raise SystemExit("--layers does not cut low-rank entries (their basis is per layer); leave it out")
    return x[:n]


def check_batch(store: TeacherKVStore, items: list[int], H_s: int, D_s: int,
                layers: int | None = None) -> tuple[str, float]:
    """(one report line, the worst relative error) for the store's `items` as one batch."""
    dev, bf = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    batch = collate([store[i] for i in items], 2)
    tk = [first_layers(t, layers).to(dev) for t in batch["teacher_k"]]
    tv = [first_layers(t, layers).to(dev) for t in batch["teacher_v"]]
    L, B, _, T, _ = tk[0].shape
    g = torch.Generator(device=dev).manual_seed(len(items))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(bf).requires_grad_()
    feats = [t.shape[2] * t.shape[4] for t in tk]  # a compressed entry's shape is the decoded one
    sk, sv = rnd(L, B, H_s, T, D_s), rnd(L, B, H_s, T, D_s)
    wk = [rnd(L, f, H_s * D_s, scale=f ** -0.5) for f in feats]
    wv = [rnd(L, f, H_s * D_s, scale=f ** -0.5) for f in feats]
    alpha = torch.rand(B, len(tk), device=dev, generator=g).softmax(-1).requires_grad_()
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, D_s, 2, device=dev, dtype=torch.float32) / D_s))
    params = [sk, sv, alpha, *wk, *wv]
    n = len(tk)

    def run(tk_, tv_, backend, ps):
        loss = kv_distill_loss(ps[0], ps[1], tk_, tv_, ps[3:3 + n], ps[3 + n:], ps[2], mask=batch["mask"].to(dev),
                               positions=batch["positions"].to(dev), inv_freq=inv_freq, backend=backend)[0]
        return [loss.detach(), *torch.autograd.grad(loss, ps)]

    ref_ps = [p.detach().double().requires_grad_() for p in params]
    want = run([decode(t, bf).double() for t in tk], [decode(t, bf).double() for t in tv], "torch", ref_ps)
    got = run(tk, tv, "triton", params)
    names = ["loss", *GRADS[:3], *(f"w_k[{i}]" for i in range(n)), *(f"w_v[{i}]" for i in range(n))]
    errs = {name: rel(a, b) for name, a, b in zip(names, got, want)}
    codecs = sorted({describe(t) for t in tk + tv})
    line = (f"items {items} (B {B}, T {T}, teachers {codecs}): loss {got[0].item():.6f} (float64 "
            f"{want[0].item():.6f}); " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    return line, max(errs.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="a store directory written by `python -m kvfuse dump`")
    p.add_argument("--student", type=int, nargs=2, default=(3, 64), metavar=("HEADS", "DIM"),
                   help="the random student's KV heads and head dim (default: the packaged SmolLM2's)")
    p.add_argument("--tol", type=float, default=5e-3)
    p.add_argument("--batches", type=int, default=len(BATCHES), help="the first this many of BATCHES")
    p.add_argument("--layers", type=int, help="the first this many layers only (a quick run under the interpreter)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("check_store_loss needs a CUDA GPU, or TRITON_INTERPRET=1 (slow) on the CPU")
    store = TeacherKVStore(args.store)
    worst = 0.0
    for items in BATCHES[:args.batches]:
        items = [i for i in items if i < len(store)]
        if items:
            line, err = check_batch(store, items, *args.student, args.layers)
            print(line, flush=True)
            worst = max(worst, err)
    print(f"worst relative error {worst:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
