"""`python -m kvfuse dump`: run the teachers once over a dataset and store their aligned KV (DESIGN.md §5).

One invocation writes one shard (`--shard I/N`, one SLURM array task each). Finished, intact shards are skipped
(size and header checked; `--verify` checks every digest) and a damaged one is rewritten, so a re-run after a kill
or a damaged disk redoes only what is missing; settings and fingerprints of the student, teachers and examples are
recorded in the store's manifest (kvfuse.teacher.provenance) and a dump with different settings into the same
directory is refused.
"""
from __future__ import annotations

import argparse
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from kvfuse.data import Example, load_examples, resolve_prompt
from kvfuse.models import load, student_layer_count
from kvfuse.codecs import parse_codec
from kvfuse.teacher.builder import AlignmentSettings, Teacher, TeacherKVBuilder, build_pipelined, max_positions
from kvfuse.teacher.compress import encode_sample, fit_bases, stored_names
from kvfuse.teacher.provenance import dataset_fingerprint, student_fingerprint, teacher_fingerprint
from kvfuse.teacher.store import STORAGE_DTYPES, StoreWriter, iter_shard_indices, parse_shard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teachers", nargs="+", required=True, help="teacher model names (one per teacher)")
    parser.add_argument("--teacher_prompts", nargs="+", required=True,
                        help="one prompt per teacher: a name from kvfuse.data.PROMPTS or literal text")
    parser.add_argument("--student", required=True, help="student model name (its tokenizer and layer count)")
    parser.add_argument("--student_prompt", default="default",
                        help="the student's prompt: a name from kvfuse.data.PROMPTS or literal text (default: default)")
    parser.add_argument("--student_layers", default="all", choices=["all", "every_other"],
                        help="the student's layers the teachers are aligned to; must match the training run's")
    parser.add_argument("--dataset", default="gsm8k", help="gsm8k or a JSONL path")
    parser.add_argument("--n_samples", type=int, default=64,
                        help="training examples to dump (the trainer then uses exactly these; default 64)")
    parser.add_argument("--n_val", type=int, default=0, help="also dump this many validation examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    parser.add_argument("--out", required=True, help="store directory")
    parser.add_argument("--shard", default="0/1", help="I/N: write shard I of N")
    parser.add_argument("--dtype", default="bf16", choices=sorted(STORAGE_DTYPES),
                        help="storage dtype of the teacher KV under codec bf16 (default bf16)")
    parser.add_argument("--codec", default="bf16", type=_codec_arg,
                        help="how the teacher KV is stored: bf16 (plain, in --dtype), fp8 (e4m3 scaled per channel, "
                             "keys and values), fp8z (fp8 with a zero point per channel, the channel's mean: a fifth "
                             "of fp8's key error for 2 more bytes per channel), int8 (asymmetric 8-bit codes, scale "
                             "and offset per channel, keys and values: fp8's bytes, the closest to bf16 in training), "
                             "int4 (asymmetric, keys per channel, values per token, two per byte), int4d (int4 with a "
                             "subtractive dither: same bytes, an error that does not follow the value) or "
                             "lowrank:<r or e<energy>>[+fp8|+int8|+int4|+int4d] (per-layer SVD bases fitted on "
                             "--calib samples, coefficients stored, optionally quantised); default bf16")
    parser.add_argument("--calib", type=int, default=8,
                        help="low-rank codecs: the first N training examples the bases are fitted on (default 8)")
    parser.add_argument("--layer_map", default="interpolate", choices=["interpolate", "round", "ratio_mean"],
                        help="how teacher layers map onto student layers (default interpolate)")
    parser.add_argument("--align_threshold", type=float, default=0.0,
                        help="token-span IoU below which an alignment weight is dropped (default 0)")
    parser.add_argument("--align_fallback", default="nearest", choices=["nearest", "none"],
                        help="a student token with no overlapping teacher token: take the nearest one, or mask it")
    parser.add_argument("--trim_whitespace", action="store_true",
                        help="ignore leading/trailing whitespace of tokens when aligning")
    parser.add_argument("--max_length", type=int, default=512,
                        help="longest rendered sequence; a longer example is an error, never truncated (default 512)")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per teacher forward (default 4)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (a GPU when there is one)")
    parser.add_argument("--allow_long_sequences", action="store_true",
                        help="keep examples longer than a model's max_position_embeddings (logged) instead of failing")
    parser.add_argument("--verify", action="store_true",
                        help="check every digest of an already finished shard, not only its size and header; a "
                             "damaged shard is rewritten")


def _codec_arg(text: str):
    try:
        return parse_codec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def dump_settings(args: argparse.Namespace, teacher_prints: list[str], student_print: str,
                  train: Sequence[Example], val: Sequence[Example]) -> dict:
    """Everything that determines the stored tensors: a store is reusable exactly when these match (see
    kvfuse.teacher.provenance)."""
    return {
        "teachers": list(args.teachers), "teacher_prompts": [resolve_prompt(p) for p in args.teacher_prompts],
        "teacher_fingerprints": teacher_prints, "student": args.student, "student_fingerprint": student_print,
        "student_prompt": resolve_prompt(args.student_prompt), "student_layers": args.student_layers,
        "dataset": args.dataset, "n_samples": args.n_samples, "n_val": args.n_val, "seed": args.seed,
        "examples": {"train": [str(ex.id) for ex in train], "val": [str(ex.id) for ex in val]},
        "dataset_sha256": dataset_fingerprint(train, val),
        "dtype": args.dtype, "codec": str(args.codec), "max_length": args.max_length,
        "allow_long_sequences": args.allow_long_sequences,
        "alignment": asdict(AlignmentSettings(args.layer_map, args.align_threshold, args.align_fallback,
                                              args.trim_whitespace)),
        **({"calib": args.calib} if args.codec.lowrank else {}),
    }


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    if len(args.teacher_prompts) != len(args.teachers):
        raise ValueError(f"--teacher_prompts has {len(args.teacher_prompts)} entries for {len(args.teachers)} "
                         "teachers; give one prompt per teacher")
    index, n_shards = parse_shard(args.shard)
    device = _device(args.device)
    model_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train, val = load_examples(args.dataset, args.n_samples, args.n_val, args.seed)
    examples = train + val
    teachers = []
    for name, prompt in zip(args.teachers, args.teacher_prompts):
        model, tokenizer = load(name, dtype=model_dtype, device=device)
        teachers.append(Teacher(name, resolve_prompt(prompt), model, tokenizer))
    student_model, student_tokenizer = load(args.student, dtype=torch.float32, device="cpu")
    n_student_layers = student_layer_count(student_model, args.student_layers)
    settings = dump_settings(args, [teacher_fingerprint(t.name, t.model) for t in teachers],
                             student_fingerprint(student_tokenizer, student_model.config), train, val)
    student_positions = max_positions(student_model.config)
    del student_model
    writer = StoreWriter(args.out, settings, n_shards)
    codec = args.codec
    bases = writer.existing_bases() if codec.lowrank else None
    reason = writer.unfinished_reason(index, verify=args.verify)
    if reason is None:
        print(f"shard {index}/{n_shards} already finished in {args.out}: nothing to do")
        return 0
    if writer.paths(index)[1].exists():
        print(f"shard {index}/{n_shards} in {args.out} is damaged ({reason}): rewriting it")
    builder = TeacherKVBuilder(
        teachers, student_tokenizer, resolve_prompt(args.student_prompt), n_student_layers,
        AlignmentSettings(args.layer_map, args.align_threshold, args.align_fallback, args.trim_whitespace),
        max_length=args.max_length, device=device,
        storage_dtype=STORAGE_DTYPES[args.dtype] if codec.kind == "bf16" else torch.float32,
        student_max_positions=student_positions, allow_long_sequences=args.allow_long_sequences)
    if codec.lowrank and bases is None:
        if not 1 <= args.calib <= len(train):
            raise ValueError(f"--calib {args.calib}: the bases are fitted on the first N training examples, "
                             f"1 <= N <= {len(train)} (--n_samples)")
        calibration = [t for _, t in builder.build(train[:args.calib])]
        bases = writer.claim_bases(fit_bases(calibration, codec))
        print(f"low-rank bases ({codec}) fitted on {args.calib} examples: ranks per layer "
              + "; ".join(f"{name} {list(b.ranks)} (stored width {b.basis.shape[1]})" for name, b in bases.items()))
    # bases on the teachers' device once, not copied there for every sample
    on_device = None if bases is None else {n: replace(b, basis=b.basis.to(device)) for n, b in bases.items()}
    # under every codec, bf16 too: encode_sample refuses a NaN/Inf in a valid token, naming the example, here rather
    # than in the loader once the whole dump is done; its verdicts are read by build_pipelined's copier (one host read
    # per batch, after the copy waited for the batch anyway), so a bad example stops the dump before its shard is done
    builder.encode = lambda tensors, checks: encode_sample(tensors, codec, on_device, checks)
    mine = [examples[i] for i in iter_shard_indices(len(examples), index, n_shards)]
    start = time.perf_counter()
    tokens = 0
    with tqdm(total=len(mine), desc=f"dump shard {index}/{n_shards}", unit="ex") as bar:
        def progress(built):
            nonlocal tokens
            tokens += sum(int(t["mask"].sum()) for _, t in built)
            bar.update(len(built))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        meta = dump_shard(builder, mine, args.batch_size, writer, index, progress)
    elapsed = time.perf_counter() - start
    print(f"shard {index}/{n_shards}: {len(mine)} examples, {tokens} aligned tokens, {meta['bytes'] / 1e6:.1f} MB, "
          f"{meta['bytes'] / max(tokens, 1):.0f} bytes/token, {tokens / elapsed:.0f} tokens/s")
    return 0


def dump_shard(builder: TeacherKVBuilder, examples: Sequence[Example], batch_size: int, writer: StoreWriter,
               index: int, on_batch: Callable[[list], None] = lambda built: None) -> dict:
    """Teacher KV of `examples` streamed into shard `index`: the pipelined build on this thread, the file writes
    (and their sha256) on another, at most two batches waiting in host memory. Returns the shard's JSON record."""
    names = stored_names(len(builder.teachers), writer.codec)
    with writer.stream_shard(index, [(str(ex.id), names) for ex in examples]) as shard, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-write") as pool:
        pending: deque[Future] = deque()
        for built in build_pipelined(builder, examples, batch_size):
            while len(pending) >= 2:
                pending.popleft().result()
            pending.append(pool.submit(lambda batch=built: [shard.add(sid, t) for sid, t in batch]))
            on_batch(built)
        for write in pending:
            write.result()
    return shard.meta
