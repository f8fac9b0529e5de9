"""Teacher-side KV for a batch of examples (DESIGN.md §3 steps 1–5), one code path for the offline dump and for
online teachers, so both give the same loss.

Per example: every model renders the shared segments (question, rationale) inside its own prompt and template;
tokens map to char spans; each teacher runs once over its rendering with hooks capturing pre-RoPE keys and values
at every position; the IoU alignment matrix A_i [T_s, T_t] mixes teacher time steps into student time steps
(K' = A·K_pre, V' = A·V) and the layer map M_i [L_s, L_t] mixes teacher layers into student layers. The result per
teacher is [L_s, H_t, T_s, D_t], pre-RoPE and still in the teacher's head space (adapters live in the loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from kvfuse.align.layers import layer_map
from kvfuse.align.time import apply_alignment, time_alignment
from kvfuse.align.tokens import token_spans
from kvfuse.data import Example, render
from kvfuse.models.capture import capture_kv


@dataclass(frozen=True)
class AlignmentSettings:
    layer_map: str = "interpolate"
    threshold: float = 0.0
    fallback: str = "nearest"
    trim_whitespace: bool = False


@dataclass
class Teacher:
    name: str
    prompt: str
    model: torch.nn.Module
    tokenizer: Any


@dataclass
class Rendering:
    """One model's view of one example: its text, token ids, char spans and the shared segments' char ranges."""
    text: str
    input_ids: torch.Tensor          # [T] int64
    spans: np.ndarray                # [T, 2] int64
    segments: list[tuple[int, int]]  # shared segments (question, rationale) in `text`
    rationale_mask: torch.Tensor = field(default=None)  # [T] bool: tokens inside the rationale segment


def render_tokens(tokenizer, prompt: str, example: Example, trim_whitespace: bool = False) -> Rendering:
    rendered = render(tokenizer, prompt, example)
    ids, spans = token_spans(tokenizer, rendered.text, trim_whitespace=trim_whitespace,
                             add_special_tokens=rendered.add_special_tokens)
    start, end = rendered.rationale
    rationale = torch.as_tensor((spans[:, 0] >= start) & (spans[:, 1] <= end) & (spans[:, 1] > spans[:, 0]))
    return Rendering(rendered.text, torch.as_tensor(ids, dtype=torch.long), spans, list(rendered.segments),
                     rationale)


class TeacherKVBuilder:
    """Builds {input_ids, positions, mask, labels_mask, teacher{i}/k, teacher{i}/v} per example."""

    def __init__(self, teachers: Sequence[Teacher], student_tokenizer, student_prompt: str, n_student_layers: int,
                 settings: AlignmentSettings = AlignmentSettings(), max_length: int = 512,
                 storage_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if not teachers:
            raise ValueError("TeacherKVBuilder needs at least one teacher")
        self.teachers = list(teachers)
        self.student_tokenizer = student_tokenizer
        self.student_prompt = student_prompt
        self.n_student_layers = n_student_layers
        self.settings = settings
        self.max_length = max_length
        self.storage_dtype = storage_dtype
        self.device = torch.device(device)
        self.layer_maps = [layer_map(t.model.config.num_hidden_layers, n_student_layers, settings.layer_map
                                     ).to(self.device) for t in self.teachers]

    def student_view(self, example: Example) -> Rendering:
        view = render_tokens(self.student_tokenizer, self.student_prompt, example, self.settings.trim_whitespace)
        if len(view.input_ids) > self.max_length:
            raise ValueError(f"example {example.id}: the student sequence has {len(view.input_ids)} tokens, more "
                             f"than max_length={self.max_length}; raise max_length (sequences are never truncated)")
        return view

    def align(self, student: Rendering, teacher: Rendering) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [T_s, T_t] sparse CSR, student rows that found a partner [T_s]) for one example's two renderings."""
        return time_alignment(student.spans, student.segments, teacher.spans, teacher.segments,
                              student_text=student.text, teacher_text=teacher.text,
                              threshold=self.settings.threshold, fallback=self.settings.fallback)

    def teacher_view(self, example: Example, i: int) -> Rendering:
        teacher = self.teachers[i]
        return render_tokens(teacher.tokenizer, teacher.prompt, example, self.settings.trim_whitespace)

    @torch.no_grad()
    def _teacher_kv(self, teacher: Teacher, views: list[Rendering]) -> list[tuple[list, list]]:
        """One batched teacher forward (right padding); per example, per layer (keys, values) [H, T_t, D]."""
        lengths = [len(v.input_ids) for v in views]
        pad_id = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(views), max(lengths)), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, v in enumerate(views):
            ids[b, : lengths[b]] = v.input_ids
            attn[b, : lengths[b]] = 1
        cap = capture_kv(teacher.model, ids.to(self.device), attn.to(self.device))
        return [([k[b, :, : lengths[b]] for k in cap.keys], [v[b, :, : lengths[b]] for v in cap.values])
                for b in range(len(views))]

    def build(self, examples: Sequence[Example]) -> list[tuple[str, dict[str, torch.Tensor]]]:
        if not examples:
            raise ValueError("build() got no examples")
        students = [self.student_view(ex) for ex in examples]
        out = []
        per_teacher = []
        for i, teacher in enumerate(self.teachers):
            views = [self.teacher_view(ex, i) for ex in examples]
            per_teacher.append((views, self._teacher_kv(teacher, views)))
        for b, (example, student) in enumerate(zip(examples, students)):
            T_s = len(student.input_ids)
            mask = torch.ones(T_s, dtype=torch.bool)
            tensors: dict[str, torch.Tensor] = {}
            for i, (teacher, (views, kvs)) in enumerate(zip(self.teachers, per_teacher)):
                A, row_ok = self.align(student, views[b])
                if not bool(row_ok.any()):
                    raise ValueError(f"example {example.id}: no student token aligns with teacher {i} "
                                     f"({teacher.name}); check the tokenizers' offsets and the shared text")
                mask &= row_ok
                keys, values = kvs[b]
                M = self.layer_maps[i]
                # One sparse product over all layers and heads at once ([L_t, H, T_t, D] → [L_t, H, T_s, D]), then
                # the layer mix: [L_s, H, T_s, D]. fp32 until the final cast to the storage dtype.
                for kind, per_layer in (("k", keys), ("v", values)):
                    aligned = apply_alignment(A, torch.stack(per_layer).float())
                    mixed = torch.einsum("st,thnd->shnd", M, aligned)
                    tensors[f"teacher{i}/{kind}"] = mixed.to(self.storage_dtype).cpu()
            if not bool(mask.any()):
                raise ValueError(f"example {example.id}: no student token is aligned with every teacher")
            tensors["input_ids"] = student.input_ids
            tensors["positions"] = torch.arange(T_s, dtype=torch.long)
            tensors["mask"] = mask
            tensors["labels_mask"] = student.rationale_mask
            out.append((str(example.id), tensors))
        return out


def collate(samples: Sequence[dict[str, torch.Tensor]], n_teachers: int, pad_id: int = 0) -> dict[str, Any]:
    """Pad per-sample tensors on the right into a batch; teacher KV becomes [L_s, B, H_t, T, D_t] (kernel layout)."""
    if not samples:
        raise ValueError("collate: empty batch")
    lengths = [len(s["input_ids"]) for s in samples]
    T = max(lengths)
    B = len(samples)
    batch: dict[str, Any] = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "positions": torch.zeros(B, T, dtype=torch.long),
        "mask": torch.zeros(B, T, dtype=torch.bool),
        "labels_mask": torch.zeros(B, T, dtype=torch.bool),
        "ids": [s.get("id") for s in samples],
    }
    for b, s in enumerate(samples):
        n = lengths[b]
        batch["input_ids"][b, :n] = s["input_ids"]
        batch["attention_mask"][b, :n] = 1
        batch["positions"][b, :n] = s["positions"]
        batch["mask"][b, :n] = s["mask"]
        batch["labels_mask"][b, :n] = s["labels_mask"]
    for kind in ("k", "v"):
        batch[f"teacher_{kind}"] = []
        for i in range(n_teachers):
            first = samples[0][f"teacher{i}/{kind}"]
            L, H, _, D = first.shape
            stacked = first.new_zeros(L, B, H, T, D)
            for b, s in enumerate(samples):
                x = s[f"teacher{i}/{kind}"]
                if x.shape[0] != L or x.shape[1] != H or x.shape[3] != D or x.shape[2] != lengths[b]:
                    raise ValueError(f"sample {s.get('id', b)}: teacher{i}/{kind} has shape {tuple(x.shape)}, "
                                     f"expected [{L}, {H}, {lengths[b]}, {D}]")
                stacked[:, b, :, : lengths[b]] = x
            batch[f"teacher_{kind}"].append(stacked)
    return batch
