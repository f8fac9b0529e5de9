"""Per-layer KV capture at the model's own RoPE application: pre-RoPE keys (after any q/k norm), values, positions,
and the RoPE each layer used (inverse frequencies, attention scaling, rotary dim; NoPE layers).

Why not the cache: the cache holds *post*-RoPE keys, and sliding-window layers keep only the last window of them.

One mechanism for every family whose attention is written the transformers way: while a decoder layer runs,
its modeling module's `apply_rotary_pos_emb` and its attention function (the one `ALL_ATTENTION_FUNCTIONS`
hands out, eager included) are wrapped, so the capture sees
  * the key and query right before rotation — after Qwen3/Gemma's per-head norm, OLMo2's whole-projection norm,
    Phi-3's fused `qkv_proj` split, whatever the family does first — and the cos/sin the rotation used;
  * the key, query and value the attention itself receives.
The pre-RoPE key is the rotation's input, completed from the attention's key where the model rotates only a
slice of each head (Phi and StableLM pass the first `rotary_dim` dims, the rest is concatenated back unrotated).
A layer whose attention never rotated is a NoPE layer (SmolLM3; its attention says `use_rope = 0`, or another
layer of the same model did rotate). The cos/sin are matched to the call of the model's own rotary module that
produced them, which gives the layer's `Rope` (per layer type where the model has several, e.g. Gemma3's local
and global bases; dynamic types as updated by this forward), and they are checked against `rotate`'s own: on a
model's first capture, and again whenever its inv_freq changes (the check waits for the device).

Interleaved-pair RoPE (Cohere: pairs (2i, 2i+1) instead of (i, i + r/2)) is brought to the rotate-half layout by
one permutation of each head's dims, found by probing the model's own `apply_rotary_pos_emb`; keys and queries
are returned permuted (`KVCapture.head_dim_order`), which leaves every query·key product unchanged, so a student
and the losses can work in that order throughout. `KVCapture.post_rope_keys` gives keys in the model's order.

Positions: when no `position_ids` are given, capture derives them from the attention mask the way HF's
`generate` does (`cumsum(mask) - 1`, padding slots set to 1), so a left-padded row gets the same keys as the
same row unpadded. What is returned is what the rotary module actually received.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from kvfuse.align.rope import NOPE, Rope, cos_sin, inv_freq_buffer, rope_from_rotary, rotate

# Families whose keys are not per-head RoPE'd projections of the hidden state: capturing "the key" of a layer
# would not give something rotate/re-phasing/the adapters can treat as such.
_MLA = ("multi-head latent attention: each head's key is decompressed from a shared low-rank latent and "
        "concatenated with one RoPE'd key shared by all heads, not a per-head RoPE'd projection")
_RECURRENT = ("state-space / linear-attention layers keep a recurrent state instead of per-token keys and values, "
              "so those layers have no KV to capture")
UNSUPPORTED_FAMILIES = {
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "deepseek_v32", "longcat_flash", "kimi_linear"), _MLA),
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "zamba", "zamba2", "bamba", "falcon_h1",
                     "granitemoehybrid", "nemotron_h", "qwen3_next", "lfm2", "lfm2_moe", "minimax",
                     "recurrent_gemma", "olmo_hybrid", "bailing_hybrid"), _RECURRENT),
}


@dataclass
class KVCapture:
    """Captured teacher/student KV of one batch.

    keys, values: list over layers of `[B, H_kv, T, D]`, keys *before* RoPE (after any q/k norm), head dims in
        `head_dim_order`.
    positions: `[B, T]` int64, the position ids the model's rotary embedding received.
    rope: list over layers of `Rope(inv_freq [r/2] float32, attention_scaling, rotary_dim r)`; `NOPE` (r = 0) on
        layers without positional rotation. `rotate(keys[l], positions, *rope[l])` gives the layer's RoPE'd keys.
    attention_mask: `[B, T]` bool (all True when none was given).
    layer_types: list over layers, e.g. "full_attention" / "sliding_attention" (from the config).
    head_dim_order: `[D]` permutation applied to each key/query head (None: the model's own order); set for
        interleaved-pair RoPE, which it turns into the rotate-half layout.
    queries: with `with_queries=True`, list over layers of pre-RoPE queries `[B, H_q, T, D]` (same order).
    hidden: with `return_hidden=True`, the decoder's final hidden state `[B, T, hidden]` (after the final norm),
        ready for the LM head.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    rope: list[Rope]
    attention_mask: torch.Tensor
    layer_types: list[str]
    head_dim_order: torch.Tensor | None = None
    queries: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def rotary_dims(self) -> list[int]:
        return [r.rotary_dim for r in self.rope]

    def rope_table(self) -> tuple[torch.Tensor, list[float], list[int]]:
        """Every layer's RoPE as the fused loss takes it: inv_freq `[L, R/2]` float32 (R the largest rotary dim,
        each row zero-padded past its own r_l/2), attention_scaling per layer, rotary_dim per layer."""
        width = max(r.inv_freq.shape[0] for r in self.rope)
        table = torch.zeros(len(self.rope), max(width, 1))
        for l, r in enumerate(self.rope):
            table[l, : r.inv_freq.shape[0]] = r.inv_freq.to(table.device)
        return table, [r.attention_scaling for r in self.rope], [r.rotary_dim for r in self.rope]

    def post_rope_keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s keys after RoPE, in the model's own head-dim order: what its attention (and cache) holds."""
        rotated = rotate(self.keys[layer], self.positions, *self.rope[layer])
        if self.head_dim_order is None:
            return rotated
        return rotated[..., torch.argsort(self.head_dim_order).to(rotated.device)]


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The bare decoder (`model.model`, `model.gpt_neox`, … of a *ForCausalLM) holding the `layers` ModuleList,
    so capture skips the LM head and its huge logits."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED_FAMILIES:
        arch = getattr(config, "architectures", None) or [type(model).__name__]
        raise ValueError(f"capture_kv: {arch} (model_type={model_type!r}) is not supported: "
                         f"{UNSUPPORTED_FAMILIES[model_type]}")
    for base in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        if isinstance(getattr(base, "layers", None), torch.nn.ModuleList):
            return base
    raise ValueError(f"capture_kv: {type(model).__name__} (model_type={model_type!r}) has no decoder with a "
                     "`layers` ModuleList; not a transformers decoder-only model")


def layer_types_of(config) -> list[str]:
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * n


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids for a (left- or right-) padded batch: running count of real tokens, pads at 1."""
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


# ---------------------------------------------------------------------------------------- the wrapped helpers

_ACTIVE = threading.local()     # .record: the _LayerRecord of the decoder layer running in this thread, or None


@dataclass
class _LayerRecord:
    rope: list = field(default_factory=list)         # (q, k, cos, apply_rotary_pos_emb) per rotation call
    attention: list = field(default_factory=list)    # (module, q, k, v) per attention-function call


def _active_record() -> _LayerRecord | None:
    return getattr(_ACTIVE, "record", None)


def _declares_nope(attention: torch.nn.Module) -> bool:
    use_rope = getattr(attention, "use_rope", None)
    return use_rope is not None and not use_rope


def _recorded(function, note):
    """`function`, wrapped so that in a thread that is recording `note(record, *args, **kwargs)` sees each call."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        record = _active_record()
        if record is not None:
            note(record, *args, **kwargs)
        return function(*args, **kwargs)
    return wrapper


def _rope_note(apply_rotary_pos_emb):
    def note(record, q, k, cos, sin, *args, **kwargs):
        record.rope.append((q, k, cos, apply_rotary_pos_emb))
    return note


def _attention_note(record, module, query, key, value, *args, **kwargs):
    record.attention.append((module, query, key, value))


class _AttentionDispatch:
    """Stands in for a modeling module's `ALL_ATTENTION_FUNCTIONS`: hands out the real attention function, wrapped
    so the running layer's record sees the (query, key, value) it receives. Anything else goes to the real one."""

    def __init__(self, real):
        self._real = real

    def get_interface(self, attn_implementation, default):
        return _recorded(self._real.get_interface(attn_implementation, default), _attention_note)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __getitem__(self, key):
        return self._real[key]

    def __contains__(self, key):
        return key in self._real


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_lock(decoder: torch.nn.Module) -> threading.Lock:
    """One capture of a model at a time: the layer forwards and rotary hooks a capture installs belong to the model
    object, so a second thread capturing the same model would run the first one's."""
    with _PATCH_LOCK:
        return _MODEL_LOCKS.setdefault(decoder, threading.Lock())


_PATCH_LOCK = threading.Lock()
_PATCHES: dict[str, list] = {}      # module name -> [users, {global name: original}]


@contextlib.contextmanager
def _wrapped_helpers(modules):
    """Wrap the helpers of `modules` for the duration; reference-counted, so nested and concurrent captures (a
    checkpoint's recompute inside another capture, teacher and student of one family in two threads) share one
    installation. The wrappers pass straight through in any thread that is not recording."""
    with _PATCH_LOCK:
        for module in modules:
            entry = _PATCHES.get(module.__name__)
            if entry is None:
                originals = {"ALL_ATTENTION_FUNCTIONS": module.ALL_ATTENTION_FUNCTIONS}
                module.ALL_ATTENTION_FUNCTIONS = _AttentionDispatch(module.ALL_ATTENTION_FUNCTIONS)
                if hasattr(module, "apply_rotary_pos_emb"):
                    originals["apply_rotary_pos_emb"] = module.apply_rotary_pos_emb
                    module.apply_rotary_pos_emb = _recorded(module.apply_rotary_pos_emb,
                                                            _rope_note(module.apply_rotary_pos_emb))
                entry = _PATCHES[module.__name__] = [0, originals]
            entry[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            for module in modules:
                entry = _PATCHES[module.__name__]
                entry[0] -= 1
                if entry[0] == 0:
                    for name, original in entry[1].items():
                        setattr(module, name, original)
                    del _PATCHES[module.__name__]


@functools.lru_cache(maxsize=None)
def _rotary_order(apply_rotary_pos_emb, width: int, rotary_dim: int) -> tuple[int, ...] | None:
    """How the model pairs the dims it rotates, from one probe of its own `apply_rotary_pos_emb` at angle π/2
    (cos 0, sin 1), where each unit vector e_a of a pair (a, b) turns into +e_b and e_b into −e_a.

    Returns the permutation of the `width` dims the helper receives that lists the pairs' first members, then their
    second members (then the untouched dims): rotate-half's layout. None when that is already the layout."""
    eye = torch.eye(width)[None, None]
    _, turned = apply_rotary_pos_emb(eye, eye.clone(), torch.zeros(1, width, rotary_dim),
                                     torch.ones(1, width, rotary_dim))
    turned = turned[0, 0].round()
    firsts, seconds = [], []
    for a in range(width):
        row = turned[a]
        nonzero = row.nonzero().flatten().tolist()
        if a >= rotary_dim:
            if nonzero != [a] or row[a] != 1:
                break
            continue
        if len(nonzero) != 1:
            break
        b = nonzero[0]
        if row[b] == 1 and b < rotary_dim and turned[b].nonzero().flatten().tolist() == [a] and turned[b, a] == -1:
            firsts.append(a)
            seconds.append(b)
    if len(firsts) * 2 != rotary_dim or len(set(firsts + seconds)) != rotary_dim:
        raise ValueError(f"capture_kv: {apply_rotary_pos_emb.__module__}.apply_rotary_pos_emb does not turn "
                         f"{rotary_dim} dims in pairs (probe at angle pi/2); an unknown rotary layout")
    order = tuple(firsts + seconds + list(range(rotary_dim, width)))
    return None if order == tuple(range(width)) else order


# ---------------------------------------------------------------------------------------------- the recorder

@dataclass
class _LayerRope:
    """How a layer rotated: kept after its forward (its tensors are not: a teacher's queries would pile up)."""

    cos: torch.Tensor | None        # the cos the rotation used; None on a NoPE layer
    order: tuple[int, ...] | None   # see _rotary_order
    attention: type                 # the attention module's class
    declares_nope: bool             # the attention module says it skips RoPE (SmolLM3's `use_rope = 0`)


@dataclass
class _LayerKV:
    key: torch.Tensor
    value: torch.Tensor
    query: torch.Tensor
    rope: _LayerRope


# Rotary tables already compared with `rotate`'s, per rotary module: (layer type, dims order, cos dtype and device,
# scaling) → (weak reference to the inv_freq tensor checked, its version). The comparison reads a device value (on
# the GPU a wait for the forward, once per capture), and what it checks, the module's cos formula for that inv_freq,
# holds until the inv_freq changes: dynamic RoPE types install a new tensor, in-place edits bump the version, and
# either makes the next capture check again.
_ROPE_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Recorder:
    """Records one forward of a decoder: per layer, the pre-RoPE key/query, the value, and the rotary call whose
    cos/sin the layer used. `run_layer` is the unit of recording (and of activation checkpointing)."""

    def __init__(self, model: torch.nn.Module, requires_grad: bool, with_queries: bool, checkpoint: bool):
        self.model = model
        self.decoder = decoder_of(model)
        self.layers = list(self.decoder.layers)
        self.requires_grad, self.with_queries, self.checkpoint = requires_grad, with_queries, checkpoint
        # every modeling module a decoder layer's code comes from that dispatches attention the transformers way
        self.modules = sorted({sys.modules[type(m).__module__] for m in self.layers[0].modules()
                               if hasattr(sys.modules[type(m).__module__], "ALL_ATTENTION_FUNCTIONS")},
                              key=lambda m: m.__name__)
        if not self.modules:
            raise ValueError(f"capture_kv: {type(model).__name__}'s decoder layers do not dispatch attention "
                             "through transformers' ALL_ATTENTION_FUNCTIONS; capture cannot see their keys")
        n = len(self.layers)
        self.kv: list[tuple[torch.Tensor, ...] | None] = [None] * n     # (key, value[, query]) per layer
        self.meta: list[_LayerRope | None] = [None] * n
        self.checked: set = set()       # (id, order) of the rotary outputs already compared with rotate's cos
        # (cos, rope, position_ids, rotary module, layer type) per call of a rotary module
        self.rotary_calls: list[tuple[torch.Tensor, Rope, torch.Tensor, torch.nn.Module, str | None]] = []

    # ------------------------------------------------------------------------------------------ one layer
    @contextlib.contextmanager
    def _recording(self):
        record = _LayerRecord()
        previous = _active_record()
        with _wrapped_helpers(self.modules):
            _ACTIVE.record = record
            try:
                yield record
            finally:
                _ACTIVE.record = previous

    def _resolve(self, i: int, record: _LayerRecord) -> _LayerKV:
        """This layer's pre-RoPE key/query and value from what the wrapped helpers saw."""
        where = f"capture_kv: {type(self.model).__name__} layer {i}"
        if len(record.attention) != 1:
            raise ValueError(f"{where} called the attention function {len(record.attention)} times; capture "
                             "handles decoder layers with exactly one self-attention (not a state-space / "
                             "linear-attention layer, not cross-attention)")
        attention, q_att, k_att, v_att = record.attention[0]
        if k_att.dim() != 4 or v_att.shape[:3] != k_att.shape[:3] or q_att.shape[0::2] != k_att.shape[0::2]:
            raise ValueError(f"{where}: attention received query {tuple(q_att.shape)}, key {tuple(k_att.shape)}, "
                             f"value {tuple(v_att.shape)}; expected [B, H, T, D] with the keys' B, H_kv, T")
        if not record.rope:
            return _LayerKV(k_att, v_att, q_att, _LayerRope(None, None, type(attention), _declares_nope(attention)))
        if len(record.rope) != 1:
            raise ValueError(f"{where} applied RoPE {len(record.rope)} times; expected once")
        q_in, k_in, cos, rope_fn = record.rope[0]
        width, rotary_dim, head_dim = k_in.shape[-1], cos.shape[-1], k_att.shape[-1]
        if k_in.shape[:3] != k_att.shape[:3] or width not in (rotary_dim, head_dim) or rotary_dim > head_dim:
            raise ValueError(f"{where}: RoPE turned keys {tuple(k_in.shape)} with cos {tuple(cos.shape)} but the "
                             f"attention received keys {tuple(k_att.shape)}: the keys are not per-head RoPE'd "
                             "projections (the first rotary_dim dims of each head)")
        key, query = k_in, q_in
        if width < head_dim:        # only the rotary slice went through the helper; the rest passed unrotated
            key = torch.cat((k_in, k_att[..., width:]), dim=-1)
            query = torch.cat((q_in, q_att[..., width:]), dim=-1)
        order = _rotary_order(rope_fn, width, rotary_dim)
        if order is not None:
            order = order + tuple(range(width, head_dim))
        return _LayerKV(key, v_att, query, _LayerRope(cos, order, type(attention), _declares_nope(attention)))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.requires_grad else t.detach()

    def run_layer(self, i: int, forward, *args, **kwargs):
        """Run decoder layer `i` recording; returns (layer output, key, value[, query])."""
        with self._recording() as record:
            out = forward(*args, **kwargs)
        layer = self._resolve(i, record)
        if self.meta[i] is None:
            self.meta[i] = layer.rope
        key, query = layer.key, layer.query
        if layer.rope.order is not None:
            index = torch.tensor(layer.rope.order, device=key.device)
            key, query = key.index_select(-1, index), query.index_select(-1, index)
        tensors = (key, layer.value) + ((query,) if self.with_queries else ())
        return (out, *(self._keep(t) for t in tensors))

    def _checkpointed(self, i: int, layer: torch.nn.Module):
        forward = layer.forward

        def run(hidden, *args, **kwargs):
            out, *tensors = self.run_layer(i, forward, hidden, *args, **kwargs)
            if not torch.is_tensor(out):
                raise TypeError(f"capture_kv(checkpoint=True): decoder layer {i} returned {type(out).__name__}, "
                                "expected the hidden-state tensor (transformers >= 5)")
            return (out, *tensors)

        def forward_with_checkpoint(hidden, *args, **kwargs):
            if not hidden.requires_grad:     # frozen embeddings (LoRA): the checkpoint still needs a graph to replay
                hidden = hidden.detach().requires_grad_()
            # the reentrant form takes no keyword arguments: bind them (masks, RoPE tables; nothing trainable)
            out, *tensors = torch.utils.checkpoint.checkpoint(functools.partial(run, **kwargs), hidden, *args,
                                                              use_reentrant=True)
            self.kv[i] = tuple(tensors)
            return out
        return forward_with_checkpoint

    def _plain(self, i: int, layer: torch.nn.Module):
        forward = layer.forward

        def forward_recorded(*args, **kwargs):
            out, *tensors = self.run_layer(i, forward, *args, **kwargs)
            self.kv[i] = tuple(tensors)
            return out
        return forward_recorded

    # ------------------------------------------------------------------------------------------ rotary calls
    def _rotary_hook(self, module, args, kwargs, output):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        self.rotary_calls.append((output[0], rope_from_rotary(module, layer_type), positions.detach(), module,
                                  layer_type))

    def _rope_of(self, i: int, layer: _LayerRope) -> Rope:
        """The `Rope` of the rotary-module call whose cos layer `i` used, checked against `rotate`'s own cos."""
        if layer.cos is None:
            if layer.declares_nope or layer.attention in {m.attention for m in self.meta if m.cos is not None}:
                return NOPE
            raise ValueError(f"capture_kv: layer {i} of {type(self.model).__name__} never called its modeling "
                             "module's apply_rotary_pos_emb and declares no NoPE layer: its positional encoding "
                             "is one capture does not know")
        matches = [c for c in self.rotary_calls if c[0] is layer.cos] or \
                  [c for c in self.rotary_calls if c[0].shape == layer.cos.shape and torch.equal(c[0], layer.cos)]
        if not matches:
            raise ValueError(f"capture_kv: layer {i}'s RoPE cos/sin do not come from a call of the model's rotary "
                             "embedding module; capture cannot tell which frequencies it used")
        cos, rope, positions, rotary, layer_type = matches[0]
        if rope.rotary_dim != cos.shape[-1]:
            raise ValueError(f"capture_kv: layer {i} rotated {cos.shape[-1]} dims but the rotary module's inv_freq "
                             f"covers {rope.rotary_dim}")
        if (id(cos), layer.order) in self.checked:
            return rope
        buffer = inv_freq_buffer(rotary, layer_type)
        # an inference tensor keeps no version counter, so an in-place edit could not be seen: checked every time
        version = None if buffer.is_inference() else buffer._version
        key = (layer_type, layer.order, cos.dtype, cos.device, rope.attention_scaling)
        seen = _ROPE_CHECKED.get(rotary, {}).get(key)
        if version is not None and seen is not None and seen[0]() is buffer and seen[1] == version:
            self.checked.add((id(cos), layer.order))
            return rope
        expected, _ = cos_sin(cos, positions.to(cos.device).expand(cos.shape[:-1]), rope.inv_freq,
                              rope.attention_scaling)
        got = cos if layer.order is None else cos[..., list(layer.order[:rope.rotary_dim])]
        error = float((got.float() - expected.float()).abs().max())
        # transformers computes the angles in float32 whatever the model's dtype, so a float64 model's cos carries
        # float32 rounding: the tolerance is float32's at least.
        eps = max(torch.finfo(cos.dtype).eps, torch.finfo(torch.float32).eps)
        if error > 4 * eps * max(1.0, abs(rope.attention_scaling)):
            raise ValueError(f"capture_kv: layer {i}'s RoPE cos differs from rotate's for the rotary module's "
                             f"inv_freq/attention_scaling (max error {error:.3g}); the model applies RoPE in a way "
                             "capture does not reproduce")
        self.checked.add((id(cos), layer.order))
        if version is not None:
            _ROPE_CHECKED.setdefault(rotary, {})[key] = (weakref.ref(buffer), version)
        return rope

    # ------------------------------------------------------------------------------------------ the forward
    def forward(self, input_ids, attention_mask, position_ids, grad: bool):
        rotaries = [m for m in self.decoder.modules()
                    if any(name.endswith("inv_freq") for name, _ in m.named_buffers(recurse=False))]
        with _model_lock(self.decoder):
            handles, patched = [], []
            try:
                handles += [m.register_forward_hook(self._rotary_hook, with_kwargs=True) for m in rotaries]
                for i, layer in enumerate(self.layers):
                    layer.forward = (self._checkpointed if self.checkpoint and grad else self._plain)(i, layer)
                    patched.append(layer)     # an instance attribute over the class's forward, removed below
                # held for the whole forward, so each layer's own hold only counts up and down
                with torch.set_grad_enabled(grad), _wrapped_helpers(self.modules):
                    return self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
                for layer in patched:
                    del layer.forward

    def result(self, batch: int, length: int, attention_mask, hidden) -> KVCapture:
        missing = [i for i, kv in enumerate(self.kv) if kv is None]
        if missing:
            raise RuntimeError(f"capture_kv: decoder layers {missing} of {type(self.model).__name__} never ran")
        rope = [self._rope_of(i, layer) for i, layer in enumerate(self.meta)]
        orders = {layer.order for layer in self.meta if layer.cos is not None}
        if len(orders) > 1:
            raise ValueError(f"capture_kv: {type(self.model).__name__}'s layers pair their rotary dims differently")
        order = orders.pop() if orders else None
        if order is not None:       # NoPE layers take the model's order too, so every layer's dims line up
            index = torch.tensor(order)
            for i, layer in enumerate(self.meta):
                if layer.cos is None:
                    self.kv[i] = tuple(t if j == 1 else t.index_select(-1, index.to(t.device))
                                       for j, t in enumerate(self.kv[i]))
        if not self.rotary_calls:
            raise ValueError(f"capture_kv: {type(self.model).__name__} has no rotary embedding module that ran")
        positions = self.rotary_calls[0][2].long().expand(batch, length).clone()
        return KVCapture(
            keys=[kv[0] for kv in self.kv], values=[kv[1] for kv in self.kv], positions=positions, rope=rope,
            attention_mask=attention_mask.bool(), layer_types=layer_types_of(self.model.config),
            head_dim_order=None if order is None else torch.tensor(order),
            queries=[kv[2] for kv in self.kv] if self.with_queries else None,
            hidden=self._keep(hidden) if hidden is not None else None,
        )


def capture_kv(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    requires_grad: bool = False,
    with_queries: bool = False,
    return_hidden: bool = False,
    checkpoint: bool = False,
) -> KVCapture:
    """Run `model` on `input_ids [B, T]` and return every layer's pre-RoPE keys and values at every position.

    position_ids: optional `[B, T]`; default derived from `attention_mask` (see module docstring).
    requires_grad: keep the captured tensors in the autograd graph (a student being trained); otherwise the
    forward runs under `torch.no_grad()` and the tensors are detached (a teacher).
    with_queries / return_hidden: also return pre-RoPE queries (attention-KL) / the final hidden state (CE).
    checkpoint: activation checkpointing per decoder layer that keeps the captured tensors differentiable: each
    layer runs inside a (reentrant) checkpoint that returns its keys, values and queries as outputs next to the
    hidden state, so a loss on the KV alone reaches the weights. HF's own gradient checkpointing cannot be used for
    this: its reentrant form runs the first forward without grad (the captured KV are cut off from the weights) and
    its non-reentrant form fails under ZeRO-3 (partitioned weights during the recompute). Only acts when
    `requires_grad` and grad mode are on; leave the model's own gradient checkpointing off.
    """
    recorder = _Recorder(model, requires_grad, with_queries, checkpoint)
    if input_ids.dim() != 2:
        raise ValueError(f"capture_kv: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("capture_kv: input_ids has zero length")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"capture_kv: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    elif position_ids.shape[-1] != length:
        raise ValueError(f"capture_kv: position_ids shape {tuple(position_ids.shape)} does not match T={length}")
    grad = requires_grad and torch.is_grad_enabled()
    if grad and any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in recorder.layers):
        raise ValueError("capture_kv: the model's own (HF) gradient checkpointing is on; in its reentrant form the "
                         "captured keys and values are cut off from the weights, so a KV loss would never reach the "
                         "student. Turn it off (model.gradient_checkpointing_disable()) and pass checkpoint=True.")
    out = recorder.forward(input_ids, attention_mask, position_ids, grad)
    return recorder.result(batch, length, attention_mask, out.last_hidden_state if return_hidden else None)
