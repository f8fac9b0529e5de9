"""Teacher-side KV for a batch of examples (DESIGN.md §3 steps 1–5), one code path for the offline dump and for
online teachers, so both give the same loss.

Per example: every model renders the shared segments (question, rationale) inside its own prompt and template;
tokens map to char spans; each teacher runs once over its rendering with hooks capturing pre-RoPE keys and values
at every position; the IoU alignment matrix A_i [T_s, T_t] mixes teacher time steps into student time steps
(K' = A·K_pre, V' = A·V) and the layer map M_i [L_s, L_t] mixes teacher layers into student layers. The result per
teacher is [L_s, H_t, T_s, D_t], pre-RoPE and still in the teacher's head space (adapters live in the loss).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from kvfuse.align.layers import layer_map
from kvfuse.align.time import apply_alignment, time_alignment
from kvfuse.align.tokens import token_spans
from kvfuse.codecs import FiniteCheck, is_encoded, raise_if_not_finite, stack_samples
from kvfuse.data import Example, render
from kvfuse.models.capture import capture_kv

log = logging.getLogger(__name__)


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


@dataclass
class PreparedBatch:
    examples: list[Example]
    students: list[Rendering]
    teacher_views: list[list[Rendering]]   # [teacher][example]
    alignments: list[list[torch.Tensor]]   # [teacher][example] A [T_s, T_t], sparse CSR on the host
    masks: list[torch.Tensor]              # [example] student tokens aligned with every teacher [T_s] bool


class Launched(NamedTuple):
    """What `TeacherKVBuilder.launch` queued: the samples, on the builder's device, and the encoder's verdicts on
    them, not yet read (kvfuse.codecs.FiniteCheck, each naming its example); `raise_if_not_finite(checks)` reads
    them all with one host sync."""
    samples: list[tuple[str, dict[str, torch.Tensor]]]
    checks: list[FiniteCheck]


class TeacherKVBuilder:
    """Builds {input_ids, positions, mask, labels_mask, teacher{i}/k, teacher{i}/v} per example."""

    def __init__(self, teachers: Sequence[Teacher], student_tokenizer, student_prompt: str, n_student_layers: int,
                 settings: AlignmentSettings = AlignmentSettings(), max_length: int = 512,
                 storage_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 student_max_positions: int | None = None, allow_long_sequences: bool = False,
                 encode: Callable[[dict[str, torch.Tensor], list[FiniteCheck]], dict[str, torch.Tensor]] | None = None):
        """encode(tensors, checks): applied to each built sample on the builder's device (a store codec,
        kvfuse.teacher.compress.encode_sample), so that only the compressed bytes travel to the host; it appends its
        verdicts on the teacher KV's finiteness to `checks` unread (see `launch`). A ValueError it raises, or a
        verdict's, is prefixed with the example id."""
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
        self.student_max_positions = student_max_positions
        self.allow_long_sequences = allow_long_sequences
        self.encode = encode
        self.layer_maps = [layer_map(t.model.config.num_hidden_layers, n_student_layers, settings.layer_map
                                     ).to(self.device) for t in self.teachers]

    def student_view(self, example: Example) -> Rendering:
        view = render_tokens(self.student_tokenizer, self.student_prompt, example, self.settings.trim_whitespace)
        if len(view.input_ids) > self.max_length:
            raise ValueError(f"example {example.id}: the student sequence has {len(view.input_ids)} tokens, more "
                             f"than max_length={self.max_length}; raise max_length (sequences are never truncated)")
        return view

    def _check_positions(self, example: Example, who: str, view: Rendering, limit: int | None) -> None:
        n = len(view.input_ids)
        if limit is None or n <= limit:
            return
        text = (f"example {example.id}: the {who} sequence has {n} tokens, more than the model's {limit} positions "
                "(max_position_embeddings)")
        if not self.allow_long_sequences:
            raise ValueError(f"{text}; drop the example or set allow_long_sequences to use it anyway")
        log.warning("%s: used anyway (allow_long_sequences)", text)

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
        # non-blocking: a blocking copy from pageable memory waits for everything queued before it (the previous
        # batch's teachers), and `launch` is meant to return while the GPU still works
        cap = capture_kv(teacher.model, ids.to(self.device, non_blocking=True),
                         attn.to(self.device, non_blocking=True))
        return [([k[b, :, : lengths[b]] for k in cap.keys], [v[b, :, : lengths[b]] for v in cap.values])
                for b in range(len(views))]

    def prepare(self, examples: Sequence[Example]) -> PreparedBatch:
        """The CPU half of `build`: renderings, token ids and alignment matrices; every alignment error is raised
        here, before any teacher runs."""
        if not examples:
            raise ValueError("build() got no examples")
        students = [self.student_view(ex) for ex in examples]
        views = [[self.teacher_view(ex, i) for ex in examples] for i in range(len(self.teachers))]
        for b, example in enumerate(examples):
            self._check_positions(example, "student", students[b], self.student_max_positions)
            for i, teacher in enumerate(self.teachers):
                self._check_positions(example, f"teacher {i} ({teacher.name})", views[i][b],
                                      max_positions(teacher.model.config))
        alignments: list[list[torch.Tensor]] = [[] for _ in self.teachers]
        masks = []
        for b, (example, student) in enumerate(zip(examples, students)):
            mask = torch.ones(len(student.input_ids), dtype=torch.bool)
            for i, teacher in enumerate(self.teachers):
                try:
                    A, row_ok = self.align(student, views[i][b])
                except ValueError as err:
                    raise ValueError(f"example {example.id}, teacher {i} ({teacher.name}): {err}") from err
                if not bool(row_ok.any()):
                    raise ValueError(f"example {example.id}: no student token aligns with teacher {i} "
                                     f"({teacher.name}); check the tokenizers' offsets and the shared text")
                mask &= row_ok
                alignments[i].append(A)
            if not bool(mask.any()):
                raise ValueError(f"example {example.id}: no student token is aligned with every teacher")
            masks.append(mask)
        return PreparedBatch(list(examples), students, views, alignments, masks)

    def launch(self, prepared: PreparedBatch) -> Launched:
        """The device half of `build`: teacher forwards, K' = A·K, the layer mix, the cast to the storage dtype and
        `encode`, left on the builder's device so that the caller can prepare the next batch while these kernels
        run. The encoder's verdicts come back unread, for the caller to read where it waits for the batch anyway
        (`build` right away, build_pipelined's copier after its copy); until then they hold the encoder's inputs
        (the teacher KV before encoding) for the error message. Encoding adds no host read here; the reads left are
        the model's own (transformers' attention-mask handling) and capture_kv's check of each teacher's RoPE on its
        first forward (kvfuse.models.capture)."""
        per_teacher = [self._teacher_kv(teacher, prepared.teacher_views[i]) for i, teacher in enumerate(self.teachers)]
        out = []
        checks: list[FiniteCheck] = []
        for b, (example, student) in enumerate(zip(prepared.examples, prepared.students)):
            tensors: dict[str, torch.Tensor] = {}
            for i, kvs in enumerate(per_teacher):
                keys, values = kvs[b]
                A = prepared.alignments[i][b]
                M = self.layer_maps[i]
                # One sparse product over all layers and heads at once ([L_t, H, T_t, D] → [L_t, H, T_s, D]), then
                # the layer mix: [L_s, H, T_s, D]. fp32 until the final cast to the storage dtype.
                for kind, per_layer in (("k", keys), ("v", values)):
                    aligned = apply_alignment(A, torch.stack(per_layer).float())
                    mixed = torch.einsum("st,thnd->shnd", M, aligned)
                    tensors[f"teacher{i}/{kind}"] = mixed.to(self.storage_dtype)
            T_s = len(student.input_ids)
            tensors["input_ids"] = student.input_ids
            tensors["positions"] = torch.arange(T_s, dtype=torch.long)
            tensors["mask"] = prepared.masks[b]
            tensors["labels_mask"] = student.rationale_mask
            if self.encode is not None:
                mine: list[FiniteCheck] = []
                try:
                    tensors = self.encode(tensors, mine)
                except ValueError as err:
                    raise ValueError(f"example {example.id}: {err}") from err
                # read later and for the whole batch at once, so the verdict must say which example it is about
                checks += [replace(check, what=f"example {example.id}: {check.what}") for check in mine]
            out.append((str(example.id), tensors))
        return Launched(out, checks)

    def build(self, examples: Sequence[Example], to_host: bool = True) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """{input_ids, positions, mask, labels_mask, teacher{i}/k, teacher{i}/v} per example; teacher tensors on the
        host (the store) or left on the builder's device (online teachers, `to_host=False`)."""
        built, checks = self.launch(self.prepare(examples))
        raise_if_not_finite(checks)
        return [(sid, _to_host(t)) for sid, t in built] if to_host else built


def max_positions(config) -> int | None:
    """The positions a model was made for (None when its config does not say)."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.cpu() for name, t in tensors.items()}


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def build_pipelined(builder: TeacherKVBuilder, examples: Sequence[Example], batch_size: int
                    ) -> Iterator[list[tuple[str, dict[str, torch.Tensor]]]]:
    """`builder.build` over `examples` in batches, yielded in order with the tensors on the host, overlapped:
    while the GPU runs batch n's teachers, the CPU renders and aligns batch n + 1, and a copier thread brings
    batch n − 1 to the host on its own CUDA stream (the copy engine runs beside the forward), into pinned memory
    (fresh pageable memory is page-faulted in at a few GB/s; torch's pinned cache reuses the blocks of batches
    already written). Same tensors as calling `build` batch by batch, and the same errors: the copier reads each
    batch's verdicts (`launch`) once its copies are done, so a bad example raises here when its batch is due, after
    the batches before it and before any of its own."""
    chunks = [list(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    if not chunks:
        return
    cuda = builder.device.type == "cuda"
    side = torch.cuda.Stream(builder.device) if cuda else None

    def copy(launched: Launched, ready):
        built, checks = launched
        if not cuda:
            raise_if_not_finite(checks)
            return built
        with torch.cuda.stream(side):
            side.wait_event(ready)
            host = [(sid, {name: _pinned_copy(t) for name, t in tensors.items()}) for sid, tensors in built]
            side.synchronize()   # `built` (device memory of the main stream) stays referenced until the copies end
            # on the side stream, idle now: on the main one the read would wait for the next batch's forward too
            raise_if_not_finite(checks)
        return host

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-d2h") as copier:
        pending: Future | None = None
        prepared = builder.prepare(chunks[0])
        for n in range(len(chunks)):
            launched = builder.launch(prepared)
            ready = torch.cuda.Event() if cuda else None
            if cuda:
                ready.record()
            if n + 1 < len(chunks):
                prepared = builder.prepare(chunks[n + 1])
            if pending is not None:
                yield pending.result()
            pending = copier.submit(copy, launched, ready)
        yield pending.result()


def collate(samples: Sequence[dict[str, torch.Tensor]], n_teachers: int, pad_id: int = 0,
            pin_memory: bool = False) -> dict[str, Any]:
    """Pad per-sample tensors on the right into a batch; teacher KV becomes [L_s, B, H_t, T, D_t] (kernel layout),
    in pinned host memory with `pin_memory` (for an asynchronous copy to a GPU). Compressed entries (a codec store's
    QuantizedKV / LowRankKV) stay compressed: kvfuse.codecs.stack_samples pads them so that padding decodes to 0."""
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
        if not bool(s["mask"].any()):
            # it would add nothing to the loss; alone in a micro-batch it would leave the loss undefined
            raise ValueError(f"sample {s.get('id', b)!r}: its alignment mask is empty (no student token is aligned "
                             "with every teacher)")
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
            if is_encoded(first):
                for b, s in enumerate(samples):
                    x = s[f"teacher{i}/{kind}"]
                    if tuple(x.shape) != (L, H, lengths[b], D):
                        raise ValueError(f"sample {s.get('id', b)}: teacher{i}/{kind} has shape {tuple(x.shape)}, "
                                         f"expected [{L}, {H}, {lengths[b]}, {D}]")
                batch[f"teacher_{kind}"].append(stack_samples([s[f"teacher{i}/{kind}"] for s in samples], T,
                                                              pin_memory))
                continue
            # empty + zeroed padding: the batch is written once (it is the largest thing a step reads)
            stacked = torch.empty(L, B, H, T, D, dtype=first.dtype, device=first.device,
                                  pin_memory=pin_memory and first.device.type == "cpu")
            for b, s in enumerate(samples):
                x = s[f"teacher{i}/{kind}"]
                if x.shape[0] != L or x.shape[1] != H or x.shape[3] != D or x.shape[2] != lengths[b]:
                    raise ValueError(f"sample {s.get('id', b)}: teacher{i}/{kind} has shape {tuple(x.shape)}, "
                                     f"expected [{L}, {H}, {lengths[b]}, {D}]")
                stacked[:, b, :, : lengths[b]] = x
                stacked[:, b, :, lengths[b]:] = 0
            batch[f"teacher_{kind}"].append(stacked)
    return batch
