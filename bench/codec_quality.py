"""Store codecs on the packaged real models: what each codec loses, what it saves, and what the student learns.

  reconstruct  teacher KV of GSM8K items aligned to the SmolLM2 student (fp32, as the dump builds it) under two
               setups: "smollm2" (SmolLM2 under the Phase-1 default and CoT prompts, the Phase-1/2 teachers) and
               "gemma3" (Gemma3-270M under the CoT prompt as teacher). Low-rank bases are fitted on the first
               --calib items and measured on the next --eval items (held out). Per codec, teacher, K|V and layer:
               relative MSE Σ(x̂ − x)² / Σx² and the mean cosine between x̂ and x per token (over H·D), valid tokens
               only; bytes per token of a stored sample (every tensor: ids, masks, KV, scales) per codec and its
               ratio to bf16. Writes bench/results/codec_reconstruction.csv, codec_bytes.csv, codec_quality.png.
  distill      one teacher pass per phase (`python -m kvfuse dump --dtype fp32`; Phase 1: its 10 train / 4 val
               items; Phase 2 here: 16 train / 4 val at an effective batch of 2, 8 steps), re-encoded into one
               store per codec exactly as `dump --codec` encodes (the dump builds fp32 and encodes each sample; here
               the fp32 store's samples are encoded: the same tensors without running the teachers again; the
               settings are those the dump records), then trains Phase 1 and
               Phase 2 from each under every seed (`train/main.py --teacher_store S --eval_teacher_store <bf16
               store>`: the validation KV loss and KV CKA are measured against the bf16 teacher KV, not the
               compressed one), and writes bench/results/codec_distill.csv (one row per run) and a table relative to
               the bf16 run of the same seed. Runs land in runs/codecs/ (checkpoints are not kept).

  gaps         each codec's Phase-1 gap to the bf16 store against the run's length, from distill tables of runs
               of several lengths (`distill --items`): bench/results/codec_gap_by_length.png.

  halves       Phase 1 (3 seeds) from two bf16 stores in which only the keys, or only the values, are int4 round
               trips, beside the bf16 and int4 stores: which half carries int4's gap; and the relative MSE other key
               codes (5 bits, 32/64-token groups, MSE-best clipping) reach on the same store. Writes
               bench/results/codec_int4_halves.csv and codec_int4_keys.csv.

    python -m bench.codec_quality reconstruct
    python -m bench.codec_quality distill --phases 1 2 --seeds 0 1 2 --codecs bf16 fp8 int4 lowrank:64+int4
    python -m bench.codec_quality halves
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import commit, replace_csv
from kvfuse.codecs import decode, parse_codec
from kvfuse.data import load_examples, resolve_prompt
from kvfuse.models import load
from kvfuse.teacher.builder import AlignmentSettings, Teacher, TeacherKVBuilder
from kvfuse.teacher.compress import assemble, encode_sample, fit_bases, stored_names
from kvfuse.teacher.store import StoreWriter, TeacherKVStore

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STUDENT = "smollm2-135m-instruct"
SETUPS = {"smollm2": [("smollm2-135m-instruct", "default"), ("smollm2-135m-instruct", "cot")],
          "gemma3": [("gemma3-270m", "cot")]}
CODECS = ["fp8", "fp8z", "int8", "int4", "int4d", "lowrank:e0.99", "lowrank:e0.99+fp8", "lowrank:e0.99+int4",
          "lowrank:32+int4", "lowrank:48+int4", "lowrank:64+int4", "lowrank:80+int4", "lowrank:112+int4",
          "lowrank:144+int4"]
# Phase 2 at a size two shared CPU cores finish in minutes: 16 train / 4 val items, effective batch 2, 1 epoch.
PHASE_RUNS = {1: {"n_samples": 10, "n_val": 4, "train": []},
              2: {"n_samples": 16, "n_val": 4, "train": ["--epochs", "1", "--effective_batch", "2"]}}


def _stored_bytes(named: dict) -> int:
    return sum(t.numel() * t.element_size() for t in named.values())


@torch.no_grad()
def reconstruct(args) -> int:
    _, student_tok = load(STUDENT)
    student_layers = 30
    examples, _ = load_examples("gsm8k", args.calib + args.eval, 0, seed=0)
    rows, byte_rows = [], []
    for setup, spec in SETUPS.items():
        teachers = [Teacher(name, resolve_prompt(prompt), *load(name)) for name, prompt in spec]
        builder = TeacherKVBuilder(teachers, student_tok, resolve_prompt("default"), student_layers,
                                   AlignmentSettings(), max_length=1024, storage_dtype=torch.float32)
        start = time.perf_counter()
        built = [t for _, t in builder.build(examples)]
        print(f"{setup}: built {len(built)} items in {time.perf_counter() - start:.0f} s")
        calib, held_out = built[:args.calib], built[args.calib:]
        tokens = sum(int(s["mask"].sum()) for s in held_out)
        plain = [{n: (t.to(torch.bfloat16) if n.startswith("teacher") else t) for n, t in s.items()} for s in held_out]
        bf16_bytes = sum(_stored_bytes(s) for s in plain)
        bf16_kv = sum(_stored_bytes({n: t for n, t in s.items() if n.startswith("teacher")}) for s in plain)
        byte_rows.append({"setup": setup, "codec": "bf16", "bytes_per_token": bf16_bytes / tokens,
                          "ratio_vs_bf16": 1.0, "kv_bytes_per_token": bf16_kv / tokens, "kv_ratio_vs_bf16": 1.0,
                          "bases_bytes": 0, "ranks": "", "k_rel_mse": 0.0, "v_rel_mse": 0.0, "k_cos": 1.0,
                          "v_cos": 1.0, "commit": commit()})
        for name in args.codecs:
            codec = parse_codec(name)
            width = {n: t.shape[1] * t.shape[3] for n, t in built[0].items() if n.startswith("teacher")}
            if codec.lowrank and codec.rank is not None and codec.rank >= min(width.values()):
                continue          # not low rank for this teacher
            bases = fit_bases(calib, codec) if codec.lowrank else None
            err = {}   # (entry, layer) -> [Σ(x̂−x)², Σx², Σcos, n]
            stored = kv_stored = 0
            for sample in held_out:
                named = encode_sample(sample, codec, bases)
                stored += _stored_bytes(named)
                kv_stored += _stored_bytes({n: t for n, t in named.items() if n.startswith("teacher")})
                got = assemble(named, codec, bases)
                m = sample["mask"]
                for entry in [n for n in sample if n.startswith("teacher")]:
                    x = sample[entry][:, :, m]                               # [L, H, n, D]
                    xh = decode(got[entry])[:, :, m]
                    f, fh = x.transpose(1, 2).flatten(2), xh.transpose(1, 2).flatten(2)   # [L, n, H·D]
                    cos = torch.nn.functional.cosine_similarity(fh, f, dim=-1, eps=1e-12)
                    for l in range(x.shape[0]):
                        acc = err.setdefault((entry, l), [0.0, 0.0, 0.0, 0])
                        acc[0] += float((fh[l] - f[l]).double().square().sum())
                        acc[1] += float(f[l].double().square().sum())
                        acc[2] += float(cos[l].double().sum())
                        acc[3] += cos.shape[1]
            per_kind = {"k": [], "v": []}
            for (entry, l), (se, ss, cs, n) in sorted(err.items()):
                teacher, kind = entry.split("/")
                rel, cos = se / max(ss, 1e-30), cs / max(n, 1)
                per_kind[kind].append((rel, cos))
                rows.append({"setup": setup, "codec": name, "teacher": teacher, "kind": kind, "layer": l,
                             "rel_mse": rel, "cosine": cos, "commit": commit()})
            bases_bytes = 0 if bases is None else sum(b.basis.numel() * 4 for b in bases.values())
            ranks = "" if bases is None else json.dumps({n: list(b.ranks) for n, b in bases.items()})
            byte_rows.append({
                "setup": setup, "codec": name, "bytes_per_token": stored / tokens,
                "ratio_vs_bf16": stored / bf16_bytes, "kv_bytes_per_token": kv_stored / tokens,
                "kv_ratio_vs_bf16": kv_stored / bf16_kv, "bases_bytes": bases_bytes, "ranks": ranks,
                "k_rel_mse": statistics.fmean(r for r, _ in per_kind["k"]),
                "v_rel_mse": statistics.fmean(r for r, _ in per_kind["v"]),
                "k_cos": statistics.fmean(c for _, c in per_kind["k"]),
                "v_cos": statistics.fmean(c for _, c in per_kind["v"]), "commit": commit()})
            b = byte_rows[-1]
            print(f"  {setup:8s} {name:20s} {b['bytes_per_token']:9.0f} B/token ({b['ratio_vs_bf16']:.3f}× bf16; KV "
                  f"{b['kv_ratio_vs_bf16']:.3f}×)  rel MSE K {b['k_rel_mse']:.2e} V {b['v_rel_mse']:.2e}  cos K "
                  f"{b['k_cos']:.5f} V {b['v_cos']:.5f}")
        del teachers, builder
    replace_csv(RESULTS / "codec_reconstruction.csv", rows)
    replace_csv(RESULTS / "codec_bytes.csv", byte_rows)
    plot(rows, byte_rows, RESULTS / "codec_quality.png")
    return 0


def codec_colours(codecs) -> dict:
    """One colour per codec (in first-seen order) for every panel of a figure: tab20's, since tab10 repeats after ten
    codecs and the reconstruction study draws fourteen."""
    from matplotlib import colormaps
    palette = colormaps["tab20"].colors
    return {codec: palette[i % len(palette)] for i, codec in enumerate(dict.fromkeys(codecs))}


def plot(rows, byte_rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(SETUPS)
    colours = codec_colours(row["codec"] for row in rows)
    fig, axes = plt.subplots(len(setups), 3, figsize=(17, 4.6 * len(setups)), squeeze=False)
    for r, setup in enumerate(setups):
        for c, kind in enumerate(("k", "v")):
            ax = axes[r][c]
            for codec in dict.fromkeys(row["codec"] for row in rows if row["setup"] == setup):
                mine = [row for row in rows if row["setup"] == setup and row["codec"] == codec and row["kind"] == kind
                        and row["teacher"] == "teacher0"]
                ax.semilogy([row["layer"] for row in mine], [max(row["rel_mse"], 1e-12) for row in mine],
                            label=codec, marker="." if codec.startswith("lowrank") else "o", ms=3,
                            color=colours[codec])
            ax.set_title(f"{setup}: {'keys (pre-RoPE)' if kind == 'k' else 'values'}, teacher 0")
            ax.set_xlabel("student layer")
            ax.set_ylabel("relative MSE (held-out items)")
            ax.grid(alpha=0.3)
        ax = axes[r][2]
        for b in byte_rows:
            if b["setup"] == setup and b["codec"] != "bf16":
                mse = (b["k_rel_mse"] + b["v_rel_mse"]) / 2
                ax.loglog(b["ratio_vs_bf16"], mse, "o", color=colours.get(b["codec"]))
                ax.annotate(b["codec"], (b["ratio_vs_bf16"], mse), fontsize=7)
        ax.axvline(0.125, ls="--", c="grey")
        ax.set_title(f"{setup}: mean relative MSE vs store size")
        ax.set_xlabel("bytes per token / bf16's")
        ax.set_ylabel("relative MSE, mean of K and V over layers")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def gaps(args) -> int:
    """Each codec's Phase-1 gap to the bf16 store against the run's length: one point per seed and run length (from
    the distill tables given, each row a run: phase, codec, seed, steps, val_kv_last, and where not on the CPU in
    fp32 its device and student dtype), the mean joined by a line per codec and setting."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for path in args.csv:
        with open(path, newline="") as fh:
            table = csv.DictReader(fh)
            missing = {"phase", "codec", "seed", "steps", "val_kv_last"} - set(table.fieldnames or ())
            if missing:
                raise SystemExit(f"{path}: not a distill table, no column {', '.join(sorted(missing))}")
            runs += [dict(r, setting=f"{r['device']}, {r['student_dtype']} student" if r.get("device")
                          else "CPU, fp32 student") for r in table if r["phase"] == "1"]
    base = {(r["setting"], r["steps"], r["seed"]): float(r["val_kv_last"]) for r in runs if r["codec"] == "bf16"}
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in runs:
        key = (r["setting"], r["steps"], r["seed"])
        if r["codec"] in args.codecs and r["codec"] != "bf16" and key in base:
            gap = 100 * (float(r["val_kv_last"]) / base[key] - 1)
            curves.setdefault((r["codec"], r["setting"]), {}).setdefault(int(r["steps"]), []).append(gap)
    if not curves:
        raise SystemExit(f"no Phase-1 run of {', '.join(args.codecs)} in {', '.join(args.csv)} has a bf16 run of its "
                         "setting, length and seed to compare with")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {codec: f"C{i}" for i, codec in enumerate(args.codecs)}
    settings = sorted({setting for _, setting in curves})
    for (codec, setting), per_len in sorted(curves.items()):
        steps = sorted(per_len)
        style = dict(color=colours[codec], ls="-" if settings.index(setting) == 0 else ":",
                     marker="os^"[settings.index(setting) % 3])
        ax.plot(steps, [statistics.fmean(per_len[n]) for n in steps], label=f"{codec} ({setting})", **style)
        for n in steps:
            ax.scatter([n] * len(per_len[n]), per_len[n], s=12, color=colours[codec], alpha=0.5)
        print(f"  {codec:6s} {setting:28s} " + ", ".join(
            f"{n} steps {statistics.fmean(per_len[n]):+.2f} % (seeds {len(per_len[n])})" for n in steps))
    ax.axhline(2, ls="--", c="grey", label="target: within 2 %")
    ax.axhline(0, c="black", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("Phase-1 training steps (= train items, batch 1)")
    ax.set_ylabel("final val KV loss vs the bf16 store, %")
    ax.set_title(args.title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


def _slug(codec: str) -> str:
    return codec.replace(":", "_").replace("+", "_").replace(".", "_")


def _run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # train/main.py picks DeepSpeed's accelerator from its device
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def reencode(source: Path, target: Path, codec_name: str, calib: int) -> None:
    """The fp32 store `source` as `python -m kvfuse dump --codec codec_name` would have written it (one shard)."""
    src = TeacherKVStore(source)
    codec = parse_codec(codec_name)
    settings = dict(src.settings, codec=str(codec), dtype="bf16")        # the dump's defaults besides --codec
    if codec.lowrank:
        settings["calib"] = calib
    writer = StoreWriter(target, settings, 1)
    n_teachers = len(settings["teachers"])

    def plain(sample):
        return {n: t for n, t in sample.items() if n != "id"}
    bases = None
    if codec.lowrank:
        train_ids = settings["examples"]["train"][:calib]
        bases = writer.claim_bases(fit_bases([plain(src.get(i)) for i in train_ids], codec))
    samples = []
    for i in range(len(src)):
        sample = plain(src[i])
        if codec.kind == "bf16":
            named = {n: (t.to(torch.bfloat16) if n.startswith("teacher") else t) for n, t in sample.items()}
        else:
            named = encode_sample(sample, codec, bases)
        assert sorted(named) == sorted(stored_names(n_teachers, codec))
        samples.append((src.sample_ids[i], named))
    writer.write_shard(0, samples)


def _size(phase: int, items) -> dict:
    """The phase's run size: PHASE_RUNS, or `items` = (train, val) items in its place."""
    size = dict(PHASE_RUNS[phase])
    if items:
        size.update(n_samples=items[0], n_val=items[1])
    return size


def _prepare(out: Path, phase: int, codecs, calib: int, items=None) -> dict[str, Path]:
    """The phase's fp32 teacher pass (dumped once) and one store per codec re-encoded from it."""
    size = _size(phase, items)
    fp32 = out / f"store-p{phase}-fp32"
    if not (fp32 / "shard-00000-of-00001.json").exists():
        print(f"dump phase {phase} (fp32) -> {fp32}", flush=True)
        _run([sys.executable, "-m", "kvfuse", "dump", "--teachers", STUDENT, STUDENT, "--teacher_prompts",
              "default", "cot", "--student", STUDENT, "--n_samples", str(size["n_samples"]), "--n_val",
              str(size["n_val"]), "--seed", "0", "--dtype", "fp32", "--out", str(fp32)],
             out / f"dump-p{phase}-fp32.log")
    stores = {"fp32": fp32}
    for codec in codecs:
        store = out / f"store-p{phase}-{_slug(codec)}"
        stores[codec] = store
        if not (store / "shard-00000-of-00001.json").exists():
            print(f"encode phase {phase} {codec} -> {store}", flush=True)
            reencode(fp32, store, codec, calib)
    return stores


def _train(out: Path, phase: int, seed: int, label: str, store: Path, bf16_store: Path, items=None) -> Path:
    """One training run from `store`, validated against the bf16 store's teacher KV; skipped when it finished."""
    run = out / f"p{phase}-{_slug(label)}-seed{seed}"
    if not (run / "report.html").exists():
        print(f"train phase {phase} {label} seed {seed} -> {run}", flush=True)
        start = time.perf_counter()
        _run([sys.executable, "train/main.py", "--phase", str(phase), "--seed", str(seed),
              "--teacher_store", str(store), "--eval_teacher_store", str(bf16_store),
              "--output_dir", str(run), "--save_every", "0", "--eval_every", "100", "--n_generate", "0",
              *_size(phase, items)["train"]], out / f"{run.name}.log")
        (run / "commit.txt").write_text(commit())  # the code the run trained with, for the table
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return run


def _val_kv(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == "val"]


def distill(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for phase in args.phases:
        stores = _prepare(out, phase, args.codecs, args.calib, args.items)
        for seed in args.seeds:
            for codec in args.train or args.codecs:
                _train(out, phase, seed, codec, stores[codec], stores["bf16"], args.items)
    return summarise(args)


def _rewritten_bf16_store(source: Path, target: Path, rewrite) -> None:
    """The fp32 store `source` as a bf16 store (one shard) whose teacher entries are those of `rewrite(sample, plain)`
    ({name: tensor}), the others `plain`, all in bf16: sample is the fp32 source sample, plain its entries as the
    bf16 codec encodes them (masked tokens as zeros, finite check)."""
    src = TeacherKVStore(source)
    writer = StoreWriter(target, dict(src.settings, codec="bf16", dtype="bf16"), 1)
    samples = []
    for i in range(len(src)):
        sample = {n: t for n, t in src[i].items() if n != "id"}
        plain = encode_sample(sample, parse_codec("bf16"))
        named = {**plain, **rewrite(sample, plain)}
        samples.append((src.sample_ids[i], {name: decode(t).to(torch.bfloat16) if name.startswith("teacher") else t
                                            for name, t in named.items()}))
    writer.write_shard(0, samples)


def int4_half_store(source: Path, target: Path, kind: str) -> None:
    """The fp32 store `source` as a bf16 store in which one half of every teacher entry, keys (kind "k") or values
    ("v"), holds the bf16 value of its int4 round trip (as `dump --codec int4` encodes it) and the other half is
    plain bf16: a store whose only int4 error is in that half."""
    int4 = parse_codec("int4")

    def rewrite(sample, plain):
        rounded = assemble(encode_sample(sample, int4), int4)
        return {name: rounded[name] for name in plain if name.startswith("teacher") and name.endswith("/" + kind)}
    _rewritten_bf16_store(source, target, rewrite)


def _rounded(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """x on the asymmetric `bits`-bit grid from lo to hi (round to nearest), decoded."""
    levels = 2 ** bits - 1
    s = ((hi - lo) / levels).clamp_min(1e-12)
    return torch.round((x - lo) / s).clamp(0, levels) * s + lo


def _per_channel(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """x [..., n tokens, D] round-tripped through a `bits`-bit code with one scale and offset per channel."""
    return _rounded(x, x.amin(-2, keepdim=True), x.amax(-2, keepdim=True), bits)


def int_round_trip_store(source: Path, target: Path, bits: int) -> None:
    """The fp32 store `source` as a bf16 store whose teacher keys and values hold their round trip through a
    `bits`-bit integer code with one scale and offset per (layer, head, channel) over the sample's valid tokens (the
    layout of per-channel fp8 and int4 keys): what an integer codec of that width would teach, before any kernel
    decodes it. Masked tokens stay zeros."""
    def rewrite(sample, plain):
        valid = sample["mask"].bool()
        out = {}
        for name in plain:
            if name.startswith("teacher"):
                x = sample[name].float()
                out[name] = torch.zeros_like(x)
                out[name][..., valid, :] = _per_channel(x[..., valid, :], bits)
        return out
    _rewritten_bf16_store(source, target, rewrite)


def round_trip(args) -> int:
    """Phase 1 from a `bits`-bit per-channel integer round-trip store beside the bf16 runs of the same folder and size
    (`distill --items`): the gap an integer codec of that width would leave."""
    out = Path(args.out)
    stores = _prepare(out, 1, ["bf16"], args.calib, args.items)
    label = f"int{args.bits}-roundtrip"
    store = out / f"store-p1-{label}"
    if not (store / "shard-00000-of-00001.json").exists():
        print(f"build {store.name}", flush=True)
        int_round_trip_store(stores["fp32"], store, args.bits)
    rows = []
    for seed in args.seeds:
        for key, path in (("bf16", stores["bf16"]), (label, store)):
            last = _val_kv(_train(out, 1, seed, key, path, stores["bf16"], args.items))[-1]
            rows.append({"phase": 1, "codec": key, "seed": seed, "steps": last["step"],
                         "val_kv_last": last["kv_loss"], "commit": commit()})
    base = {r["seed"]: r["val_kv_last"] for r in rows if r["codec"] == "bf16"}
    for r in rows:
        r["vs_bf16_pct"] = 100 * (r["val_kv_last"] / base[r["seed"]] - 1)
    path = RESULTS / "codec_{}_{}.csv".format(label.replace("-", "_"), "x".join(map(str, args.items or ("preset",))))
    replace_csv(path, rows)
    gaps_ = [r["vs_bf16_pct"] for r in rows if r["codec"] == label]
    print(f"  {label}: {statistics.fmean(gaps_):+.2f} % ({', '.join(f'{g:+.2f}' for g in gaps_)}); wrote {path}")
    return 0


def _int4_key_variants(store: Path) -> list[dict]:
    """Relative and absolute (per element) MSE of per-channel asymmetric keys (valid tokens of the store's samples)
    under variants of the int4 code: what a different grouping, clipping or width would buy the keys; and, for
    scale, the codec's own int4 values (per token)."""
    def token_groups(x, g):
        return torch.cat([_per_channel(x[..., a:a + g, :]) for a in range(0, x.shape[-2], g)], -2)

    def best_clip(x):
        lo, hi = x.amin(-2, keepdim=True), x.amax(-2, keepdim=True)
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        best = err = None
        for c in [1 - 0.03 * j for j in range(16)]:
            y = _rounded(x, mid - c * half, mid + c * half)
            e = (y - x).square().sum(-2, keepdim=True)
            best = y if best is None else torch.where(e < err, y, best)
            err = e if err is None else torch.minimum(e, err)
        return best

    def per_token(x):
        return _rounded(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))

    variants = {("k", "int4 per channel (the codec)"): _per_channel,
                ("k", "5 bits per channel"): lambda x: _per_channel(x, 5),
                ("k", "int4, 64-token groups"): lambda x: token_groups(x, 64),
                ("k", "int4, 32-token groups"): lambda x: token_groups(x, 32),
                ("k", "int4, MSE-best clip of 16"): best_clip, ("v", "int4 per token (the codec)"): per_token}
    src = TeacherKVStore(store)
    err = dict.fromkeys(variants, 0.0)
    energy, count = {"k": 0.0, "v": 0.0}, {"k": 0, "v": 0}
    for i in range(len(src)):
        sample = src[i]
        valid = sample["mask"].bool()
        for name, t in sample.items():
            if not name.startswith("teacher"):
                continue
            kind = name.rsplit("/", 1)[1]
            x = t.float()[:, :, valid]                             # [L, H, n, D]
            energy[kind] += float(x.double().square().sum())
            count[kind] += x.numel()
            for (half, label), fn in variants.items():
                if half == kind:
                    err[(half, label)] += float((fn(x) - x).double().square().sum())
    return [{"half": half, "variant": label, "rel_mse": e / energy[half], "abs_mse": e / count[half],
             "commit": commit()} for (half, label), e in err.items()]


def halves(args) -> int:
    """Phase 1 from int4 keys with bf16 values, and from bf16 keys with int4 values, against bf16 and int4: which
    half carries int4's gap; then what other key codes would lose on the same store (int4 values beside them)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stores = _prepare(out, 1, ["bf16", "int4"], args.calib)
    for kind in ("k", "v"):
        stores[f"int4-{kind}"] = out / f"store-p1-int4-{kind}-only"
        if not (stores[f"int4-{kind}"] / "shard-00000-of-00001.json").exists():
            print(f"build {stores[f'int4-{kind}'].name}", flush=True)
            int4_half_store(stores["fp32"], stores[f"int4-{kind}"], kind)
    labels = {"bf16": "bf16", "int4": "int4 (keys and values)", "int4-k": "int4 keys, bf16 values",
              "int4-v": "bf16 keys, int4 values"}
    rows = []
    for seed in args.seeds:
        for key, label in labels.items():
            run = _train(out, 1, seed, key, stores[key], stores["bf16"])
            rows.append({"phase": 1, "store": label, "seed": seed, "val_kv_last": _val_kv(run)[-1]["kv_loss"],
                         "commit": commit()})
    base = {r["seed"]: r["val_kv_last"] for r in rows if r["store"] == "bf16"}
    for r in rows:
        r["vs_bf16_pct"] = 100 * (r["val_kv_last"] / base[r["seed"]] - 1)
    keys = _int4_key_variants(stores["fp32"])
    for path, table in ((RESULTS / "codec_int4_halves.csv", rows), (RESULTS / "codec_int4_keys.csv", keys)):
        replace_csv(path, table)
        print(f"wrote {path}")
    for label in labels.values():
        gaps = [r["vs_bf16_pct"] for r in rows if r["store"] == label]
        print(f"  {label:24s} {statistics.fmean(gaps):+6.2f} % ({', '.join(f'{g:+.2f}' for g in gaps)})")
    for k in keys:
        print(f"  {'keys' if k['half'] == 'k' else 'values'}, {k['variant']:30s} relative MSE {k['rel_mse']:.2e}, "
              f"per element {k['abs_mse']:.2e}")
    return 0


def _store_bytes_per_token(store: Path) -> float:
    """The shard file's bytes per valid token (a low-rank store's bases file is paid once, not per token)."""
    meta = json.loads((store / "shard-00000-of-00001.json").read_text())
    return meta["bytes"] / meta["valid_tokens"]


def _table_rows(path: Path) -> dict[tuple, dict]:
    """A distill table's rows by (phase, codec, seed), numbers as floats; empty when there is no table."""
    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    numeric = ("phase", "seed", "steps")
    return {(int(r["phase"]), r["codec"], int(r["seed"])):
            {k: int(v) if k in numeric else v if k in ("codec", "commit") else float(v) for k, v in r.items()}
            for r in rows}


def _older_code(run_commit: str, row_commit: str) -> bool:
    """True when `run_commit` is a strict ancestor of `row_commit` in this repository's history (the run trained with
    older code than the table's row); False when either is unknown to git or they are not so related."""
    if run_commit == row_commit or "unknown" in (run_commit, row_commit):
        return False
    res = subprocess.run(["git", "merge-base", "--is-ancestor", run_commit, row_commit], cwd=ROOT,
                         capture_output=True, text=True)
    return res.returncode == 0


def summarise(args) -> int:
    """The distill table from the runs in --out, merged into the table already there: a finished run's row is
    (re)computed, with the commit it trained with (`commit.txt`; runs from before it keep their row's commit when
    their result is unchanged, else "unknown"); every other row of the table stays as it was, so a table is never
    narrowed to the runs that happen to be in one folder. A run that trained with older code than the table's row
    (its commit an ancestor of the row's) and gives another result leaves the row as it is, and says so: an old
    folder must not replace a newer reference run."""
    out = Path(args.out)
    path = RESULTS / ("codec_distill.csv" if not args.items else "codec_distill_{}x{}.csv".format(*args.items))
    table = _table_rows(path)
    for phase in args.phases:
        for seed in args.seeds:
            for codec in args.codecs:
                run = out / f"p{phase}-{_slug(codec)}-seed{seed}"
                key = (phase, codec, seed)
                if not (run / "report.html").exists():
                    print(f"(no finished run {run.name}: {'its row kept' if key in table else 'left out'})")
                    continue
                val = _val_kv(run)
                store = out / f"store-p{phase}-{_slug(codec)}"
                row = {"phase": phase, "codec": codec, "seed": seed, "steps": val[-1]["step"],
                       "val_kv_first": val[0]["kv_loss"], "val_kv_last": val[-1]["kv_loss"],
                       "cka_last": val[-1]["cka_mean"], "store_bytes_per_token": _store_bytes_per_token(store)}
                stamp = run / "commit.txt"
                before = table.get(key, {})
                row["commit"] = (stamp.read_text().strip() if stamp.exists() else before["commit"]
                                 if before.get("val_kv_last") == row["val_kv_last"] else "unknown")
                if before.get("val_kv_last", row["val_kv_last"]) != row["val_kv_last"] \
                        and _older_code(row["commit"], before["commit"]):
                    print(f"(kept the table's row for {run.name}, trained at {before['commit']}: the run in the "
                          f"folder trained with older code, {row['commit']}, val KV {row['val_kv_last']:.6f} "
                          f"against {before['val_kv_last']:.6f})")
                    continue
                table[key] = row
    rows = [table[k] for k in sorted(table, key=lambda k: (k[0], k[2]))]
    replace_csv(path, rows)
    print(f"{'phase':>5s} {'codec':20s} {'val KV loss (3 seeds)':>24s} {'vs bf16, per seed':>28s} "
          f"{'KV CKA':>16s} {'store B/token':>14s}")
    for phase in args.phases:
        base = {r["seed"]: r for r in rows if r["phase"] == phase and r["codec"] == "bf16"}
        for codec in args.codecs:
            mine = [r for r in rows if r["phase"] == phase and r["codec"] == codec and r["seed"] in base]
            if not mine:
                continue
            last = [r["val_kv_last"] for r in mine]
            rel = [100 * (r["val_kv_last"] / base[r["seed"]]["val_kv_last"] - 1) for r in mine]
            cka = [r["cka_last"] for r in mine]
            sd = statistics.stdev if len(last) > 1 else (lambda _: 0.0)
            print(f"{phase:5d} {codec:20s} {statistics.fmean(last):.6f} ± {sd(last):.6f} "
                  f"{statistics.fmean(rel):+7.2f} % ({', '.join(f'{x:+.2f}' for x in rel)}) "
                  f"{statistics.fmean(cka):.5f} ± {sd(cka):.5f} {mine[0]['store_bytes_per_token']:14.0f}")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="per-layer reconstruction error and bytes per token of each codec")
    rec.add_argument("--codecs", nargs="+", default=CODECS)
    rec.add_argument("--calib", type=int, default=8, help="items the low-rank bases are fitted on (default 8)")
    rec.add_argument("--eval", type=int, default=8, help="held-out items measured (default 8)")
    for name in ("distill", "summarise"):
        dis = sub.add_parser(name, help="Phase 1/2 trained from each codec's store vs the bf16 store"
                             if name == "distill" else "the distill table again from finished runs")
        dis.add_argument("--codecs", nargs="+", default=["bf16", "fp8", "int4", "lowrank:64+int4"],
                         help="codecs to compare; bf16 (the reference) must be among them")
        dis.add_argument("--phases", nargs="+", type=int, default=[1, 2], choices=sorted(PHASE_RUNS))
        dis.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        dis.add_argument("--train", nargs="+", help="train only these of --codecs (another process trains the rest; "
                         "their runs must exist before the table is made)")
        dis.add_argument("--calib", type=int, default=8, help="items the low-rank bases are fitted on (default 8)")
        dis.add_argument("--items", nargs=2, type=int, metavar=("TRAIN", "VAL"),
                         help="train and validation items in place of the phase's CPU-sized defaults (give its own "
                              "--out: stores and runs of one size per folder); the table goes to "
                              "codec_distill_<TRAIN>x<VAL>.csv")
        dis.add_argument("--out", default=str(ROOT / "runs" / "codecs"))
    gap = sub.add_parser("gaps", help="plot each codec's Phase-1 gap to the bf16 store against the run length, from "
                         "distill tables")
    gap.add_argument("--csv", nargs="+", required=True, help="distill tables (codec_distill*.csv)")
    gap.add_argument("--codecs", nargs="+", default=["fp8", "fp8z", "int8", "int4", "int4d"])
    gap.add_argument("--title", default="Phase 1: the codec's gap as the student converges")
    gap.add_argument("--out", default=str(RESULTS / "codec_gap_by_length.png"))
    rt = sub.add_parser("roundtrip", help="Phase 1 from a per-channel integer round-trip store of --bits beside the "
                        "bf16 runs")
    rt.add_argument("--bits", type=int, default=8)
    rt.add_argument("--items", nargs=2, type=int, metavar=("TRAIN", "VAL"))
    rt.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    rt.add_argument("--calib", type=int, default=8, help=argparse.SUPPRESS)
    rt.add_argument("--out", default=str(ROOT / "runs" / "codecs"))
    hal = sub.add_parser("halves", help="Phase 1 from int4 keys only and from int4 values only; other key codes' "
                         "error on the same store")
    hal.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    hal.add_argument("--calib", type=int, default=8, help=argparse.SUPPRESS)
    hal.add_argument("--out", default=str(ROOT / "runs" / "codecs"))
    args = parser.parse_args(argv)
    if getattr(args, "items", None) and min(args.items) < 1:
        parser.error(f"--items needs at least one train and one validation item, got {args.items[0]} {args.items[1]}")
    if args.command == "roundtrip" and not 2 <= args.bits <= 16:
        parser.error(f"--bits must be 2..16 (a grid of 2^bits levels per channel), got {args.bits}")
    if args.command in ("distill", "summarise") and "bf16" not in args.codecs:
        parser.error("--codecs must include bf16, the reference the others are compared with")
    return {"reconstruct": reconstruct, "distill": distill, "summarise": summarise, "halves": halves,
            "gaps": gaps, "roundtrip": round_trip}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
