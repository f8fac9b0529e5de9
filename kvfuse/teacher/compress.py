"""A store codec applied to the teacher KV of one sample, and undone on reading (DESIGN.md §5, kvfuse.codecs).

Stored tensor names per sample, teacher i, kind k|v:

    codec bf16                 teacher{i}/{k}                   bf16 (or the dump's --dtype) [L_s, H, T, D]
    codec fp8 | fp8z | int8    teacher{i}/{k}                   data (float8_e4m3fn [L_s, H, T, D] | uint8 [.., D] |
          | int4                                                uint8 [.., D/2])
                               teacher{i}/{k}.scale             per channel [L_s, H, D]: keys, fp8(z) and int8 values
                                                                (fp8(z) and int8 bfloat16, int4 float32); per token
                                                                float16 [L_s, H, T]: int4 values (codecs.store_axis)
                               teacher{i}/{k}.offset            fp8z, int8 and int4 only, like the scale
    codec lowrank:r[+q]        teacher{i}/{k}                   coefficients [L_s, 1, T, R] (bf16, or q's data)
                               teacher{i}/{k}.scale/.offset     q's per-token scale (and offset), float16 [L_s, 1, T]

Low-rank bases (one per teacher and kind, fitted on the first `--calib` training samples) live once per store in
`bases.safetensors` (kvfuse.teacher.store handles the file and its checksum); `Basis` is one of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kvfuse.codecs import (OFFSET_KINDS, Codec, FiniteCheck, LowRankKV, QuantizedKV, check_plain, encode,
                           encode_lowrank, fit_lowrank_basis, gram, parse_codec, raise_if_not_finite, store_axis,
                           stored_axis)

SIDE = (".scale", ".offset")


@dataclass(frozen=True)
class Basis:
    """One (teacher, k|v) low-rank basis: float32 [L_s, R, H·D] and the per-layer ranks r_l it was cut at."""

    basis: torch.Tensor
    heads: int
    head_dim: int
    ranks: tuple[int, ...]


def teacher_entries(n_teachers: int) -> list[str]:
    return [f"teacher{i}/{kind}" for i in range(n_teachers) for kind in ("k", "v")]


def stored_names(n_teachers: int, codec: Codec | str) -> list[str]:
    """The names of one sample's stored tensors under `codec` (what a shard declares before streaming)."""
    codec = parse_codec(str(codec))
    quant = codec.quant if codec.lowrank else (codec.kind if codec.kind != "bf16" else None)
    names = ["input_ids", "positions", "mask", "labels_mask"]
    for entry in teacher_entries(n_teachers):
        names.append(entry)
        if quant is not None:
            names.append(entry + ".scale")
        if quant in OFFSET_KINDS:
            names.append(entry + ".offset")
    return names


def encode_sample(tensors: Mapping[str, torch.Tensor], codec: Codec, bases: Mapping[str, Basis] | None = None,
                  checks: list[FiniteCheck] | None = None) -> dict[str, torch.Tensor]:
    """One built sample ({input_ids, positions, mask, labels_mask, teacher{i}/{k|v}}) → its stored tensors under
    `codec`; codec bf16 returns the sample as it is. Statistics over the sample's valid (mask) tokens only. A NaN or
    Inf in a valid token of a teacher entry is a ValueError naming the entry, NaN or ±Inf and its position, under
    every codec (bf16 too: the dump stores nothing unchecked); the verdicts of all entries are read with one host
    sync per sample, or, given `checks` (a list), appended there unread (`FiniteCheck`, as the encoders do): the
    builder defers them so that encoding does not wait for the teacher forward. Masked tokens may hold anything and
    are stored as padding (zeros; integer keys: the grid value nearest 0)."""
    out = {}
    read_now = checks is None
    checks = [] if read_now else checks
    masks: dict[torch.device, torch.Tensor] = {}
    for name, t in tensors.items():
        if not name.startswith("teacher"):
            out[name] = t
            continue
        if t.device not in masks:
            # once per sample and without waiting: the dump's mask is on the host, and a blocking copy would wait
            # for the teacher forward (once per entry, each encoder moving it again)
            masks[t.device] = tensors["mask"].to(t.device, non_blocking=True)
        mask = masks[t.device]
        kind = name.rsplit("/", 1)[1]
        label = f"{name} ({'keys' if kind == 'k' else 'values'})"
        if codec.kind == "bf16":
            # no encoder derives a verdict here, so the stored tensor is checked itself
            check_plain(t, mask, label, checks)
            # padding stored as zeros, as every encoder decodes it: a masked token's NaN (a padded row whose
            # attention saw no key, say) would otherwise be refused by the loader's check of the whole tensor
            out[name] = t.masked_fill(mask.unsqueeze(-1) == 0, 0)
        elif codec.lowrank:
            if bases is None or name not in bases:
                raise ValueError(f"codec {codec}: no low-rank basis for {name}")
            encoded = encode_lowrank(t, bases[name].basis.to(t.device), codec.quant, mask, label, checks)
            coeffs = encoded.coeffs
            if isinstance(coeffs, QuantizedKV):
                out.update(_quantized_tensors(name, coeffs))
            else:
                out[name] = coeffs
        else:
            # the encoder's verdict (its scale's finiteness) covers a NaN/Inf input as well as an overflowing scale,
            # at no extra pass over the entry: a separate check of the input would only repeat it
            axis = store_axis(kind, codec.kind)
            out.update(_quantized_tensors(name, encode(t, codec.kind, axis, mask, label, checks)))
    if read_now:
        raise_if_not_finite(checks)
    return out


def _quantized_tensors(name: str, q: QuantizedKV) -> dict[str, torch.Tensor]:
    named = {name: q.data, name + ".scale": q.scale}
    if q.offset is not None:
        named[name + ".offset"] = q.offset
    return named


def assemble(named: Mapping[str, torch.Tensor], codec: Codec, bases: Mapping[str, Basis] | None = None) -> dict:
    """Stored tensors of one sample → the sample with each teacher entry a tensor (bf16), a QuantizedKV or a
    LowRankKV (the inverse of `encode_sample`, nothing decoded)."""
    if codec.kind == "bf16":
        return dict(named)
    out = {}
    for name, t in named.items():
        if name.endswith(SIDE):
            continue
        if not name.startswith("teacher"):
            out[name] = t
            continue
        quant = codec.quant if codec.lowrank else codec.kind
        if quant is None:
            value = t
        else:
            scale = named[name + ".scale"]
            axis = "token" if codec.lowrank else stored_axis(scale, name)
            value = QuantizedKV(quant, axis, t, scale, named.get(name + ".offset"))
        if codec.lowrank:
            basis = bases[name]
            value = LowRankKV(value, basis.basis, basis.heads, basis.head_dim)
        out[name] = value
    return out


def fit_bases(samples: Sequence[Mapping[str, torch.Tensor]], codec: Codec) -> dict[str, Basis]:
    """Per (teacher, k|v): the SVD basis of the calibration samples' valid tokens ([L_s, H, T, D] each, fp32),
    per layer, cut at the codec's rank or energy threshold."""
    if not samples:
        raise ValueError(f"codec {codec}: fitting low-rank bases needs at least one calibration sample (--calib)")
    bases = {}
    for name in [n for n in samples[0] if n.startswith("teacher")]:
        total = None
        for j, s in enumerate(samples):
            g = gram(s[name].float().cpu(), s["mask"].cpu(), f"{name} of calibration sample {j}")
            total = g if total is None else total + g
        L, H, _, D = samples[0][name].shape
        rank = None if codec.rank is None else min(codec.rank, H * D)
        basis, ranks = fit_lowrank_basis(total, rank=rank, energy=codec.energy)
        bases[name] = Basis(basis, H, D, tuple(ranks))
    return bases
