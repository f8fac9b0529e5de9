"""The offline sm_90a report (bench/ptx_report.py) on the fused loss's key pass, compiled by the installed triton
(no GPU): RoPE's sine and cosine go to the SFU, so the key pass's PTX has no local memory and is not much longer
than the value pass's — libdevice's sinf/cosf put a Payne–Hanek slow path with a local array there (bench/NOTES.md).
Registers and spills depend on the ptxas version, so they are left to the report itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ptx_report import bundled_tool, ptxas_report

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json
from bench import ptx_fused_loss as P
from bench.ptx_report import compile_sm90
from kvfuse.kernels import fused_kv_loss as K
config = K._FWD_CONFIGS_GPU[0]
cfg = dict(config.kwargs)
out = {}
for is_key in (True, False):
    out["keys" if is_key else "values"] = compile_sm90(
        K._fused_kv_fwd_kernel, P.fwd_signature(cfg["BLOCK_T"], cfg["BLOCK_K"], cfg["WIDE"], (0, 0)),
        P.fwd_constexprs(cfg, is_key, (0, 0)), config.num_warps, config.num_stages, None)
print(json.dumps(out))
"""


def test_key_pass_trig_runs_on_the_sfu_without_local_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    keys, values = report["keys"], report["values"]
    assert keys["sfu_trig"] > 0 and values["sfu_trig"] == 0
    assert keys["local"] == 0 and values["local"] == 0, keys
    assert keys["wgmma"] > 0 and values["wgmma"] > 0  # the products run on Hopper's tensor cores
    # RoPE costs the key pass a modest amount of code, not the fourfold it did with libdevice
    assert keys["ptx_lines"] < 1.6 * values["ptx_lines"], (keys["ptx_lines"], values["ptx_lines"])


LOOP_PROBE = """
import json
import triton.language as tl
from bench import ptx_fused_loss as P
from bench.ptx_report import bundled_tool, compile_sm90
from kvfuse.kernels import fused_kv_loss as K
from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES
config = K._DW_CONFIGS_GPU[0]
cfg = dict(config.kwargs)
out = {}
for name, codec in (("bf16", 0), ("fp8", CODEC_CODES["fp8", "channel"]), ("int8", CODEC_CODES["int8", "channel"]),
                    ("int4", CODEC_CODES["int4", "channel"])):
    consts = dict(D_I=P.DIMS[0], C2=2 * P.H_S * P.PH, CODEC=codec, CODEC_V=codec, KINDS=1, DOT_DTYPE=tl.bfloat16,
                  IEEE=False, USE_DESC=True, **cfg)
    out["dw_" + name] = compile_sm90(K._fused_kv_dw_kernel, P.dw_signature(cfg["BLOCK_F"], cfg["BLOCK_C"],
                                     cfg["BLOCK_T"], codec, codec), consts, config.num_warps, config.num_stages,
                                     None, nvdisasm=bundled_tool("nvdisasm"))["loop"]
fwd = K._FWD_CONFIGS_GPU[0]
for name, kind in (("int4", "int4"), ("fp8", "fp8"), ("fp8_f32", "fp8"), ("int8", "int8"), ("int8_f32", "int8")):
    codecs = (CODEC_CODES[kind, "channel/f32" if name.endswith("_f32") else "channel"],) * 2
    out["fwd_" + name] = compile_sm90(K._fused_kv_fwd_kernel, P.fwd_signature(64, 64, False, codecs),
                                      P.fwd_constexprs(dict(fwd.kwargs), True, codecs), fwd.num_warps,
                                      fwd.num_stages, None, nvdisasm=bundled_tool("nvdisasm"))["loop"]
print(json.dumps(out))
"""


def test_weight_gradient_loops_decode_as_designed():
    # the compressed weight gradient's loop, in machine code (bench/NOTES.md "Compressed teachers"): bf16 feeds the
    # tensor cores with no conversion; per-channel fp8 places its codes' bits into bf16 (no conversion at all) and
    # applies its scale after the loop (no multiply inside); int4 decodes with no int-to-float conversion (OR and
    # add) in both kernels; the forward's fp8 decode with bf16 scales converts nothing (the float32-scale path does)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", LOOP_PROBE], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loops = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(loop["ops"].get("HGMMA", 0) > 0 for loop in loops.values()), loops
    assert loops["dw_bf16"]["conversions"] == 0 and "FMUL" not in loops["dw_bf16"]["ops"]
    assert "FMUL" not in loops["dw_fp8"]["ops"] and loops["dw_fp8"]["conversions"] == 0, loops["dw_fp8"]["ops"]
    assert "I2F" not in loops["dw_int4"]["ops"] and "I2F" not in loops["fwd_int4"]["ops"], loops
    # one bf16 multiply per pair of codes (one PRMT), by the folded scale, and nothing converted
    fwd_fp8 = loops["fwd_fp8"]["ops"]
    assert loops["fwd_fp8"]["conversions"] == 0 < loops["fwd_fp8_f32"]["conversions"], (fwd_fp8, loops["fwd_fp8_f32"])
    assert 0 < fwd_fp8.get("HMUL2", 0) + fwd_fp8.get("HFMA2", 0) <= fwd_fp8["PRMT"], fwd_fp8
    assert loops["dw_bf16"]["instructions"] < loops["dw_fp8"]["instructions"] < loops["dw_int4"]["instructions"]
    # int8 by its bits: one byte permute and one bf16 FMA per pair of codes in both kernels, nothing converted; its
    # float32 side data takes the fp32 decode, with conversions and more instructions
    for kernel in ("fwd", "dw"):
        ops = loops[f"{kernel}_int8"]["ops"]
        assert loops[f"{kernel}_int8"]["conversions"] == 0 and "I2F" not in ops, ops
        assert 0 < ops.get("HFMA2", 0) <= ops["PRMT"], ops
    assert loops["fwd_int8_f32"]["conversions"] > 0, loops["fwd_int8_f32"]
    assert loops["fwd_int8"]["instructions"] < loops["fwd_int8_f32"]["instructions"], loops


def test_ptxas_that_cannot_read_the_ptx_says_which_and_why():
    ptx = ".version 99.9\n.target sm_90a\n.address_size 64\n"
    with pytest.raises(RuntimeError, match=r"could not assemble(.|\n)*--ptxas(.|\n)*99\.9"):
        ptxas_report(ptx, bundled_tool("ptxas"), "sm_90a")
