"""Offline sm_90a reports of Triton kernels, no GPU needed: compile for `GPUTarget("cuda", 90, 32)` with the
installed triton (use the GPU's version, bench/NOTES.md), run `ptxas -v` on the PTX, and count what the PTX holds.
Shared by bench/ptx_attention_kl.py and bench/ptx_fused_loss.py."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def ptxas_report(ptx: str, ptxas: str, arch: str) -> dict:
    """Registers, spill stores / loads and stack frame bytes that `ptxas -v` reports for the PTX."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    return dict(regs=int(re.search(r"Used (\d+) registers", text).group(1)),
                spill_st=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text)),
                spill_ld=sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text)),
                stack=sum(int(x) for x in re.findall(r"(\d+) bytes stack frame", text)))


def compile_sm90(fn, signature: dict, constexprs: dict, warps: int, stages: int, ptxas: str | None,
                 arch: str = "sm_90a", divisible: frozenset[str] = frozenset()) -> dict:
    """Compile `fn` for sm_90 with `signature` (every argument: a type or "constexpr"), the launch's divisibility
    specialisation for pointers and the `divisible` integer arguments, and report shared memory and instruction
    counts of the PTX, and with a `ptxas` (one that reads the PTX version this triton writes) registers, spills and
    stack."""
    names = fn.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if isinstance(v, str) and v != "constexpr" and (v.startswith("*") or k in divisible)}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    return dict(ptxas_report(ptx, ptxas, arch) if ptxas else {}, shared=k.metadata.shared, ptx_lines=ptx.count("\n"),
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
                local=len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                sfu_trig=len(re.findall(r"\b(?:sin|cos)\.approx", ptx)),
                red=len(re.findall(r"\bred\.global|\batom\.global", ptx)),
                bulk_reduce=ptx.count("cp.reduce.async.bulk"), tma_load=ptx.count("cp.async.bulk.tensor"))
