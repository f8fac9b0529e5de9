"""The Triton fused loss as torch.library operators: opcheck, no graph breaks, and a compiled training step
(tiny student + KVDistillLoss, fullgraph=True) equal to the eager one. The kernels run in the interpreter; the
compile backend is aot_eager (Dynamo + AOTAutograd, which is what the custom op must survive; Inductor's
codegen of the surrounding student is not what these tests are about)."""
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvfuse.codecs import encode_int
from kvfuse.kernels import fused_kv_loss_op  # noqa: F401  (registers torch.ops.kvfuse.*)
from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES
from kvfuse.loss import KVDistillLoss, kv_distill_loss, pair_layout_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed=0, L=2, B=2, H_s=2, T=9, D_s=16, heads=((2, 16), (1, 8))):
    g = torch.Generator().manual_seed(seed)
    tk = [torch.randn(L, B, h, T, d, generator=g) for h, d in heads]
    tv = [torch.randn(L, B, h, T, d, generator=g) for h, d in heads]
    wk = [torch.randn(L, h * d, H_s * D_s, generator=g).requires_grad_() for h, d in heads]
    wv = [torch.randn(L, h * d, H_s * D_s, generator=g).requires_grad_() for h, d in heads]
    sk = torch.randn(L, B, H_s, T, D_s, generator=g).requires_grad_()
    sv = torch.randn(L, B, H_s, T, D_s, generator=g).requires_grad_()
    alpha = torch.rand(B, len(heads), generator=g).requires_grad_()
    mask = torch.ones(B, T)
    mask[1, -3:] = 0
    pos = torch.arange(T, dtype=torch.float32).expand(B, T).contiguous()
    invf = 1.0 / (10000 ** (torch.arange(0, D_s, 2).float() / D_s))
    return dict(student_k=sk, student_v=sv, teacher_k=tk, teacher_v=tv, w_k=wk, w_v=wv, alpha=alpha, mask=mask,
                positions=pos, inv_freq=invf)


def test_opcheck_forward_and_backward_ops():
    x = _inputs()
    L, _, H_s, _, D_s = x["student_k"].shape
    wk = [pair_layout_adapter(w, (H_s, D_s), D_s).detach() for w in x["w_k"]]
    wv = [pair_layout_adapter(w, (H_s, D_s), D_s).detach() for w in x["w_v"]]
    # keys of teacher 1 in int4 with per-token scales and offsets (decoded in the kernel); opcheck's schema check
    # cannot read fp8 tensors on the CPU (tests/test_fused_kv_loss_codecs.py covers fp8 through the loss)
    int4 = encode_int(x["teacher_k"][1], "token")
    x["teacher_k"][1] = int4.data
    codec_args = ([0, CODEC_CODES["int4", "token"]], [None, int4.scale], [None, int4.offset], [0, 0], [], [])
    args = (x["student_k"].detach(), x["student_v"].detach(), x["alpha"].detach(), torch.rand(L), x["mask"],
            x["positions"], torch.tensor([D_s, 0], dtype=torch.int32), x["inv_freq"].expand(L, -1),
            torch.tensor([1.0, 1.2]), wk, wv, x["teacher_k"], x["teacher_v"], *codec_args, D_s, 1.0, 0.5, 0.1, True)
    torch.library.opcheck(torch.ops.kvfuse.fused_kv_loss.default, args)
    out = torch.ops.kvfuse.fused_kv_loss(*args)
    assert out[0].shape == () and out[1].shape == (3, L) and out[2].shape == (L,) and out[3].shape == ()
    assert out[4].shape == (L, 2, 9, wk[0].shape[2]) and out[6].shape == x["student_k"].shape
    bwd_args = (torch.tensor(0.7), x["alpha"].detach(), *out[4:], wk, wv, x["teacher_k"], x["teacher_v"],
                *codec_args, True, True, True)
    torch.library.opcheck(torch.ops.kvfuse.fused_kv_loss_backward.default, bwd_args)
    d_alpha, d_sk, d_sv, dwk, dwv = torch.ops.kvfuse.fused_kv_loss_backward(*bwd_args)
    assert torch.allclose(d_sk, 0.7 * out[6]) and torch.allclose(d_sv, 0.7 * out[7])
    assert d_alpha.shape == x["alpha"].shape and [d.shape for d in dwk] == [w.shape for w in wk]


def test_no_graph_breaks():
    x = _inputs()

    def f(student_k, student_v, alpha):
        loss, stats = kv_distill_loss(**dict(x, student_k=student_k, student_v=student_v, alpha=alpha),
                                      attention_scaling=torch.tensor([1.0, 1.1]), backend="triton")
        return loss + stats["cos"].sum()

    explained = torch._dynamo.explain(f)(x["student_k"], x["student_v"], x["alpha"])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_fullgraph_equals_eager():
    x = _inputs(seed=3)

    def f(student_k, alpha):
        return kv_distill_loss(**dict(x, student_k=student_k, alpha=alpha), rotary_dim=[16, 0],
                               backend="triton")[0]

    leaves = [x["student_k"], x["alpha"], *x["w_k"], *x["w_v"]]
    eager = f(x["student_k"], x["alpha"])
    g_eager = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x["student_k"], x["alpha"])
    g_comp = torch.autograd.grad(compiled, leaves)
    assert torch.equal(eager, compiled)
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def _tiny_student():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _record_kv(student) -> dict:
    """Forward hooks (registered outside the compiled step) that keep each layer's k/v projections."""
    rec = {}
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.k_proj.register_forward_hook(lambda m, inp, out, i=i: rec.__setitem__(("k", i), out))
        layer.self_attn.v_proj.register_forward_hook(lambda m, inp, out, i=i: rec.__setitem__(("v", i), out))
    return rec


def _step_loss(student, rec, kv_loss, batch):
    """CE + fused KV loss of one step, student K/V from its own projections, rotated as the model does."""
    out = student(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False)
    B, T = batch["input_ids"].shape
    H, D, L = student.config.num_key_value_heads, student.config.head_dim, student.config.num_hidden_layers
    heads = [rec[("k", i)].view(B, T, H, D).transpose(1, 2) for i in range(L)]
    pos = torch.arange(T).expand(B, T)
    cos, sin = student.model.rotary_emb(heads[0], pos)
    k = torch.stack([apply_rotary_pos_emb(x, x, cos, sin)[1] for x in heads])
    v = torch.stack([rec[("v", i)].view(B, T, H, D).transpose(1, 2) for i in range(L)])
    kv, _ = kv_loss(k, v, batch["teacher_k"], batch["teacher_v"], batch["mask"], pos.float(),
                    student.model.rotary_emb.inv_freq)
    return out.loss + 0.5 * kv


def test_compiled_training_step_equals_eager():
    """torch.compile(fullgraph=True) of a step's loss — student forward, KVDistillLoss (Triton op) — with the
    backward compiled by AOTAutograd (as compiled trainers run it) gives the eager step's loss and gradients."""
    g = torch.Generator().manual_seed(7)
    B, T = 2, 11
    batch = dict(input_ids=torch.randint(0, 64, (B, T), generator=g),
                 teacher_k=[torch.randn(2, B, 2, T, 8, generator=g), torch.randn(2, B, 1, T, 16, generator=g)],
                 teacher_v=[torch.randn(2, B, 2, T, 8, generator=g), torch.randn(2, B, 1, T, 16, generator=g)],
                 mask=torch.ones(B, T))
    batch["mask"][0, :2] = 0
    results = []
    for compiled in (False, True):
        student = _tiny_student()
        kv_loss = KVDistillLoss([(2, 8), (1, 16)], (2, 8), n_layers=2, alpha=[0.6, 0.4], backend="triton")
        step = torch.compile(_step_loss, fullgraph=True, backend="aot_eager") if compiled else _step_loss
        loss = step(student, _record_kv(student), kv_loss, batch)
        loss.backward()
        params = [*student.parameters(), *kv_loss.parameters()]
        assert all(p.grad is not None for p in params)
        results.append((loss, [p.grad.clone() for p in params]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6)
    for a, b in zip(g1, g0):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
