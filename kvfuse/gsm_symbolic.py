"""The GSM-style training set: reasoning-gym's `gsm_symbolic` problems with worked rationales, filtered, shipped as
`kvfuse/data_files/gsm_symbolic.jsonl.gz` (loaded by `kvfuse.data.load_examples("gsm_symbolic", ...)`).

    python -m kvfuse.gsm_symbolic --n 7000 --seed 0      # needs reasoning-gym (scripts/setup_env.sh installs it)

Generated here, once, deterministically (reasoning-gym's generators are seeded per item), rather than on the GPU
machine: the wheel pulls a dozen dependencies the GPU image lacks, and the file is small enough to travel with the
repository (about 1 MB gzipped).

Each item gives a question, an answer and `answer_cot`, a worked rationale ending in `#### <answer>`. Kept as
`Example(question, rationale, answer)` with the rationale the text before `####`, like GSM8K's. Dropped (counted in
the sidecar `gsm_symbolic.meta.json`): a rationale without `####` or whose final number differs from the answer, an
answer that is not a number, a calculation `a op b = c` in the rationale that does not hold, a degenerate `N=N`
(a template's formatting remnant), a duplicate question, and any question equal to a GSM8K test question after
normalisation (GSM8K test is the evaluation set).

GSM-Symbolic's templates were written from GSM8K *test* problems (new names and numbers, same story). So beyond
exact overlap the sidecar lists the GSM8K test items nearest to each template (number-masked word Jaccard): an
evaluation can report accuracy on all 1319 items and on the items no template came from.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import re
from collections import Counter
from pathlib import Path

from kvfuse.data import Example, load_gsm8k, normalize_number

DATA_DIR = Path(__file__).resolve().parent / "data_files"
DATA_FILE = DATA_DIR / "gsm_symbolic.jsonl.gz"
META_FILE = DATA_DIR / "gsm_symbolic.meta.json"
REASONING_GYM_VERSION = "0.1.25"
# reasoning-gym appends this to every question; GSM8K's questions do not have it, and the student is evaluated on
# GSM8K, so it is removed.
_SUFFIX = " Give the result as your final answer. Do not include units."
# Jaccard of number-masked word sets above which a GSM8K test question counts as a template's source.
NEAR_TEMPLATE_JACCARD = 0.5

_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
# a calculation written out: operands and operators, "=", a result ("160-48=112", "35 × 3 = 105")
_CALC = re.compile(r"((?:\d+(?:\.\d+)?\s*[-+*/×÷x]\s*)+\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?(?:/\d+)?)(%?)")
_TRIVIAL = re.compile(r"(\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)")
# text ending in an operator, maybe followed by a unit word ("100 questions x "): a match right after it is only the
# tail of a longer calculation written with units, which cannot be checked on its own
_OPERAND_BEFORE = re.compile(r"(?:[-+*/×÷]|\bx)\s*(?:[A-Za-z$%/]+\s*)?$")


def normalise_question(text: str) -> str:
    """Lower case, reasoning-gym's suffix removed, words and numbers only: the key of the overlap check."""
    return " ".join(_WORD.findall(text.replace(_SUFFIX, "").lower()))


def _masked_words(text: str) -> frozenset[str]:
    return frozenset("#" if w[0].isdigit() else w for w in _WORD.findall(text.replace(_SUFFIX, "").lower()))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(len(a | b), 1)


def _calculation_holds(expr: str, result: str, percent: bool = False) -> bool:
    """Whether `expr` = `result` (a number, a fraction "1/4", or a percentage) up to the result's rounding;
    "10÷1/2" mixes two division signs whose precedence the author meant loosely: taken as true."""
    if "÷" in expr and "/" in expr:
        return True
    if "/" in result:
        numerator, denominator = result.split("/")
        return _calculation_holds(f"{expr} * {denominator}", numerator, percent)
    tokens = re.findall(r"\d+(?:\.\d+)?|[-+*/×÷x]", expr)
    python = " ".join({"×": "*", "x": "*", "÷": "/"}.get(t, t) for t in tokens)
    try:
        value = eval(python, {"__builtins__": {}}, {})  # digits and + - * / only (the regex above admits no more)
    except (ZeroDivisionError, SyntaxError):
        return False
    # a result written with d decimals may be rounded to them ("10 / 3 = 3.33")
    decimals = len(result.split(".")[1]) if "." in result else 0
    value = 100 * value if percent else value
    return abs(value - float(result)) <= 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(value))


def malformed_reason(item: dict) -> str | None:
    """Why a reasoning-gym item is not a usable training example (None: it is)."""
    cot = item.get("metadata", {}).get("answer_cot")
    if not isinstance(cot, str) or "####" not in cot:
        return "no '####' in the rationale"
    rationale, final = cot.rsplit("####", 1)
    try:
        answer = normalize_number(str(item["answer"]))
        final = normalize_number(final)
    except ValueError:
        return "answer is not a number"
    if final != answer:
        return "the rationale's final number is not the answer"
    if not rationale.strip() or not item["question"].strip():
        return "empty question or rationale"
    for m in _TRIVIAL.finditer(rationale):
        if m.group(1) == m.group(2) and not _OPERAND_BEFORE.search(rationale[:m.start()]):
            return "degenerate N=N in the rationale"
    for m in _CALC.finditer(rationale):
        expr, result, percent = m.groups()
        if _OPERAND_BEFORE.search(rationale[:m.start()]):
            continue
        if not _calculation_holds(expr, result, percent == "%"):
            return "a calculation in the rationale does not hold"
    return None


def to_example(item: dict, index: int) -> Example:
    rationale = item["metadata"]["answer_cot"].rsplit("####", 1)[0].rstrip()
    return Example(id=f"gsm_symbolic-{index}", question=item["question"].replace(_SUFFIX, "").strip(),
                   rationale=rationale, answer=normalize_number(str(item["answer"])))


def filter_items(items, gsm8k: list[Example], n: int) -> tuple[list[tuple[int, Example]], Counter]:
    """The first `n` usable items as (template id, Example), and the count of each reason an item was dropped."""
    test_keys = {normalise_question(e.question) for e in gsm8k}
    seen: set[str] = set()
    kept, dropped = [], Counter()
    for index, (template, item) in enumerate(items):
        reason = malformed_reason(item)
        key = normalise_question(item["question"])
        if reason is None and key in test_keys:
            reason = "equal to a GSM8K test question"
        if reason is None and key in seen:
            reason = "duplicate question"
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(key)
        kept.append((template, to_example(item, index)))
        if len(kept) == n:
            break
    return kept, dropped


def near_template_sources(kept: list[tuple[int, Example]], gsm8k: list[Example]) -> dict[int, tuple[str, float]]:
    """Per template id, the GSM8K test item whose question is most like the template's (its first kept item)."""
    test = [(e.id, _masked_words(e.question)) for e in gsm8k]
    out = {}
    for template, example in kept:
        if template in out:
            continue
        words = _masked_words(example.question)
        best = max(test, key=lambda t: _jaccard(words, t[1]))
        out[template] = (best[0], round(_jaccard(words, best[1]), 3))
    return out


def generate(n: int, seed: int, candidates: int) -> tuple[list[tuple[int, Example]], dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=candidates, seed=seed)
    items = ((dataset.task_indices[i], dataset[i]) for i in range(candidates))
    gsm8k = load_gsm8k()
    kept, dropped = filter_items(items, gsm8k, n)
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} usable items among {candidates} candidates; raise --candidates")
    sources = near_template_sources(kept, gsm8k)
    near = sorted({gid for gid, score in sources.values() if score >= NEAR_TEMPLATE_JACCARD})
    meta = {"reasoning_gym": importlib.metadata.version("reasoning-gym"), "seed": seed, "items": len(kept),
            "candidates_read": sum(dropped.values()) + len(kept), "dropped": dict(sorted(dropped.items())),
            "exact_overlap_with_gsm8k_test": 0, "near_template_jaccard": NEAR_TEMPLATE_JACCARD,
            "template_nearest_gsm8k": {str(t): list(v) for t, v in sorted(sources.items())},
            "gsm8k_near_template_ids": near}
    return kept, meta


def write(kept: list[tuple[int, Example]], meta: dict, data_file: Path = DATA_FILE,
          meta_file: Path = META_FILE) -> None:
    data_file.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same items give the same bytes
    with gzip.GzipFile(data_file, "wb", mtime=0) as fh:
        for template, e in kept:
            fh.write((json.dumps({"id": e.id, "template": template, "question": e.question,
                                  "rationale": e.rationale, "answer": e.answer}) + "\n").encode())
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=7000, help="usable items to keep (default 7000)")
    parser.add_argument("--seed", type=int, default=0, help="reasoning-gym dataset seed (default 0)")
    parser.add_argument("--candidates", type=int, default=10000, help="items generated at most (default 10000)")
    args = parser.parse_args(argv)
    kept, meta = generate(args.n, args.seed, args.candidates)
    write(kept, meta)
    print(f"{len(kept)} items into {DATA_FILE} ({DATA_FILE.stat().st_size / 1e6:.2f} MB); dropped "
          f"{meta['dropped']}; {len(meta['gsm8k_near_template_ids'])} GSM8K test items are a template's source")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
