"""Fast greedy generation for evaluation: prompts sorted by length, left-padded into large batches, decoded with the
KV cache (Hugging Face `generate`, `do_sample=False`), so 1319 GSM8K questions take a few batched decodes instead of
1319 one-by-one loops."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfuse.data import render_prompt


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    stopped: bool        # ended with the end-of-sequence token (False: cut at max_new_tokens)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
                    add_special_tokens: bool = False) -> list[Generation]:
    """Greedy continuations of `prompts`, in their order. Batches hold prompts of similar length (longest first, so
    a batch too large for the memory fails at once); padding is on the left so every row's next token is at the
    end. `add_special_tokens`: False for prompts a chat template wrote (they carry their special tokens)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True)[:, width:].cpu()
        for r, i in enumerate(rows):
            row = generated[r].tolist()
            end = next((t for t, tok in enumerate(row) if tok in eos_ids), None)
            kept = row if end is None else row[:end]
            out[i] = Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept), end is not None)
    model.train(was_training)
    return out


def question_prompts(tokenizer, prompt: str, questions: list[str]) -> tuple[list[str], bool]:
    """The generation prompts of `questions` in the training format (`render_prompt`), and whether to add special
    tokens when tokenizing them (not when a chat template wrote them)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    return [render_prompt(tokenizer, prompt, q) for q in questions], not chat
