"""Task metrics (docs/PLAN.md §8): perplexity on gold rationales, GSM8K final-answer accuracy, ROUGE-L and BLEU."""
from __future__ import annotations

import math
from typing import Sequence


def perplexity(mean_nll: float) -> float:
    """exp of the mean token negative log-likelihood; capped so a diverged model reports inf, not an overflow."""
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def exact_match_accuracy(predicted: Sequence[str | None], gold: Sequence[str]) -> float:
    """Share of predictions whose extracted final number equals the gold number (numerically)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold answers")
    if not gold:
        raise ValueError("no examples to score")
    hits = sum(1 for p, g in zip(predicted, gold) if p is not None and _same_number(p, g))
    return hits / len(gold)


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a.replace(",", "")), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a.strip() == b.strip()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, with stemming)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many, non-zero predictions and references ({len(predictions)} vs "
                         f"{len(references)})")
    from rouge_score import rouge_scorer  # imported here: training without generation metrics does not need it

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0..100."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many, non-zero predictions and references ({len(predictions)} vs "
                         f"{len(references)})")
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
