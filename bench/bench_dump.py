"""Offline dump throughput vs the bare teacher forward on the same inputs, and store-reader throughput.

  bare      the teacher's decoder forward alone (no hooks), batched and padded as the dump does it
  serial    TeacherKVBuilder.build batch by batch: render + tokenise + forward with capture hooks + IoU alignment
            (K' = A·K) + layer map + cast to the storage dtype + copy to host; split into its parts (prepare on the
            CPU, launch on the device, copy to the host) in a separate pass with a sync after each; "until it
            returns": the host's time in `launch` alone (far below the launch's when it queues and does not wait,
            which is what lets the dump prepare the next batch meanwhile)
  write     StoreWriter.write_shard of the serial build's samples held in memory (the dump before streaming)
  dump      dump_shard, what `python -m kvfuse dump` runs, end to end into a finished (fsynced) shard: the
            pipelined build (next batch's CPU half and last batch's copy into pinned memory overlapped with the
            teacher forward) streamed to the shard file by a writer thread; the shard read back equals the serial
            build bit for bit. "last batch built": when the last batch reached the host (writes may still run)
  read      TeacherKVStore: memory-mapped reads of every sample, checksums verified at open
Target (GPU): dump ≤ 15 % over the bare forward; the reader far above what a training step consumes.
Prints a table; appends CSV rows (device, commit) to bench/results/dump.csv.

--codecs (issue 16; default bf16 alone): every stage but the bare forward once per store codec (kvfuse.codecs:
bf16, fp8, int4, lowrank:...), set up as `python -m kvfuse dump --codec` does: the builder keeps fp32 KV for a
codec and encodes each sample on the teacher's device (kvfuse.teacher.compress.encode_sample) before the copy to
the host; a low-rank codec's bases are fitted on the first batch's samples and claimed by each store. CSV rows
carry `codec` and the shard's bytes per valid student token (every tensor: ids, masks, KV, scales); the bare
forward's row has codec "-".

    python -m bench.bench_dump                                                             # CPU, SmolLM2
    python -m bench.bench_dump --teacher random:qwen2.5-7b --student random:qwen2.5-1.5b --seq 2048   # GPU
    python -m bench.bench_dump --teacher tiny-llama --student tiny-llama --seq 64 --n 4 --batch 2 --repeats 1 \
        --codecs bf16 fp8 int4                                                              # CPU smoke run
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from bench.common import append_csv, commit, device_name
from kvfuse.codecs import is_encoded, parse_codec, raise_if_not_finite
from kvfuse.data import COT_PROMPT, DEFAULT_PROMPT, Example, load_gsm_symbolic
from kvfuse.models import load
from kvfuse.teacher.builder import Teacher, TeacherKVBuilder, render_tokens
from kvfuse.teacher.compress import assemble, encode_sample, fit_bases
from kvfuse.teacher.dump import dump_shard
from kvfuse.teacher.store import StoreWriter, TeacherKVStore


def long_examples(tokenizer, n: int, seq: int) -> list[Example]:
    """n examples whose student rendering is about `seq` tokens: runs of the shipped gsm_symbolic rationales (in the
    repository, so a bare GPU machine needs no data package) as 'rationales'."""
    text = " ".join(" ".join(e.rationale for e in load_gsm_symbolic()).split())
    probe = text[:20000]
    chars_per_token = len(probe) / len(tokenizer(probe).input_ids)
    size = int(seq * chars_per_token * 0.95)
    examples = []
    for i in range(n):
        start = (i * size) % max(1, len(text) - size - 200)
        examples.append(Example(id=f"long-{i}", question=text[start:start + 200],
                                rationale=text[start + 200:start + 200 + size], answer="0"))
    return examples


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parts(value) -> list[torch.Tensor]:
    """A stored entry's tensors: a compressed entry's data, scales, offsets (and basis), or the tensor itself."""
    return value.tensors() if is_encoded(value) else [value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student", default="smollm2-135m-instruct")
    parser.add_argument("--seq", type=int, default=256, help="about this many student tokens per example")
    parser.add_argument("--n", type=int, default=8, help="examples per timed pass")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default=str(ROOT / "bench/results/dump.csv"))
    parser.add_argument("--store_dir", default=None,
                        help="where the shards are written (default: the system temp dir); /dev/shm takes the disk out")
    parser.add_argument("--codecs", nargs="+", default=["bf16"],
                        help="store codecs to time the build, dump and read with (bf16, fp8, int4, "
                             "lowrank:<r or e<energy>>[+fp8|+int4]; default bf16)")
    args = parser.parse_args(argv)
    codecs = [parse_codec(c) for c in args.codecs]
    if len({str(c) for c in codecs}) != len(codecs):
        parser.error(f"--codecs repeats a codec: {args.codecs}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher_model, teacher_tok = load(args.teacher, dtype=dtype, device=device)
    student_model, student_tok = load(args.student, dtype=dtype, device="meta" if device.type == "cuda" else "cpu")
    n_student_layers = student_model.config.num_hidden_layers
    del student_model
    examples = long_examples(student_tok, args.n, args.seq)
    teacher = Teacher(args.teacher, COT_PROMPT, teacher_model, teacher_tok)
    builder = TeacherKVBuilder([teacher], student_tok, DEFAULT_PROMPT, n_student_layers,
                               max_length=4 * args.seq + 512, storage_dtype=torch.bfloat16, device=device)
    views = [render_tokens(teacher_tok, COT_PROMPT, ex) for ex in examples]
    batches = []
    for first in range(0, len(views), args.batch):
        chunk = views[first:first + args.batch]
        lengths = [len(v.input_ids) for v in chunk]
        ids = torch.zeros(len(chunk), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, v in enumerate(chunk):
            ids[b, :lengths[b]] = v.input_ids
            mask[b, :lengths[b]] = 1
        batches.append((ids.to(device), mask.to(device)))
    teacher_tokens = sum(len(v.input_ids) for v in views)
    decoder = teacher_model.model

    @torch.no_grad()
    def bare():
        for ids, mask in batches:
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        sync(device)

    chunks = [examples[first:first + args.batch] for first in range(0, len(examples), args.batch)]

    def best(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_bare = best(bare)
    tmp = Path(tempfile.mkdtemp(prefix="kvfuse-bench-dump-", dir=args.store_dir))
    name = device_name(device)
    out = [{"device": name, "commit": commit(), "store_dir": str(tmp.parent), "teacher": args.teacher,
            "student": args.student, "seq": args.seq, "n": args.n, "batch": args.batch, "codec": "-",
            "stage": "bare forward", "seconds": round(t_bare, 4), "tokens_per_s": round(teacher_tokens / t_bare, 1),
            "vs_bare": 0.0, "bytes_per_token": "", "read_MB_per_s": "", "dump_equals_serial": ""}]
    print(f"\nteacher {args.teacher} -> student {args.student} layers, {args.n} examples x ~{args.seq} tokens, "
          f"{name}; shards in {tmp.parent}")
    print(f"{'stage':18s} {'seconds':>9s} {'tokens/s':>11s} {'vs bare':>9s}")
    print(f"{'bare forward':18s} {t_bare:9.3f} {teacher_tokens / t_bare:11.0f} {0:+8.1f}%")

    def run_codec(codec):
        """Every stage but the bare forward with `codec`: prints them, adds their CSV rows to `out`."""
        # as `python -m kvfuse dump --codec` sets its builder up: fp32 KV for a codec, encoded on the device
        builder.storage_dtype = torch.bfloat16 if codec.kind == "bf16" else torch.float32
        builder.encode = None
        bases = None
        if codec.lowrank:
            bases = fit_bases([t for _, t in builder.build(chunks[0])], codec)
        on_device = None if bases is None else {n: replace(b, basis=b.basis.to(device)) for n, b in bases.items()}
        builder.encode = lambda tensors, checks, codec=codec, on_device=on_device: encode_sample(
            tensors, codec, on_device, checks)
        settings = {"bench": "dump"} if codec.kind == "bf16" else {"bench": "dump", "codec": str(codec)}

        def writer(root):
            w = StoreWriter(root, settings, 1)
            if bases is not None:
                w.claim_bases(bases)
            return w

        serial_built = []

        def serial():
            serial_built.clear()
            for chunk in chunks:
                serial_built.extend(builder.build(chunk))
            sync(device)

        parts_s = {"prepare": 0.0, "launch": 0.0, "copy": 0.0, "returns": 0.0}

        def serial_parts():
            for chunk in chunks:
                t0 = time.perf_counter()
                prepared = builder.prepare(chunk)
                t1 = time.perf_counter()
                on_device, checks = builder.launch(prepared)
                returned = time.perf_counter()
                sync(device)
                raise_if_not_finite(checks)     # as `build` does; the kernels are done, so it waits for nothing
                t2 = time.perf_counter()
                [{k: v.cpu() for k, v in t.items()} for _, t in on_device]
                t3 = time.perf_counter()
                for part, seconds in zip(parts_s, (t1 - t0, t2 - t1, t3 - t2, returned - t1)):
                    parts_s[part] += seconds / args.repeats

        tag = str(codec).replace(":", "-").replace("+", "-")
        runs = iter(range(10 ** 6))
        last_built = []   # per dump: seconds until the last batch reached the host (its writes may still run)

        def dump():
            root = tmp / f"{tag}-dump{next(runs):04d}"
            w = writer(root)
            start = time.perf_counter()
            last_built.append(0.0)

            def built(_batch):
                last_built[-1] = time.perf_counter() - start
            dump_shard(builder, examples, args.batch, w, 0, on_batch=built)
            return root

        t_serial = best(serial)
        for _ in range(args.repeats):
            serial_parts()
        serial_writer = writer(tmp / f"{tag}-serial")
        start = time.perf_counter()
        serial_writer.write_shard(0, serial_built)
        t_write = time.perf_counter() - start
        shutil.rmtree(tmp / f"{tag}-serial")
        t_dump = best(dump)
        dumps = sorted(tmp.glob(f"{tag}-dump*"))
        for old in dumps[:-1]:
            shutil.rmtree(old)
        start = time.perf_counter()
        store = TeacherKVStore(dumps[-1])
        t_open = time.perf_counter() - start
        held = [(sid, assemble(t, codec, bases)) for sid, t in serial_built]
        same = len(store) == len(held) and all(
            all(len(parts(store.get(sid)[k])) == len(parts(v)) and
                all(torch.equal(a, b) for a, b in zip(parts(store.get(sid)[k]), parts(v))) for k, v in t.items())
            for sid, t in held)
        student_tokens = sum(int(t["mask"].sum()) for _, t in serial_built)
        bytes_per_token = store.bytes / max(student_tokens, 1)

        def read():
            for i in range(len(store)):
                item = store[i]
                for value in item.values():
                    if torch.is_tensor(value) or is_encoded(value):
                        for p in parts(value):   # touch every byte: the mapping is lazy
                            (p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p).sum()

        t_read = best(read)
        rows = [("serial build", t_serial, teacher_tokens),
                ("  prepare (CPU)", parts_s["prepare"], teacher_tokens),
                ("  launch (device)", parts_s["launch"], teacher_tokens),
                ("    until it returns", parts_s["returns"], teacher_tokens),
                ("  copy to host", parts_s["copy"], teacher_tokens), ("write_shard (held)", t_write, student_tokens),
                ("dump (streamed)", t_dump, teacher_tokens),
                ("  last batch built", statistics.median(last_built[1:]), teacher_tokens),
                ("store read", t_read, student_tokens)]
        print(f"-- codec {codec}: {bytes_per_token:.0f} bytes/token stored, open+verify {t_open:.2f} s; "
              f"streamed shard == serial build bit for bit: {same}")
        for stage, seconds, tokens in rows:
            print(f"{stage:18s} {seconds:9.3f} {tokens / seconds:11.0f} {100 * (seconds / t_bare - 1):+8.1f}%")
            out.append({"device": name, "commit": commit(), "store_dir": str(tmp.parent), "teacher": args.teacher,
                        "student": args.student, "seq": args.seq, "n": args.n, "batch": args.batch,
                        "codec": str(codec), "stage": stage, "seconds": round(seconds, 4),
                        "tokens_per_s": round(tokens / seconds, 1), "vs_bare": round(seconds / t_bare - 1, 4),
                        "bytes_per_token": round(bytes_per_token, 1),
                        "read_MB_per_s": round(store.bytes / 1e6 / t_read, 1), "dump_equals_serial": same})
        shutil.rmtree(dumps[-1])
        return same, (str(codec), bytes_per_token, t_dump)

    results = [run_codec(codec) for codec in codecs]
    summary = [s for _, s in results]
    if len(summary) > 1:
        ref = {c: d for c, _, d in summary}.get("bf16")
        print(f"\n{'codec':18s} {'bytes/token':>11s} {'dump s':>8s} {'vs bare':>9s}" + (" vs bf16" if ref else ""))
        for c, bpt, d in summary:
            print(f"{c:18s} {bpt:11.0f} {d:8.3f} {100 * (d / t_bare - 1):+8.1f}%"
                  + (f" {d / ref:6.2f}x" if ref else ""))
    append_csv(args.csv, out)
    shutil.rmtree(tmp)
    return 0 if all(same for same, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
