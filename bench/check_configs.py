"""Every tile config and stage count of the fused KV loss's kernels, per teacher codec, checked on a GPU.

Question answered: could the autotuner pick a config whose code is wrong for some teacher encoding? triton 3.6
miscompiled one (the weight gradient over fp8 per-token values once software-pipelined, bench/NOTES.md "Compressed
teachers"), and the CPU tests run the interpreter, which cannot see code generation. Each variant is forced through
the autotuner's own prune hook (so the project's rules still apply; --raw drops those that avoid miscompiles, not
those that keep a config valid for the layout), run three times, and compared
with the torch reference in float64 on the explicitly decoded teachers (rounded to bf16 as the kernels' operands
are): `rel_err` (largest over loss and gradients, relative norm; bf16 outputs sit near 1e-3, a wrong decode at
percents) and `rerun_diff` (largest absolute difference between the three runs: 0 unless the code races).

    PYTHONPATH=. python -m bench.check_configs --codec int4d --out bench/results      # GPU
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources

from bench.bench_fused_loss import CODECS, encoded_teachers, make_inputs
from bench.common import commit
from kvfuse.codecs import decode
from kvfuse.kernels import fused_kv_loss as fk
from kvfuse.loss import kv_distill_loss

WRONG = 1e-2
# Teacher and student (heads, head dim) per shape: the bench's 7B-like teachers and 1.5B-like student, and the
# packaged SmolLM2's own (two prompts of one 3 x 64 model, rows of 173 tokens), where head dim 64, a ragged last
# token tile and C' = 192 showed miscompiles the bench shape did not (bench/NOTES.md "Compressed teachers").
SHAPES = {"bench": dict(teachers=[(4, 128), (8, 128)], student=(2, 128), seq=1024, tokens=4096),
          "packaged": dict(teachers=[(3, 64), (3, 64)], student=(3, 64), seq=173, tokens=4 * 173)}


# The project's own prune rules, kept before `forced` replaces the hooks.
_PROJECT_PRUNE = {id(t): t.early_config_prune for t in (fk._fwd_tuned, fk._dw_tuned)}


def forced(tuned, config: triton.Config, raw: bool) -> dict:
    """Make `tuned` run `config` alone. The project's prune rules see it beside the tuned list and may change its
    stage count or leave it out (then another config runs, and the returned dict's "config" is None); with `raw`
    only the rules that keep a config valid for the launch's layout, not those that avoid miscompiles
    (`fk.AVOID_MISCOMPILES`). Returns a dict whose "config" is, after the next launch, the config that ran."""
    rule = _PROJECT_PRUNE[id(tuned)]
    fk.AVOID_MISCOMPILES = not raw
    ran = {}

    def prune(configs, nargs, **kwargs):
        kept = rule([*configs, config], nargs, **kwargs)
        same = [c for c in kept if (c.kwargs, c.num_warps) == (config.kwargs, config.num_warps)]
        exact = [c for c in same if c.num_stages == config.num_stages]
        ran["config"] = (exact or same or [None])[0]
        return [ran["config"] or kept[0]]
    tuned.early_config_prune = prune
    tuned.cache.clear()
    fk._TUNED.clear()
    return ran


def variants(configs, stages) -> list[triton.Config]:
    """Each config at its own stage count and, if `stages`, at each of those."""
    out = []
    for c in configs:
        for s in dict.fromkeys([c.num_stages, *stages]):
            out.append(triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=s, pre_hook=c.pre_hook))
    return out


def wrong(row: dict) -> bool:
    """A variant that failed, came out off (rel_err above WRONG) or differed between its runs."""
    return bool(row["error"]) or (row["rel_err"] != "" and (float(row["rel_err"]) > WRONG
                                                           or float(row["rerun_diff"]) > 0))


def merge(out: Path, paths: list[Path], log=print) -> list[dict]:
    """The rows of several sweeps' CSVs (one per codec, run in parallel) as one CSV `out`; logs and returns the
    wrong ones."""
    rows = [r for path in paths for r in csv.DictReader(open(path, newline=""))]
    if not rows:
        raise ValueError(f"no variant rows in {', '.join(map(str, paths)) or 'no CSV'}: nothing to merge into {out}")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if wrong(r)]
    log(f"{len(rows)} variants checked, {len(bad)} wrong, racing or failed:")
    for r in bad:
        log("  " + str({k: r[k] for k in ("codec", "kernel", "config", "warps", "stages", "ran", "rel_err", "worst",
                                          "rerun_diff", "error")}))
    return bad


def run(codec: str, shape: str, layers: int, kernels, fwd_stages, dw_stages, raw: bool, out_dir: Path,
        log=print) -> Path:
    torch.manual_seed(0)
    dims = SHAPES[shape]
    tokens, seq = dims["tokens"], dims["seq"]
    x = make_inputs(tokens, T=seq, L=layers, teachers=dims["teachers"], student=dims["student"])
    tk, tv = encoded_teachers(x, codec)
    params = [x["student_k"], x["student_v"], x["alpha"], *x["w_k"], *x["w_v"]]
    names = ["student_k", "student_v", "alpha", *[f"w_k[{i}]" for i in range(len(tk))],
             *[f"w_v[{i}]" for i in range(len(tv))]]
    args = {k: v for k, v in x.items() if k not in ("scaling", "rot")}

    def plain(ts):
        return [decode(t, torch.bfloat16).double() if not isinstance(t, torch.Tensor) else t.double() for t in ts]
    ref_args = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_args.update(student_k=ref_params[0], student_v=ref_params[1], alpha=ref_params[2],
                    w_k=ref_params[3:3 + len(tk)], w_v=ref_params[3 + len(tk):], teacher_k=plain(tk),
                    teacher_v=plain(tv))
    ref_loss = kv_distill_loss(**ref_args, backend="torch")[0]
    want = [ref_loss.detach(), *torch.autograd.grad(ref_loss, ref_params)]

    def once():
        loss = kv_distill_loss(**dict(args, teacher_k=tk, teacher_v=tv), backend="triton", check_finite=False)[0]
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    base_dw = fk._DW_CONFIGS_GPU[0]
    listed = {(str(c.kwargs), c.num_warps, c.num_stages) for c in (*fk._FWD_CONFIGS_GPU, *fk._DW_CONFIGS_GPU)}
    sweeps = [("fwd", c) for c in variants(fk._FWD_CONFIGS_GPU, fwd_stages) if "fwd" in kernels] + \
        [("dw", c) for c in variants(fk._DW_CONFIGS_GPU, dw_stages) if "dw" in kernels]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"check_configs_{codec}_{shape}_{torch.cuda.get_device_name().replace(' ', '_')}.csv"
    fields = ["device", "commit", "shape", "tokens", "seq", "layers", "rules", "codec", "kernel", "config", "warps",
              "stages", "ran", "rel_err", "worst", "rerun_diff", "error"]
    with open(path, "w", newline="") as f:  # a row per variant as it finishes: a sweep cut short keeps its rows
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for kernel, cfg in sweeps:
            ran_fwd = forced(fk._fwd_tuned, cfg if kernel == "fwd" else fk._FWD_CONFIGS_GPU[0], raw)
            ran_dw = forced(fk._dw_tuned, cfg if kernel == "dw" else base_dw, raw)
            row = dict(device=torch.cuda.get_device_name(), commit=commit(), shape=shape, tokens=tokens, seq=seq,
                       layers=layers, rules="raw" if raw else "project", codec=codec, kernel=kernel,
                       config=str(cfg.kwargs), warps=cfg.num_warps, stages=cfg.num_stages,
                       **dict.fromkeys(fields[12:], ""))
            try:
                runs = [once() for _ in range(3)]
                torch.cuda.synchronize()
            except OutOfResources as e:  # a config too big for this GPU is a row, not the end of the sweep
                message = f"OutOfResources: {str(e).splitlines()[0][:120]}"
                if (str(cfg.kwargs), cfg.num_warps, cfg.num_stages) in listed:
                    row["error"] = message               # the autotuner would try it: a failure of the list
                else:                                    # a swept stage count the kernels never launch
                    row["ran"] = f"does not fit at this stage count ({message})"
            else:
                ran = (ran_fwd if kernel == "fwd" else ran_dw)["config"]
                if ran is None:
                    row["ran"] = "left out by the project's rules"
                else:
                    errs = [((g.double() - w_).norm() / w_.norm()).item() for g, w_ in zip(runs[0], want)]
                    worst = max(range(len(errs)), key=errs.__getitem__)
                    rerun = max((a.double() - b.double()).abs().max().item()
                                for r in runs[1:] for a, b in zip(runs[0], r))
                    row.update(ran="as asked" if (ran.kwargs, ran.num_warps, ran.num_stages) ==
                               (cfg.kwargs, cfg.num_warps, cfg.num_stages)
                               else f"{ran.kwargs} warps={ran.num_warps} stages={ran.num_stages}",
                               rel_err=f"{errs[worst]:.3e}", worst=(["loss"] + names)[worst],
                               rerun_diff=f"{rerun:.3e}")
            w.writerow(row)
            f.flush()
            log(", ".join(f"{k}={row[k]}" for k in fields[7:] if row[k] != "") + ("  WRONG" if wrong(row) else ""))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", choices=CODECS)
    p.add_argument("--merge", type=Path, nargs="+", metavar=("OUT", "CSV"),
                   help="no sweep: write the rows of the CSVs after OUT into OUT and list the wrong ones")
    p.add_argument("--shape", choices=sorted(SHAPES), default="bench",
                   help="teacher, student and row shapes (SHAPES): the bench's, or the packaged model's")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kernels", nargs="+", choices=("fwd", "dw"), default=["fwd", "dw"])
    p.add_argument("--fwd-stages", type=int, nargs="*", default=[],
                   help="stage counts tried for each forward tile besides its own")
    p.add_argument("--dw-stages", type=int, nargs="*", default=[1, 2, 3, 4],
                   help="stage counts tried for each weight-gradient tile besides its own")
    p.add_argument("--raw", action="store_true", help="bypass the project's miscompile rules (e.g. fp8 per-token's "
                                                      "one stage), to see whether a newer triton still needs them")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    if args.merge:
        if len(args.merge) < 2:
            p.error("--merge takes OUT and at least one sweep CSV")
        merge(args.merge[0], args.merge[1:])
        return 0
    if args.codec is None:
        p.error("--codec is required for a sweep")
    if not torch.cuda.is_available():
        sys.exit("check_configs needs a CUDA GPU: it checks the code triton generates for it")
    print(run(args.codec, args.shape, args.layers, args.kernels, args.fwd_stages, args.dw_stages, args.raw, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
