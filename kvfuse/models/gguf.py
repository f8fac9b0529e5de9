"""GGUF → a plain HF model. transformers loads a GGUF de-quantised but marks the model as quantised and refuses to
`save_pretrained` it, so the model is rebuilt from the config without `quantization_config` and the de-quantised
weights are copied over (docs/DESIGN.md §6)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kvfuse.models.identity import model_fingerprint


@contextmanager
def _parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file anew for the config, the tokenizer and the weights; parsing a 262k-token
    vocabulary's metadata is ~18 s a time on 2 cores (Gemma3, two thirds of its conversion). Inside this block
    `gguf.GGUFReader` (which transformers imports at call time) returns one reader per file; readers are read-only
    views of a memory map, so sharing one changes nothing but the time."""
    import gguf  # only conversions need it (the GPU image has no gguf until the staging installs it)

    readers: dict = {}
    reader_cls = gguf.GGUFReader

    def shared(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = reader_cls


def load_gguf(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, torch.nn.Module]:
    """(plain fp32 model, tokenizer, the GGUF-flagged model it was rebuilt from)."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with _parsed_once():
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: de-quantised weights do not fit the rebuilt {type(plain).__name__}: "
                           f"missing {missing}, unexpected {unexpected}")
    return plain.eval(), tokenizer, quantised.eval()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> str:
    """De-quantise `gguf_path` into a regular HF folder `out_dir` (fp32 weights + tokenizer); returns the model's
    fingerprint. Refuses to write a model whose logits differ from the GGUF load's on a probe input."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    plain, tokenizer, quantised = load_gguf(gguf_path)
    probe = torch.arange(1, 17).unsqueeze(0) % plain.config.vocab_size
    with torch.no_grad():
        diff = (plain(probe).logits - quantised(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"{gguf_path}: rebuilt model's logits differ from the GGUF load by {diff:.3g}")
    del quantised
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model_fingerprint(plain)
