"""bench/ncu_report.py on small exports in Nsight Compute's CSV layout: launches grouped per codec in launch order,
the stall reasons summed over instructions, and the loop body found as the instructions executed most often."""
from __future__ import annotations

import pytest

from bench import ncu_report

DETAILS = '''# codec bf16
"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"
"1","_fused_kv_dw_kernel","GPU Speed Of Light Throughput","Duration","us","486.05"
"0","_fused_kv_fwd_kernel","GPU Speed Of Light Throughput","Duration","ms","1.04"
"0","_fused_kv_fwd_kernel","Launch Statistics","Registers Per Thread","register/thread","254"
# codec fp8
"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"
"0","_fused_kv_fwd_kernel","GPU Speed Of Light Throughput","Duration","ms","1.11"
'''
HEAD = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_mio",'
        '"stall_long_sb (Not Issued)"')
SASS = "\n".join(['"Kernel Name","_fused_kv_dw_kernel",', HEAD,
                  *[f'"0x{i}","LDS.U8 R{i}, [R4]","3","229,376","1","2","9"' for i in range(20)],
                  '"0x99","@!P6  BRA 0x7f","50","7,168","40","0","9"',
                  '"0x98","HGMMA.64x128x16.F32.BF16 R24","5","229,376","0","5","9"'])


def test_report_groups_launches_and_finds_the_loop(tmp_path):
    (tmp_path / "ncu_details.csv").write_text(DETAILS)
    (tmp_path / "ncu_sass_dw_fp8.csv").write_text(SASS)
    launches = ncu_report.details(tmp_path / "ncu_details.csv")
    assert [name for name, _ in launches["bf16"]] == ["_fused_kv_fwd_kernel", "_fused_kv_dw_kernel"]
    assert launches["bf16"][0][1]["Launch Statistics", "Registers Per Thread"] == "254 register/thread"
    assert launches["fp8"][0][1]["GPU Speed Of Light Throughput", "Duration"] == "1.11 ms"
    text = ncu_report.report(tmp_path)
    # stall reasons: long_sb 20 + 40 = 60, mio 40 + 5 = 45 of 105 (the "Not Issued" columns are not summed again)
    assert "stalls: long_sb 57% mio 43%" in text
    # the loop: the 21 instructions executed 229,376 times, not the branch executed 7,168 times
    assert "loop body: 21 instructions executed 229,376 times" in text and "LDS 20 HGMMA 1" in text
    assert text.index("most stalled: @!P6 BRA") > 0


def test_report_names_the_missing_export(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ncu_report.main([str(tmp_path)])
    assert f"no ncu_details.csv in {tmp_path}" in capsys.readouterr().err
