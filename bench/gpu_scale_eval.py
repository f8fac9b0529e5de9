"""One GPU-scale run's numbers at equal tokens, into `<run>/eval.json`:

    python -m bench.gpu_scale_eval RUN_DIR [--model FOLDER] [--limit N] [--max_new_tokens 256] [--batch_size 512]

- GSM8K accuracy of the trained student (`<run>/student`, written by the trainer's `export_student`) on all 1319
  test questions, greedy, at most `--max_new_tokens` new tokens, the final number extracted as the trainer does
  (`kvfuse.data.extract_final_number`, `kvfuse.eval.task_metrics.exact_match_accuracy`); also on the "clean"
  questions, those no gsm_symbolic template was written from (`kvfuse/data_files/gsm_symbolic.meta.json`);
- from the run's metrics.jsonl: training tokens, tokens/s, peak GPU memory, and at the first and last evaluation the
  rationale perplexity on the held-out items, the train/val gap (of the KV loss and of the rationale CE), and the
  KV CKA to each teacher.

With `--model NAME` (and no run folder of training) it scores that model alone: the untrained student's row.
Generations go to `<run>/gsm8k_generations.jsonl.gz`.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

from kvfuse.data import PROMPTS, extract_final_number, load_gsm8k
from kvfuse.eval.generate import greedy_generate, question_prompts
from kvfuse.eval.task_metrics import exact_match_accuracy
from kvfuse.gsm_symbolic import META_FILE
from kvfuse.models import load

MAX_NEW_TOKENS = 256        # GSM8K's gold rationales are 190 student tokens on average, prompt included


def _events(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _val_summary(event: dict) -> dict:
    out = {"step": event["step"], "val_kv_loss": event["kv_loss"], "train_kv_loss": event["train_kv_loss"],
           "kv_gap": event["gap"], "val_ppl": event["ppl"], "cka_mean": event.get("cka_mean")}
    if "train_ppl" in event:
        out["train_ppl"] = event["train_ppl"]
        out["ce_gap"] = (event["ce"] - event["train_ce"]) / max(abs(event["train_ce"]), 1e-12)
    if "cka" in event:      # [teacher][layer] → per teacher, over layers
        out["cka_per_teacher"] = [sum(layers) / len(layers) for layers in event["cka"]]
    return out


def training_summary(run: Path) -> dict:
    events = _events(run)
    train = [e for e in events if e["split"] == "train"]
    val = [e for e in events if e["split"] == "val"]
    out: dict = {"train_steps": len(train), "train_tokens": sum(e.get("tokens", 0) for e in train)}
    steady = [e["tokens_per_s"] for e in train[2:]] or [e["tokens_per_s"] for e in train]
    if steady:
        # the trainer's tokens_per_s counts supervised (KV-masked) tokens; input tokens per second scale with it
        out["supervised_tokens_per_s"] = statistics.median(steady)
    mem = [e["gpu_mem_gb"] for e in train if "gpu_mem_gb" in e]
    if mem:
        out["gpu_mem_gb"] = max(mem)
    if val:
        out["first_eval"], out["last_eval"] = _val_summary(val[0]), _val_summary(val[-1])
        out["curve"] = [{"step": e["step"], "tokens": sum(t.get("tokens", 0) for t in train if t["step"] <= e["step"]),
                         **_val_summary(e)} for e in val]
    return out


def clean_ids() -> set[str] | None:
    """GSM8K test ids no gsm_symbolic template came from (None when the sidecar is missing)."""
    if not META_FILE.is_file():
        return None
    near = set(json.loads(META_FILE.read_text())["gsm8k_near_template_ids"])
    return {e.id for e in load_gsm8k()} - near


def gsm8k_accuracy(model_name: str, out_dir: Path, limit: int | None, max_new_tokens: int, batch_size: int,
                   prompt: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load(model_name, dtype=dtype, device=device, attn_implementation="sdpa")
    examples = load_gsm8k()[:limit]
    prompts, special = question_prompts(tokenizer, PROMPTS.get(prompt, prompt), [e.question for e in examples])
    t0 = time.perf_counter()
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=special)
    seconds = time.perf_counter() - t0
    predicted = [extract_final_number(g.text) for g in gens]
    gold = [e.answer for e in examples]
    out = {"n": len(examples), "accuracy": exact_match_accuracy(predicted, gold), "max_new_tokens": max_new_tokens,
           "batch_size": batch_size, "cut_at_max_new_tokens": sum(not g.stopped for g in gens) / len(gens),
           "seconds": seconds, "new_tokens_per_s": sum(g.new_tokens for g in gens) / seconds}
    clean = clean_ids()
    if clean is not None:
        keep = [i for i, e in enumerate(examples) if e.id in clean]
        if keep:
            out["n_clean"] = len(keep)
            out["accuracy_clean"] = exact_match_accuracy([predicted[i] for i in keep], [gold[i] for i in keep])
    with gzip.open(out_dir / "gsm8k_generations.jsonl.gz", "wt") as fh:
        for e, g, p in zip(examples, gens, predicted):
            fh.write(json.dumps({"id": e.id, "generated": g.text, "predicted": p, "gold": e.answer}) + "\n")
    return out


def evaluate_run(run: Path, model: str | None = None, limit: int | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 512, extra: dict | None = None) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    model = model or str(run / "student")
    if model == str(run / "student") and not (run / "student" / "config.json").is_file():
        raise FileNotFoundError(f"{run / 'student'} has no trained student: train with --export_student true first")
    result = {"run": run.name, **(extra or {}), **training_summary(run),
              "gsm8k": gsm8k_accuracy(model, run, limit, max_new_tokens, batch_size, "default")}
    if (run / "config.yaml").is_file():
        import yaml

        result["config"] = yaml.safe_load((run / "config.yaml").read_text())
    if "last_eval" in result:
        result["val_ppl"] = result["last_eval"]["val_ppl"]
    tmp = run / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(run / "eval.json")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the run folder (train/main.py's output_dir)")
    parser.add_argument("--model", default=None, help="score this model instead of <run>/student")
    parser.add_argument("--limit", type=int, default=None, help="only the first N GSM8K questions (tests)")
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="cap on generated tokens "
                                                                                   f"(default {MAX_NEW_TOKENS})")
    parser.add_argument("--batch_size", type=int, default=512, help="questions decoded together (default 512)")
    parser.add_argument("--extra", default="{}", help="JSON merged into eval.json (the runner's name, seed, command)")
    args = parser.parse_args(argv)
    result = evaluate_run(args.run, args.model, args.limit, args.max_new_tokens, args.batch_size,
                          json.loads(args.extra))
    g = result["gsm8k"]
    print(f"{args.run}: GSM8K {g['accuracy']:.4f} on {g['n']} ({g['seconds']:.0f} s, "
          f"{g['cut_at_max_new_tokens']:.0%} cut at {g['max_new_tokens']} tokens)"
          + (f", clean {g['accuracy_clean']:.4f} on {g['n_clean']}" if "accuracy_clean" in g else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
