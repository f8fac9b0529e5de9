import math

import pytest

from kvfuse.eval.task_metrics import bleu, exact_match_accuracy, perplexity, rouge_l
from kvfuse.schedule import layer_weights, lr_factor, warm_in


def test_accuracy_and_text_metrics():
    assert exact_match_accuracy(["18", "3.0", None, "1,000"], ["18", "3", "5", "1000"]) == 0.75
    with pytest.raises(ValueError, match="2 predictions for 1"):
        exact_match_accuracy(["1", "2"], ["1"])
    same = ["she sold 16 eggs and made 18 dollars"]
    assert rouge_l(same, same) == pytest.approx(1.0)
    assert bleu(same, same) == pytest.approx(100.0)
    assert 0 < rouge_l(["she sold eggs"], same) < 1
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e4) == math.inf


def test_layer_annealing_shallow_first_then_ramp():
    w = layer_weights(0, 100, 30)
    assert w[:10].eq(1).all() and w[10:].eq(0).all()
    assert layer_weights(29, 100, 30)[10:].eq(0).all()
    mid = layer_weights(40, 100, 30)
    assert 0 < mid[20] < 1 and mid[:10].eq(1).all()
    assert layer_weights(60, 100, 30).eq(1).all()
    assert layer_weights(0, 100, 2)[0] == 1 and layer_weights(0, 100, 2)[1] == 0


def test_warm_in_and_lr():
    assert warm_in(10, 100, 0.0, 0.1, 0.5) == 0.0
    assert warm_in(75, 100, 0.0, 0.1, 0.5) == pytest.approx(0.05)
    assert warm_in(100, 100, 0.0, 0.1, 0.5) == pytest.approx(0.1)
    factors = [lr_factor(s, 100, 0.03) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] < 0.01
