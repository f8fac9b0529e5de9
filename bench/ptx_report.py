"""Offline sm_90a reports of Triton kernels, no GPU needed: compile for `GPUTarget("cuda", 90, 32)` with the
installed triton (use the GPU's version, bench/NOTES.md), run `ptxas -v` on the PTX, count what the PTX holds, and
(with `nvdisasm`) the machine instructions of the innermost tensor-core loop. Shared by bench/ptx_attention_kl.py
and bench/ptx_fused_loss.py."""
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
                             capture_output=True, text=True)
    if res.returncode != 0:
        # e.g. "Unsupported .version 9.4": triton 3.9 writes PTX that only its bundled ptxas-blackwell reads
        raise RuntimeError(f"{ptxas} could not assemble triton {triton.__version__}'s PTX for {arch} (pass a newer "
                           f"one with --ptxas):\n{res.stderr.strip()[-2000:]}")
    text = res.stderr + res.stdout
    return dict(regs=int(re.search(r"Used (\d+) registers", text).group(1)),
                spill_st=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text)),
                spill_ld=sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text)),
                stack=sum(int(x) for x in re.findall(r"(\d+) bytes stack frame", text)))


def bundled_tool(name: str) -> str:
    """Path of a CUDA tool (ptxas, nvdisasm) that the installed triton carries."""
    import triton.backends.nvidia
    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)


# Conversions issue at 16 per clock per SM on sm_90, a quarter of the FP32 and integer pipes' rate (bench/NOTES.md,
# "Compressed teachers"): counted apart in the loop report.
CONVERSIONS = ("I2F", "F2I", "F2F", "F2FP", "I2I")


def sass_tensor_core_loop(cubin: bytes, nvdisasm: str) -> dict:
    """Per-thread machine instructions of the innermost loop (a backward branch) that holds a warpgroup MMA
    (HGMMA), disassembled from `cubin`: {"instructions": n, "conversions": n, "ops": {opcode: count}}; empty when
    there is no such loop."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    code, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            code.append((addr, ins.group(2)))
    loops = []
    for addr, text in code:
        target = re.search(r"\bBRA\b.*\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), addr) < addr:
            body = [t for a, t in code if labels[target.group(1)] <= a <= addr]
            if any("HGMMA" in t for t in body):
                loops.append(body)
    if not loops:
        return {}
    ops: dict[str, int] = {}
    for text in min(loops, key=len):
        op = re.sub(r"^@!?U?P[T\d]+\s+", "", text).split()[0].split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    return dict(instructions=sum(ops.values()), conversions=sum(ops.get(op, 0) for op in CONVERSIONS),
                ops=dict(sorted(ops.items(), key=lambda kv: -kv[1])))


def compile_sm90(fn, signature: dict, constexprs: dict, warps: int, stages: int, ptxas: str | None,
                 arch: str = "sm_90a", divisible: frozenset[str] = frozenset(), nvdisasm: str | None = None) -> dict:
    """Compile `fn` for sm_90 with `signature` (every argument: a type or "constexpr"), the launch's divisibility
    specialisation for pointers and the `divisible` integer arguments, and report shared memory and instruction
    counts of the PTX, with a `ptxas` (one that reads the PTX version this triton writes) registers, spills and
    stack, and with an `nvdisasm` the innermost tensor-core loop's machine instructions (`sass_tensor_core_loop`)."""
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
                bulk_reduce=ptx.count("cp.reduce.async.bulk"), tma_load=ptx.count("cp.async.bulk.tensor"),
                **({"loop": sass_tensor_core_loop(k.asm["cubin"], nvdisasm)} if nvdisasm else {}))
