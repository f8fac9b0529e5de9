"""DistillationModel (kvfuse.distill): each term of the objective — KV loss, rationale CE, attention KL — against a
hand computation from the student's own modules on a tiny float64 model, and their sum as the total."""
import math

import pytest
import torch

from kvfuse.distill import DistillationModel, LossWeights, rationale_ce
from kvfuse.fuse.router import FixedRouter
from kvfuse.loss import KVDistillLoss
from kvfuse.models.tiny import tiny_model

ALPHA = [0.7, 0.3]
TEACHER_HEADS = [(1, 8), (2, 16)]       # different from the student's (2, 16): the adapters reshape heads
LAMBDA_K, LAMBDA_V, BETA = 1.0, 0.5, 0.1


def _rotate(y, positions, inv_freq):
    """Rotate-half RoPE of y [B, H, T, D] at positions [B, T]: y·cos(pθ) + rotate_half(y)·sin(pθ)."""
    angle = positions[:, None, :, None].double() * torch.cat([inv_freq, inv_freq]).double()
    half = y.shape[-1] // 2
    return y * angle.cos() + torch.cat([-y[..., half:], y[..., :half]], dim=-1) * angle.sin()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    student = tiny_model("tiny-llama").double()
    L = student.config.num_hidden_layers
    B, T = 2, 7
    input_ids = torch.randint(3, 500, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 5:] = 0                                       # right padding
    positions = (attention_mask.cumsum(1) - 1).clamp_min(0)
    mask = attention_mask.clone()
    mask[:, 0] = 0                                                   # supervised KV tokens
    labels_mask = torch.zeros(B, T, dtype=torch.long)
    labels_mask[0, 3:] = 1
    labels_mask[1, 2:5] = 1                                          # rationale tokens
    teacher_k = [torch.randn(L, B, h, T, d, dtype=torch.float64) for h, d in TEACHER_HEADS]
    teacher_v = [torch.randn(L, B, h, T, d, dtype=torch.float64) for h, d in TEACHER_HEADS]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions, "mask": mask,
             "labels_mask": labels_mask, "teacher_k": teacher_k, "teacher_v": teacher_v}
    init = [(0.2 * torch.randn(L, h * d, 32, dtype=torch.float64), 0.2 * torch.randn(L, h * d, 32,
                                                                                       dtype=torch.float64))
            for h, d in TEACHER_HEADS]
    kv_loss = KVDistillLoss(TEACHER_HEADS, (2, 16), L, init=init, lambda_k=LAMBDA_K, lambda_v=LAMBDA_V, beta=BETA,
                            backend="torch", dtype=torch.float64)
    model = DistillationModel(student, kv_loss, FixedRouter(ALPHA))
    return model, batch, init


def _student_by_hand(model, batch):
    """Per layer: post-RoPE queries [B, H_q, T, D], post-RoPE keys and values [B, H_kv, T, D], from the hidden
    state entering each layer through that layer's own norm and projections."""
    lm = model.student
    with torch.no_grad():
        out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["positions"], output_hidden_states=True)
    inv_freq = lm.model.rotary_emb.inv_freq
    B, T = batch["input_ids"].shape
    per_layer = []
    for l, layer in enumerate(lm.model.layers):
        x = layer.input_layernorm(out.hidden_states[l])
        attn = layer.self_attn
        split = lambda t: t.view(B, T, -1, attn.head_dim).transpose(1, 2)
        with torch.no_grad():
            q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        per_layer.append((_rotate(q, batch["positions"], inv_freq), _rotate(k, batch["positions"], inv_freq), v))
    return per_layer, out.logits, inv_freq


def _fused_by_hand(batch, init, inv_freq, layer):
    """α-weighted teacher K (adapted, then rotated) and V (adapted) at one student layer, token by token."""
    B, T = batch["input_ids"].shape
    k_f = torch.zeros(B, 2, T, 16, dtype=torch.float64)
    v_f = torch.zeros(B, 2, T, 16, dtype=torch.float64)
    for i, (w_k, w_v) in enumerate(init):
        for b in range(B):
            for t in range(T):
                flat_k = batch["teacher_k"][i][layer, b, :, t, :].reshape(-1)   # heads side by side: h·D_i + d
                flat_v = batch["teacher_v"][i][layer, b, :, t, :].reshape(-1)
                k_f[b, :, t] += ALPHA[i] * (flat_k @ w_k[layer]).view(2, 16)
                v_f[b, :, t] += ALPHA[i] * (flat_v @ w_v[layer]).view(2, 16)
    return _rotate(k_f, batch["positions"], inv_freq), v_f


def _kv_loss_by_hand(batch, init, student, inv_freq):
    m = batch["mask"].bool()
    n, H, D = int(m.sum()), 2, 16
    per_layer = []
    for l, (_, k_s, v_s) in enumerate(student):
        k_f, v_f = _fused_by_hand(batch, init, inv_freq, l)
        k_mse = v_mse = cos = 0.0
        for b, t in m.nonzero().tolist():
            k_mse += float((k_s[b, :, t] - k_f[b, :, t]).square().sum()) / (n * H * D)
            v_mse += float((v_s[b, :, t] - v_f[b, :, t]).square().sum()) / (n * H * D)
            for h in range(H):
                ck = torch.nn.functional.cosine_similarity(k_s[b, h, t], k_f[b, h, t], dim=0)
                cv = torch.nn.functional.cosine_similarity(v_s[b, h, t], v_f[b, h, t], dim=0)
                cos += 0.5 * float(ck + cv) / (n * H)
        per_layer.append((k_mse, v_mse, cos))
    loss = sum(LAMBDA_K * k + LAMBDA_V * v + BETA * (1 - c) for k, v, c in per_layer) / len(per_layer)
    return loss, per_layer


def _attention_kl_by_hand(batch, init, student, inv_freq):
    """Mean over layers of: mean over heads and valid queries of KL(softmax(q·k_s/√D) ‖ softmax(q·k_f/√D)),
    causal, over valid keys; query head h reads KV head h // 2 (4 query heads, 2 KV heads)."""
    valid = batch["mask"].bool()
    kls = []
    for l, (q, k_s, _) in enumerate(student):
        k_f, _ = _fused_by_hand(batch, init, inv_freq, l)
        total, count = 0.0, 0
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                for i in range(q.shape[2]):
                    if not valid[b, i]:
                        continue
                    keys = [j for j in range(i + 1) if valid[b, j]]
                    s = torch.stack([q[b, h, i] @ k_s[b, h // 2, j] for j in keys]) / math.sqrt(16)
                    f = torch.stack([q[b, h, i] @ k_f[b, h // 2, j] for j in keys]) / math.sqrt(16)
                    p_s, p_f = s.softmax(0), f.softmax(0)
                    total += float((p_s * (p_s.log() - p_f.log())).sum())
                    count += 1
        kls.append(total / count)
    return sum(kls) / len(kls)


def _ce_by_hand(batch, logits):
    nll = []
    for b, t in batch["labels_mask"].bool().nonzero().tolist():
        if t == 0:
            continue
        nll.append(-float(logits[b, t - 1].log_softmax(-1)[batch["input_ids"][b, t]]))
    return sum(nll) / len(nll)


def test_kv_term_matches_a_hand_computation(setup):
    model, batch, init = setup
    student, _, inv_freq = _student_by_hand(model, batch)
    want, per_layer = _kv_loss_by_hand(batch, init, student, inv_freq)
    total, logs = model(batch)
    assert float(logs["kv_loss"]) == pytest.approx(want, rel=1e-6)
    assert total.item() == pytest.approx(want, rel=1e-6)       # γ = δ = 0: the KV term alone
    assert logs["k_mse"].tolist() == pytest.approx([k for k, _, _ in per_layer], rel=1e-6)
    assert logs["v_mse"].tolist() == pytest.approx([v for _, v, _ in per_layer], rel=1e-6)
    assert logs["cos"].tolist() == pytest.approx([c for _, _, c in per_layer], rel=1e-6)
    assert logs["alpha"].tolist() == [pytest.approx(ALPHA)] * 2
    assert "ce" not in logs and "attn_kl" not in logs


def test_layer_weights_weigh_the_per_layer_terms(setup):
    model, batch, init = setup
    student, _, inv_freq = _student_by_hand(model, batch)
    _, per_layer = _kv_loss_by_hand(batch, init, student, inv_freq)
    w = torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    terms = [LAMBDA_K * k + LAMBDA_V * v + BETA * (1 - c) for k, v, c in per_layer]
    total, _ = model(batch, layer_weights=w)
    assert total.item() == pytest.approx(sum(x * y for x, y in zip(w.tolist(), terms)) / float(w.sum()), rel=1e-6)


def test_ce_term_matches_a_hand_computation(setup):
    model, batch, init = setup
    student, logits, inv_freq = _student_by_hand(model, batch)
    kv, _ = _kv_loss_by_hand(batch, init, student, inv_freq)
    ce = _ce_by_hand(batch, logits)
    total, logs = model(batch, weights=LossWeights(delta=0.25))
    assert float(logs["ce"]) == pytest.approx(ce, rel=1e-6)      # rationale_ce runs in float32
    assert total.item() == pytest.approx(kv + 0.25 * ce, rel=1e-6)
    # the 0/1 integer mask of this batch and collate's bool mask select the same tokens
    for labels_mask in (batch["labels_mask"], batch["labels_mask"].bool()):
        assert float(rationale_ce(logits, batch["input_ids"], labels_mask)) == pytest.approx(ce, rel=1e-6)
    assert float(model.rationale_nll(batch)) == pytest.approx(ce, rel=1e-6)


def test_attention_kl_term_matches_a_hand_computation(setup):
    model, batch, init = setup
    student, _, inv_freq = _student_by_hand(model, batch)
    kv, _ = _kv_loss_by_hand(batch, init, student, inv_freq)
    kl = _attention_kl_by_hand(batch, init, student, inv_freq)
    assert kl > 1e-4                                  # the fused teacher keys do attend differently
    total, logs = model(batch, weights=LossWeights(gamma=0.5))
    assert float(logs["attn_kl"]) == pytest.approx(kl, rel=1e-6)
    assert total.item() == pytest.approx(kv + 0.5 * kl, rel=1e-6)


def test_every_term_reaches_the_student(setup):
    model, batch, _ = setup
    total, _ = model(batch, weights=LossWeights(gamma=0.5, delta=0.25))
    total.backward()
    layer = model.student.model.layers[1].self_attn
    grads = [layer.q_proj.weight.grad, layer.k_proj.weight.grad, layer.v_proj.weight.grad,
             model.kv_loss.w_k[0].grad]
    model.zero_grad()
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_empty_rationale_is_refused():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="no rationale token"):
        rationale_ce(logits, torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 0, 0]]))
