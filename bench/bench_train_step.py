"""What does KV distillation add to a training step? (issue: KV loss from the store adds ≤ 15 % to a CE-only step)

Student step (forward, backward, AdamW) on one device, three ways, same inputs:
  ce_only       the student's LM loss alone
  kv_fused      LM loss + the KV loss of N teachers read from an offline store (memory-mapped safetensors),
                fused Triton kernel (torch reference on CPU)
  kv_eager      the same with the eager per-teacher PyTorch loop
  kv_fused+store(P)   kv_fused fed live by kvfuse.teacher.loader.store_batches, P batches read ahead by a
                background thread into pinned memory and moved on a side stream, as train/ does: equal to kv_fused
                when the reader keeps up (the first batch is checked equal to an inline read)
  kv_fused beside <part>   (--interference) kv_fused on resident batches while a thread reads the first codec's
                store and throws the batches away, up to <part>: collate (into pinned memory), copy (and to the device
                on a side stream), copy+flags (and the finite check's kernels, never read on the host), copy+read
                (and the flags read by `.tolist()` at once, behind the copies), copy+check (and the loader's finite
                check, which waits for the stream before reading), copy+record (and record_stream onto the training
                stream, as the loader's hand-over), loader (store_batches itself); timed on the training stream:
                what reading costs a step that never waits for it. Every row's CSV carries cuda_segment_allocs, the
                device-memory segments the caching allocator newly allocated during its timed steps
  compiled:ce_only, compiled:kv_fused   (--compile) a compiled trainer: the step's loss under torch.compile —
                the student alone, or the student, its K/V (hooks on k_proj / v_proj, RoPE) and KVDistillLoss,
                whose Triton kernels are torch.library custom ops; the backward is AOTAutograd's
Teacher KV is random data of the teachers' real shapes, written once as a real store. The first three variants
train on batches already on the device; the store read (one thread) is timed on its own, and the last variant puts
the reader on the timed path. Prints a table and appends CSV rows (device, commit) to bench/results/train_step.csv.

--codecs (issue 16; default bf16 alone): the same random teacher KV (bf16 values) written once per store codec
(kvfuse.codecs: bf16, fp8, int4, lowrank:...), encoded from fp32 on the device as `python -m kvfuse dump --codec` does
(kvfuse.teacher.compress.encode_sample, the codec in the store's settings), and kv_fused / kv_fused+store(P) timed
on each store in the same run as ce_only. The loss gets the compressed entries as training passes them
(kvfuse.distill: QuantizedKV / LowRankKV as they come from the loader, decoded in the Triton kernels; the torch
backend on the CPU decodes them explicitly, as it does in training). kv_eager runs on the bf16 store only. CSV rows
carry `codec`, the store's bytes per valid token (whole shard: ids, masks, KV, scales) and the teacher KV's alone.
--rounds R times CE only and every codec's variants R times, interleaved (the codecs' order rotated each round): an
A/B of codecs whose difference is near the spread between runs (rows carry `round`; the overheads are against the
round's own CE-only step, and their medians and ranges are printed).

    python -m bench.bench_train_step --student random:qwen2.5-1.5b --batch 4 --seq 2048    # GPU
    python -m bench.bench_train_step --student tiny-llama --batch 2 --seq 64 --steps 3    # CPU smoke run
    python -m bench.bench_train_step --student tiny-llama --batch 2 --seq 64 --steps 2 --codecs bf16 fp8 int4
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from bench.common import append_csv, commit, device_name, rotated
from kvfuse.align.rope import rotate
from kvfuse.codecs import Codec, finite_flag, is_encoded, parse_codec
from kvfuse.loss import KVDistillLoss
from kvfuse.models import kv_heads, load
from kvfuse.models.capture import capture_kv
from kvfuse.teacher.builder import collate
from kvfuse.teacher.compress import encode_sample, fit_bases
from kvfuse.teacher.loader import batch_to, check_finite_teachers, store_batches
from kvfuse.teacher.store import StoreWriter, TeacherKVStore


def make_samples(n: int, seq: int, n_layers: int, teachers: list[tuple[int, int]], seed: int = 0
                 ) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """n random samples of the teachers' shapes, teacher KV in bf16 (what a bf16 teacher produces)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        tensors = {"input_ids": torch.randint(0, 500, (seq,), generator=gen), "positions": torch.arange(seq),
                   "mask": torch.ones(seq, dtype=torch.bool), "labels_mask": torch.ones(seq, dtype=torch.bool)}
        for t, (h, d) in enumerate(teachers):
            for kind in ("k", "v"):
                tensors[f"teacher{t}/{kind}"] = torch.randn(n_layers, h, seq, d, generator=gen).to(torch.bfloat16)
        samples.append((f"s{i}", tensors))
    return samples


def make_store(root: Path, samples: list[tuple[str, dict[str, torch.Tensor]]], settings: dict,
               codec: Codec | str = "bf16", device: str | torch.device = "cpu") -> None:
    """`samples` as a one-shard store under `codec`. Codec bf16 stores them as they are (the store this bench always
    wrote); the others encode each sample's KV, as fp32, on `device` as the dump does (its builder keeps fp32 for a
    codec, then kvfuse.teacher.compress.encode_sample), low-rank codecs on bases fitted on these samples and
    claimed as the store's; the codec is recorded in the store's settings."""
    codec = parse_codec(str(codec))
    if codec.kind == "bf16":
        StoreWriter(root, settings, 1).write_shard(0, samples)
        return
    writer = StoreWriter(root, {**settings, "codec": str(codec)}, 1)

    def fp32(tensors):
        return {k: v.float() if k.startswith("teacher") else v for k, v in tensors.items()}
    bases = writer.claim_bases(fit_bases([fp32(t) for _, t in samples], codec)) if codec.lowrank else None
    on_device = None if bases is None else {k: replace(b, basis=b.basis.to(device)) for k, b in bases.items()}
    encoded = []
    for sid, tensors in samples:
        on = fp32({k: v.to(device) for k, v in tensors.items()})
        encoded.append((sid, {k: v.cpu() for k, v in encode_sample(on, codec, on_device).items()}))
    writer.write_shard(0, encoded)


def teacher_parts(batch: dict) -> list[torch.Tensor]:
    """Every tensor of a batch's teacher entries (a compressed entry's data, scales, offsets, basis)."""
    return [p for kind in ("teacher_k", "teacher_v") for t in batch[kind]
            for p in (t.tensors() if is_encoded(t) else [t])]


def kv_bytes_per_token(store: TeacherKVStore) -> float:
    """The teacher KV's stored bytes (data, scales, offsets, low-rank coefficients) per valid token of the first
    sample; the bases of a low-rank store are per store, not counted."""
    item = store[0]
    stored = sum(v.nbytes if is_encoded(v) else v.numel() * v.element_size()
                 for k, v in item.items() if k.startswith("teacher"))
    return stored / max(int(item["mask"].sum()), 1)


def segment_allocs(device: torch.device) -> int:
    """Device-memory segments the caching allocator has allocated (cudaMalloc calls) so far; 0 off the GPU."""
    return torch.cuda.memory_stats(device).get("segment.all.allocated", 0) if device.type == "cuda" else 0


def profile_steps(step, device: torch.device, path: Path, steps: int = 3, trace: Path | None = None) -> None:
    """GPU (and host) time per operator and kernel over `steps` calls of `step`, as torch.profiler's table; with
    `trace`, also the timeline of every thread and stream (Chrome trace, gzipped)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=100, max_name_column_width=70))
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()


def timed(fn, steps: int, device: torch.device, stream_only: bool = False,
          new_segments: list[int] | None = None) -> float:
    """Median seconds of one step, waited for on the whole device, or with `stream_only` on the training stream
    alone (when another thread keeps copying on a side stream, a device-wide wait would count its copies too).
    `new_segments` gets the segments allocated during the timed steps (after the warm-up)."""
    fn()  # warm-up: compilation, autotuning, allocator
    fn()

    def wait():
        if device.type != "cuda":
            return
        if stream_only:
            torch.cuda.current_stream(device).synchronize()
        else:
            torch.cuda.synchronize()
    times = []
    before = segment_allocs(device)
    for _ in range(steps):
        wait()
        start = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - start)
    if new_segments is not None:
        new_segments.append(segment_allocs(device) - before)
    return statistics.median(times)


@contextmanager
def reading_beside(store: TeacherKVStore, id_batches: list[list[str]], n_teachers: int, device: torch.device,
                   part: str):
    """A thread that reads `store` batch after batch, as the loader does, up to `part` ("collate": into pinned
    memory; "copy": and to the device on a side stream; "copy+flags": and the finite check's kernels, not read on the
    host; "copy+read": and the flags read at once, behind the copies; "copy+check": and the loader's finite check;
    "copy+record": and `record_stream` of the teacher tensors onto the training stream, as the loader's hand-over
    does; "loader": kvfuse.teacher.loader.store_batches itself) and throws the batches away: what reading costs a
    step that does not wait for it."""
    stop = threading.Event()
    cuda = device.type == "cuda"

    def run():
        side = torch.cuda.Stream(device) if cuda else None
        while not stop.is_set():
            if part == "loader":
                for _ in store_batches(store, id_batches, n_teachers, device=device, prefetch=1):
                    if stop.is_set():
                        return
                continue
            for ids in id_batches:
                batch = collate([store.get(i) for i in ids], n_teachers, pin_memory=cuda)
                if part == "collate":
                    continue
                with torch.cuda.stream(side) if cuda else nullcontext():
                    moved = batch_to(batch, device)
                    if part in ("copy+flags", "copy+read"):
                        flags = torch.stack([finite_flag(t) for t in teacher_parts(moved)])
                        if part == "copy+read":
                            flags.tolist()
                    if part == "copy+check":
                        check_finite_teachers(moved)
                if cuda:
                    side.synchronize()
                    if part == "copy+record":       # as the loader hands a batch over: reusable once training passes
                        for t in teacher_parts(moved):
                            t.record_stream(torch.cuda.current_stream(device))
                if stop.is_set():
                    return
    thread = threading.Thread(target=run, name="kvfuse-bench-reader", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def compiled_variants(student, kv_loss, next_batch, opt, steps: int, device) -> list[tuple[str, float]]:
    """CE-only and CE + KV steps whose loss is computed by torch.compile'd code (graph breaks reported)."""
    cfg = student.config
    H, D = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = student.model.rotary_emb

    def ce_loss(batch):
        return student(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss

    rec = {}

    def kv_step_loss(batch):
        out = student(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False)
        B, T = batch["input_ids"].shape
        pos = batch["positions"][:, None]
        keys = torch.stack([rotate(rec[("k", i)].view(B, T, H, D).transpose(1, 2), pos, rotary.inv_freq,
                                   rotary.attention_scaling) for i in range(cfg.num_hidden_layers)])
        values = torch.stack([rec[("v", i)].view(B, T, H, D).transpose(1, 2) for i in range(cfg.num_hidden_layers)])
        kv, _ = kv_loss(keys, values, batch["teacher_k"], batch["teacher_v"], batch["mask"], batch["positions"],
                        rotary.inv_freq, rotary.attention_scaling)
        return out.loss + kv

    def runner(fn):
        compiled = torch.compile(fn)

        def step():
            compiled(next_batch()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    out = []
    explained = torch._dynamo.explain(ce_loss)(next_batch())
    print(f"compiled ce_only: {explained.graph_break_count} graph breaks", flush=True)
    out.append(("compiled:ce_only", timed(runner(ce_loss), steps, device)))
    hooks = []
    for i, layer in enumerate(student.model.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(
            lambda m, inp, o, i=i: rec.__setitem__(("k", i), o)))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda m, inp, o, i=i: rec.__setitem__(("v", i), o)))
    try:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(kv_step_loss)(next_batch())
        print(f"compiled kv_fused: {explained.graph_break_count} graph breaks {explained.break_reasons[:3]}",
              flush=True)
        torch._dynamo.reset()
        out.append(("compiled:kv_fused", timed(runner(kv_step_loss), steps, device)))
    finally:
        for h in hooks:
            h.remove()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="random:qwen2.5-1.5b")
    parser.add_argument("--teachers", default="4x128,8x128", help="teacher KV heads x head dim, comma separated")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--store_prefetch", type=int, default=2, help="batches read ahead in the store-fed variant")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time CE only and every codec's variants this many times, interleaved (the codecs' order "
                             "rotated each round), and print each overhead's median and range")
    parser.add_argument("--codecs", nargs="+", default=["bf16"],
                        help="store codecs to time the KV variants on, one store each (bf16, fp8, int4, "
                             "lowrank:<r or e<energy>>[+fp8|+int4]; default bf16)")
    parser.add_argument("--csv", default=str(ROOT / "bench/results/train_step.csv"))
    parser.add_argument("--compile", action="store_true", help="also time the compiled-trainer variants")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the timings, write the GPU time per kernel of three resident kv_fused steps "
                             "per codec (torch.profiler) to DIR/train_step_profile_<codec>.txt, and of three "
                             "store-fed ones to DIR/train_step_profile_<codec>_store.txt with their timeline "
                             "(every thread and stream: the loader's too) in DIR/train_step_trace_<codec>_store.json.gz")
    parser.add_argument("--interference", action="store_true",
                        help="also time kv_fused on resident batches while a thread reads the first codec's store "
                             "up to a part of the loader (collate / copy / copy+flags / copy+read / copy+check / copy+record / loader)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    codecs = [parse_codec(c) for c in args.codecs]
    if len({str(c) for c in codecs}) != len(codecs):
        parser.error(f"--codecs repeats a codec: {args.codecs}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student, _ = load(args.student, dtype=dtype, device=device)
    student.train()
    cfg = student.config
    L, (H_s, D_s) = cfg.num_hidden_layers, kv_heads(cfg)
    teachers = [tuple(int(x) for x in spec.split("x")) for spec in args.teachers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kvfuse-bench-store-"))
    samples = make_samples(args.batch * 2, args.seq, L, teachers)
    stores = {}
    for codec in codecs:
        root = tmp / str(codec).replace(":", "-").replace("+", "-")
        start = time.perf_counter()
        make_store(root, samples, {"bench": "train_step", "seq": args.seq, "teachers": teachers}, codec, device)
        stores[str(codec)] = TeacherKVStore(root)
        print(f"store {codec}: written in {time.perf_counter() - start:.1f} s, "
              f"{stores[str(codec)].bytes_per_token:.0f} bytes/token", flush=True)
    del samples
    alpha = [1.0 / len(teachers)] * len(teachers)
    losses = {b: KVDistillLoss(teachers, (H_s, D_s), L, alpha=alpha, backend=b, check_finite=False,
                               dtype=dtype).to(device) for b in ("triton" if device.type == "cuda" else "torch",
                                                                 "torch")}
    params = list(student.parameters()) + [p for m in losses.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6)

    def reader(store):
        state = {"i": 0}

        def read_batch():
            ids = [(state["i"] + b) % len(store) for b in range(args.batch)]
            state["i"] += args.batch
            return batch_to(collate([store[i] for i in ids], len(teachers)), device)
        return read_batch

    # The steps are timed on batches already on the device (a DataLoader prefetches them in real training);
    # the store read is timed on its own, so the table shows whether the reader can keep up.
    def cycling(batches):
        state = {"j": 0}

        def next_resident():
            state["j"] += 1
            return batches[state["j"] % len(batches)]
        return next_resident

    first_codec = str(codecs[0])
    next_batch = cycling([reader(stores[first_codec])() for _ in range(2)])

    def ce_only():
        batch = next_batch()
        out = student(input_ids=batch["input_ids"], labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def with_kv(backend, batches):
        def step():
            batch = batches()
            cap = capture_kv(student, batch["input_ids"], requires_grad=True, return_hidden=True)
            logits = student.lm_head(cap.hidden)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                   batch["input_ids"][:, 1:].flatten())
            inv_freq = torch.stack([r[0] for r in cap.rope]).to(device)
            pos = batch["positions"][:, None]
            student_k = torch.stack([rotate(k, pos, inv_freq[l], cap.rope[l][1]) for l, k in enumerate(cap.keys)])
            student_v = torch.stack(cap.values)
            # as kvfuse.distill does: compressed store entries go to the KV loss as they are (it decodes them)
            teacher_k = [t if is_encoded(t) else t.to(dtype) for t in batch["teacher_k"]]
            teacher_v = [t if is_encoded(t) else t.to(dtype) for t in batch["teacher_v"]]
            kv, _ = losses[backend](student_k, student_v, teacher_k, teacher_v, batch["mask"], batch["positions"],
                                    inv_freq, cap.rope[0][1])
            (ce + kv).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def read_only(read_batch):
        def run():
            read_batch()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    reads = {c: timed(read_only(reader(store)), args.steps, device) for c, store in stores.items()}
    variants = []           # (variant, codec, seconds, round)
    # per (variant, codec, round): device-memory segments the caching allocator newly allocated during the timed steps
    segments: dict[tuple[str, str, int], int] = {}
    this_round = [0]

    def add(variant: str, codec: str, step, stream_only: bool = False) -> None:
        new: list[int] = []
        variants.append((variant, codec, timed(step, args.steps, device, stream_only, new), this_round[0]))
        segments[(variant, codec, this_round[0])] = new[0]
    fused_backend = "triton" if device.type == "cuda" else "torch"
    same = {}
    reader_waits = {}      # per (codec, round): median host time a store-fed step spent waiting for its batch

    def id_batches_of(store, n_batches: int) -> list[list[str]]:
        return [[store.sample_ids[(j * args.batch + b) % len(store)] for b in range(args.batch)]
                for j in range(n_batches)]

    def run_codec(c, store):
        """kv_fused (and, on bf16, kv_eager) on resident batches of `store`, then kv_fused fed live from it."""
        resident = cycling([reader(store)() for _ in range(2)])
        add(f"kv_fused({fused_backend})", c, with_kv(fused_backend, resident))
        if c == "bf16":
            add("kv_eager(torch)", c, with_kv("torch", resident))
        id_batches = id_batches_of(store, args.steps + 2)       # timed() runs two warm-up steps
        if args.interference and c == first_codec and this_round[0] == 0:
            for part in ("collate", "copy", "copy+flags", "copy+read", "copy+check", "copy+record", "loader"):
                with reading_beside(store, id_batches, len(teachers), device, part):
                    add(f"kv_fused beside {part}", c, with_kv(fused_backend, resident), stream_only=True)
        del resident
        fed = store_batches(store, id_batches, len(teachers), device=device, prefetch=args.store_prefetch)
        first = next(fed)
        inline = batch_to(collate([store.get(i) for i in id_batches[0]], len(teachers)), device)
        same[c] = same.get(c, True) and all(torch.equal(a, b) for a, b in zip(teacher_parts(first),
                                                                              teacher_parts(inline)))
        batches_fed = iter([first])
        del first, inline

        waits = []

        def from_store():
            batch = next(batches_fed, None)
            if batch is None:
                start = time.perf_counter()
                batch = next(fed)
                waits.append(time.perf_counter() - start)
            return batch
        add(f"kv_fused+store({args.store_prefetch})", c, with_kv(fused_backend, from_store))
        reader_waits[c, this_round[0]] = statistics.median(waits)
        fed.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Rounds interleave the variants (each round times CE only, then every codec in an order rotated by one), so
    # that drift over the run and the position in it fall on every codec alike; each round's overheads are
    # against its own CE-only step.
    names = list(stores)
    for r in range(args.rounds):
        this_round[0] = r
        add("ce_only", "", ce_only)
        for c in rotated(names, r):
            run_codec(c, stores[c])
    if args.profile:  # after every timing: a profiler session can slow the launches that follow it
        for c, store in stores.items():
            profile_steps(with_kv(fused_backend, cycling([reader(store)() for _ in range(2)])), device,
                          args.profile / f"train_step_profile_{c}.txt")
            fed = store_batches(store, id_batches_of(store, 6), len(teachers), device=device,
                                prefetch=args.store_prefetch)
            step = with_kv(fused_backend, lambda: next(fed))
            step(), step()                                      # the reader's first batches, outside the profile
            profile_steps(step, device, args.profile / f"train_step_profile_{c}_store.txt",
                          trace=args.profile / f"train_step_trace_{c}_store.json.gz")
            fed.close()
    if args.compile:
        variants += [(v, first_codec if v != "compiled:ce_only" else "", t, this_round[0]) for v, t in
                     compiled_variants(student, losses[fused_backend], next_batch, opt, args.steps, device)]
    tokens = args.batch * args.seq
    name = device_name(device)
    print(f"\nstudent {args.student} ({L} layers, {H_s}x{D_s} KV), teachers {teachers}, batch {args.batch} x "
          f"{args.seq} tokens, {name}")
    print(f"{'codec':18s} {'store B/token':>13s} {'KV B/token':>11s} {'read ms':>8s} {'wait ms':>8s}  "
          "prefetched == inline")
    for c, store in stores.items():
        wait = statistics.median(reader_waits[c, r] for r in range(args.rounds))
        print(f"{c:18s} {store.bytes_per_token:13.0f} {kv_bytes_per_token(store):11.0f} {reads[c] * 1e3:8.1f} "
              f"{wait * 1e3:8.1f}  {same[c]}")
    print("(read ms: store read + host-to-device copy of one batch, one thread; wait ms: median host time a "
          "store-fed step waited for its batch)")
    print(f"{'variant':24s} {'codec':18s} {'round':>5s} {'step ms':>9s} {'tokens/s':>10s} {'vs ce_only':>11s}")
    bases = {r: t for v, _, t, r in variants if v == "ce_only"}
    compiled_base = next((t for v, _, t, _ in variants if v == "compiled:ce_only"), None)
    rows = []
    overheads: dict[tuple[str, str], list[float]] = {}
    for variant, c, seconds, r in variants:
        overhead = seconds / (compiled_base if variant.startswith("compiled:") else bases[r]) - 1
        overheads.setdefault((variant, c), []).append(overhead)
        print(f"{variant:24s} {c:18s} {r:5d} {seconds * 1e3:9.1f} {tokens / seconds:10.0f} {100 * overhead:+10.1f}%")
        store = stores.get(c)
        rows.append({"device": name, "commit": commit(), "student": args.student, "teachers": args.teachers,
                     "batch": args.batch, "seq": args.seq, "variant": variant, "round": r,
                     "step_ms": round(seconds * 1e3, 3),
                     "tokens_per_s": round(tokens / seconds, 1), "overhead_vs_ce": round(overhead, 4),
                     "store_read_ms": round(reads[c] * 1e3, 3) if store else "",
                     "store_prefetch": args.store_prefetch, "codec": c,
                     "store_bytes_per_token": round(store.bytes_per_token, 1) if store else "",
                     "kv_bytes_per_token": round(kv_bytes_per_token(store), 1) if store else "",
                     "prefetched_equals_inline": same[c] if store else "",
                     "reader_wait_ms": (round(reader_waits[c, r] * 1e3, 3) if variant.startswith("kv_fused+store")
                                        else ""),
                     "cuda_segment_allocs": segments.get((variant, c, r), "") if device.type == "cuda" else ""})
    if args.rounds > 1:
        print(f"over {args.rounds} rounds: median overhead vs the round's CE only [min, max]")
        for (variant, c), values in overheads.items():
            if variant != "ce_only":
                print(f"{variant:24s} {c:18s} {100 * statistics.median(values):+6.1f}%  "
                      f"[{100 * min(values):+.1f}, {100 * max(values):+.1f}]")
    append_csv(args.csv, rows)
    shutil.rmtree(tmp)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
