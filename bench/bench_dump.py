"""Offline dump throughput vs the bare teacher forward on the same inputs, and store-reader throughput.

  bare      the teacher's decoder forward alone (no hooks), batched and padded as the dump does it
  serial    TeacherKVBuilder.build batch by batch: render + tokenise + forward with capture hooks + IoU alignment
            (K' = A·K) + layer map + cast to the storage dtype + copy to host; split into its parts (prepare on the
            CPU, launch on the device, copy to the host) in a separate pass with a sync after each
  write     StoreWriter.write_shard of the serial build's samples held in memory (the dump before streaming)
  dump      dump_shard, what `python -m kvfuse dump` runs, end to end into a finished (fsynced) shard: the
            pipelined build (next batch's CPU half and last batch's copy into pinned memory overlapped with the
            teacher forward) streamed to the shard file by a writer thread; the shard read back equals the serial
            build bit for bit. "last batch built": when the last batch reached the host (writes may still run)
  read      TeacherKVStore: memory-mapped reads of every sample, checksums verified at open
Target (GPU): dump ≤ 15 % over the bare forward; the reader far above what a training step consumes.
Prints a table; appends CSV rows (device, commit) to bench/results/dump.csv.

    python -m bench.bench_dump                                                             # CPU, SmolLM2
    python -m bench.bench_dump --teacher random:qwen2.5-7b --student random:qwen2.5-1.5b --seq 2048   # GPU
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from bench.common import append_csv, commit, device_name
from kvfuse.data import COT_PROMPT, DEFAULT_PROMPT, Example, shakespeare
from kvfuse.models import load
from kvfuse.teacher.builder import Teacher, TeacherKVBuilder, render_tokens
from kvfuse.teacher.dump import dump_shard
from kvfuse.teacher.store import StoreWriter, TeacherKVStore


def long_examples(tokenizer, n: int, seq: int) -> list[Example]:
    """n examples whose student rendering is about `seq` tokens: Shakespeare passages as 'rationales'."""
    text = " ".join(shakespeare().split())
    probe = text[:20000]
    chars_per_token = len(probe) / len(tokenizer(probe).input_ids)
    size = int(seq * chars_per_token * 0.95)
    examples = []
    for i in range(n):
        start = (i * size) % max(1, len(text) - size - 200)
        examples.append(Example(id=f"play-{i}", question=text[start:start + 200],
                                rationale=text[start + 200:start + 200 + size], answer="0"))
    return examples


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
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
    args = parser.parse_args()
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

    serial_built = []
    chunks = [examples[first:first + args.batch] for first in range(0, len(examples), args.batch)]

    def serial():
        serial_built.clear()
        for chunk in chunks:
            serial_built.extend(builder.build(chunk))
        sync(device)

    parts = {"prepare": 0.0, "launch": 0.0, "copy": 0.0}

    def serial_parts():
        for chunk in chunks:
            t0 = time.perf_counter()
            prepared = builder.prepare(chunk)
            t1 = time.perf_counter()
            on_device = builder.launch(prepared)
            sync(device)
            t2 = time.perf_counter()
            [{k: v.cpu() for k, v in t.items()} for _, t in on_device]
            t3 = time.perf_counter()
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[part] += seconds / args.repeats

    tmp = Path(tempfile.mkdtemp(prefix="kvfuse-bench-dump-", dir=args.store_dir))
    runs = iter(range(10 ** 6))

    last_built = []   # per dump: seconds until the last batch reached the host (its writes may still run)

    def dump():
        root = tmp / f"dump{next(runs)}"
        start = time.perf_counter()
        last_built.append(0.0)

        def built(_batch):
            last_built[-1] = time.perf_counter() - start
        dump_shard(builder, examples, args.batch, StoreWriter(root, {"bench": "dump"}, 1), 0, on_batch=built)
        return root

    def best(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_bare, t_serial = best(bare), best(serial)
    for _ in range(args.repeats):
        serial_parts()
    start = time.perf_counter()
    meta = StoreWriter(tmp / "serial", {"bench": "dump"}, 1).write_shard(0, serial_built)
    t_write = time.perf_counter() - start
    shutil.rmtree(tmp / "serial")
    t_dump = best(dump)
    for old in sorted(tmp.glob("dump*"))[:-1]:
        shutil.rmtree(old)
    start = time.perf_counter()
    store = TeacherKVStore(sorted(tmp.glob("dump*"))[-1])
    t_open = time.perf_counter() - start
    same = len(store) == len(serial_built) and all(
        all(torch.equal(store.get(sid)[k], t[k]) for k in t) for sid, t in serial_built)
    student_tokens = sum(int(t["mask"].sum()) for _, t in serial_built)

    def read():
        for i in range(len(store)):
            item = store[i]
            for key, value in item.items():
                if torch.is_tensor(value):
                    value.sum()     # touch every byte: the mapping is lazy

    t_read = best(read)
    name = device_name(device)
    rows = [("bare forward", t_bare, teacher_tokens), ("serial build", t_serial, teacher_tokens),
            ("  prepare (CPU)", parts["prepare"], teacher_tokens),
            ("  launch (device)", parts["launch"], teacher_tokens),
            ("  copy to host", parts["copy"], teacher_tokens), ("write_shard (held)", t_write, student_tokens),
            ("dump (streamed)", t_dump, teacher_tokens),
            ("  last batch built", statistics.median(last_built[1:]), teacher_tokens),
            ("store read", t_read, student_tokens)]
    print(f"\nteacher {args.teacher} -> student {args.student} layers, {args.n} examples x ~{args.seq} tokens, "
          f"{name}; {meta['bytes'] / max(student_tokens, 1):.0f} bytes/token stored, open+verify {t_open:.2f} s; "
          f"streamed shard == serial build bit for bit: {same}; shards in {tmp.parent}")
    print(f"{'stage':18s} {'seconds':>9s} {'tokens/s':>11s} {'vs bare':>9s}")
    out = []
    for stage, seconds, tokens in rows:
        print(f"{stage:18s} {seconds:9.3f} {tokens / seconds:11.0f} {100 * (seconds / t_bare - 1):+8.1f}%")
        out.append({"device": name, "commit": commit(), "store_dir": str(tmp.parent), "teacher": args.teacher,
                    "student": args.student,
                    "seq": args.seq, "n": args.n, "batch": args.batch, "stage": stage, "seconds": round(seconds, 4),
                    "tokens_per_s": round(tokens / seconds, 1), "vs_bare": round(seconds / t_bare - 1, 4),
                    "bytes_per_token": round(meta["bytes"] / max(student_tokens, 1), 1),
                    "read_MB_per_s": round(meta["bytes"] / 1e6 / t_read, 1), "dump_equals_serial": same})
    append_csv(args.csv, out)
    shutil.rmtree(tmp)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
