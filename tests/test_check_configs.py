"""bench/check_configs.py's forcing of one kernel config through the autotuner's prune hook (the GPU sweep itself
needs a GPU: it checks triton's generated code): the forced config is the only one left, the project's stage rule
still applies unless --raw, and the variants list every tile at its own and the asked stage counts; and the teacher
encoder it shares with the codec bench."""
from __future__ import annotations

import pytest

from bench import check_configs
from kvfuse.kernels import fused_kv_loss as fk
from kvfuse.kernels.fused_kv_loss_op import CODEC_CODES


@pytest.fixture
def restore_hooks():
    yield
    for tuned in (fk._fwd_tuned, fk._dw_tuned):
        tuned.early_config_prune = check_configs._PROJECT_PRUNE[id(tuned)]
        tuned.cache.clear()
    fk._TUNED.clear()
    fk.AVOID_MISCOMPILES = True


@pytest.mark.parametrize("raw", [False, True])
def test_forced_config_keeps_the_stage_rule_unless_raw(restore_hooks, raw):
    target = check_configs.variants(fk._DW_CONFIGS_GPU[1:2], [3])[-1]
    assert (target.kwargs, target.num_stages) == (fk._DW_CONFIGS_GPU[1].kwargs, 3)
    ran = check_configs.forced(fk._dw_tuned, target, raw)
    per_token = {"CODEC": CODEC_CODES["fp8", "channel"], "CODEC_V": CODEC_CODES["fp8", "token"]}
    kept = fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, per_token)
    assert [(c.kwargs, c.num_warps) for c in kept] == [(target.kwargs, target.num_warps)]
    assert kept[0].num_stages == (3 if raw else 1) and ran["config"] is kept[0]
    channel = {"CODEC": CODEC_CODES["int4", "channel"], "CODEC_V": CODEC_CODES["int4", "token"]}
    assert [c.num_stages for c in fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, channel)] == [3]


def test_weight_gradient_tiles_too_big_for_plain_teachers_are_pruned():
    # 64 x 256 at 128 tokens needs 246 KB of shared memory with a bf16 X tile (the H200 has 227): never tried for
    # plain teachers, kept for coded ones (fp8 and int4 tiles are smaller; checked on the H200)
    wide = [c for c in fk._DW_CONFIGS_GPU if (c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"]) == (256, 128)]
    assert wide
    plain = fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, {"CODEC": 0, "CODEC_V": 0})
    assert len(plain) == len(fk._DW_CONFIGS_GPU) - len(wide) and not [c for c in wide if c in plain]
    coded = {"CODEC": CODEC_CODES["fp8", "channel"], "CODEC_V": CODEC_CODES["int4", "token"]}
    kept = fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, coded)
    assert [c for c in wide if c in kept] == wide


def test_weight_gradient_tiles_miscompiled_for_coded_teachers_are_left_out(restore_hooks):
    # the two 4-warp tiles seen wrong on the packaged model's fp8 store: left out for any compressed teacher, kept
    # for plain ones, and kept for every teacher once the rules are off (check_configs --raw)
    def tile(c):
        return (c.kwargs["BLOCK_F"], c.kwargs["BLOCK_C"], c.kwargs["BLOCK_T"], c.num_warps)
    bad = [c for c in fk._DW_CONFIGS_GPU if tile(c) in ((128, 64, 64, 4), (64, 128, 128, 4))]
    assert len(bad) == 2
    plain = {"CODEC": 0, "CODEC_V": 0}
    assert all(c in fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, plain) for c in bad)
    for codec in (("fp8", "channel"), ("fp8", "channel/f32"), ("int4", "channel"), ("int4d", "channel")):
        coded = {"CODEC": CODEC_CODES[codec], "CODEC_V": CODEC_CODES[codec]}
        kept = fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, coded)
        assert not [c for c in bad if c in kept] and len(kept) == len(fk._DW_CONFIGS_GPU) - 2, codec
    fk.AVOID_MISCOMPILES = False
    assert fk._dw_tuned.early_config_prune(fk._DW_CONFIGS_GPU, coded) == fk._DW_CONFIGS_GPU


@pytest.mark.parametrize("raw", [False, True])
def test_forced_config_left_out_by_the_rules_is_reported(restore_hooks, raw):
    # the dithered forward's 64 x 128 / 4-warp tile is left out by the project's rule: another config runs, and
    # the sweep learns that the asked one did not (unless raw)
    target = next(c for c in fk._FWD_CONFIGS_GPU if (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_K"], c.num_warps)
                  == (64, 128, 4))
    ran = check_configs.forced(fk._fwd_tuned, target, raw)
    meta = {"H_S": 2, "PH": 64, "EPI_DESC": False, "NATURAL": True, "CODECS": (CODEC_CODES["int4d", "channel"],)}
    kept = fk._fwd_tuned.early_config_prune(fk._FWD_CONFIGS_GPU, meta)
    assert len(kept) == 1
    assert (ran["config"] is target and kept[0] is target) if raw else \
        (ran["config"] is None and kept[0].kwargs != target.kwargs)


def test_variants_cover_every_tile_and_stage():
    got = check_configs.variants(fk._DW_CONFIGS_GPU, [1, 2, 3, 4])
    assert {(str(c.kwargs), c.num_warps, c.num_stages) for c in got} == \
        {(str(c.kwargs), c.num_warps, s) for c in fk._DW_CONFIGS_GPU for s in (1, 2, 3, 4)}
    assert len(got) == 4 * len(fk._DW_CONFIGS_GPU)


def test_encoded_teachers_group_as_a_store_does():
    # the one encoder the codec bench and the config check share: keys per channel; int4 values per token, fp8
    # values per channel (per token for fp8_token, the layout of fp8 stores written before 26a4f1e)
    import torch
    from bench.bench_fused_loss import CODECS, encoded_teachers
    from kvfuse.codecs import LowRankKV, QuantizedKV, stored_axis
    g = torch.Generator().manual_seed(0)
    x = {"teacher_k": [torch.randn(2, 2, 2, 8, 16, generator=g)],
         "teacher_v": [torch.randn(2, 2, 2, 8, 16, generator=g)], "mask": torch.ones(2, 8, dtype=torch.bool)}
    want = {"fp8": ("channel", "channel"), "fp8_f32": ("channel", "channel"), "fp8_token": ("channel", "token"),
            "fp8z": ("channel", "channel"), "int8": ("channel", "channel"), "int8_f32": ("channel", "channel"),
            "int4": ("channel", "token"),
            "int4d": ("channel", "token")}
    for codec in CODECS:
        tk, tv = encoded_teachers(x, codec)
        if codec == "bf16":
            assert tk is x["teacher_k"] and tv is x["teacher_v"]
        elif codec == "lowrank":
            assert isinstance(tk[0], LowRankKV) and tk[0].rank == 16  # min(256, F/2) of F = 32
        else:
            assert isinstance(tk[0], QuantizedKV) and tk[0].kind == codec.split("_")[0]
            assert (stored_axis(tk[0].scale), stored_axis(tv[0].scale)) == want[codec]
            assert (tk[0].scale.dtype == torch.float32) == (codec in ("fp8_f32", "int8_f32", "int4", "int4d"))


def test_merge_writes_one_csv_and_names_the_wrong_variants(tmp_path):
    # the GPU session runs one sweep per codec in parallel and merges their CSVs: every row kept, the wrong ones
    # (off, racing or failed) listed; rows taken from the kept H200 results (d0fc34f holds the raw, two-heads row)
    import csv
    from pathlib import Path
    kept = Path(__file__).resolve().parent.parent / "bench/results/check_configs_NVIDIA_H200.csv"
    rows = list(csv.DictReader(open(kept)))
    by_commit = {}
    for r in rows:
        by_commit.setdefault(r["commit"], []).append(r)
    paths = []
    for name in ("d0fc34f", "6c53ffe"):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(by_commit[name])
        paths.append(path)
    logged = []
    bad = check_configs.merge(tmp_path / "all.csv", paths, log=logged.append)
    n = len(by_commit["d0fc34f"]) + len(by_commit["6c53ffe"])
    assert len(list(csv.DictReader(open(tmp_path / "all.csv")))) == n
    assert [(r["commit"], r["rel_err"]) for r in bad] == [("d0fc34f", "1.055e+25")]
    assert logged[0].startswith(f"{n} variants checked, 1 wrong")
    assert check_configs.wrong({"error": "OutOfResources: x", "rel_err": "", "rerun_diff": ""})
    assert not check_configs.wrong({"error": "", "rel_err": "", "rerun_diff": ""})  # left out by the rules
    # sweeps that wrote no row, or no sweep CSV at all: said, not an index error
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no variant rows in .*empty.csv"):
        check_configs.merge(tmp_path / "none.csv", [empty])
    with pytest.raises(SystemExit):
        check_configs.main(["--merge", str(tmp_path / "none.csv")])
