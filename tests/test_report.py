import json
import random

import pytest

from kvfuse.__main__ import main
from kvfuse.eval.report import build_report


def _write_run(run_dir, layered_alpha):
    rng = random.Random(3)
    events = []
    for step in range(1, 9):
        events.append({"step": step, "split": "train", "kv_loss": 2.0 / step + rng.random() * 0.1,
                       "k_mse": [rng.random() for _ in range(5)], "v_mse": [rng.random() for _ in range(5)]})
        if step % 4 == 0:
            events.append({"step": step, "split": "val", "kv_loss": 2.1 / step, "gap": 0.02, "ppl": 9.5,
                           "accuracy": 0.25, "rouge_l": 0.4, "k_mse": [0.1] * 5, "v_mse": [0.2] * 5,
                           "cka": [[0.5 + step / 100] * 5, [0.3] * 5], "cka_mean": 0.4 + step / 200})
            alpha = [[[0.6, 0.4]] * 5] * 3 if layered_alpha else [[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]
            events.append({"step": step, "split": "router", "alpha": alpha, "sample_ids": ["a", "b", "c"],
                           "entropy": 0.6})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    (run_dir / "config.yaml").write_text("phase: 1\nalpha: [0.7, 0.3]\n")


@pytest.mark.parametrize("layered_alpha", [False, True])
def test_report_is_self_contained_html(tmp_path, layered_alpha):
    _write_run(tmp_path, layered_alpha)
    path = build_report(tmp_path)
    page = path.read_text()
    assert page.count("data:image/png;base64,") >= (7 if layered_alpha else 6)
    assert "Linear CKA between" in page and "<td>0.44</td>" in page
    assert "Router weights" in page and "phase: 1" in page and "<td>0.25</td>" in page


def test_report_cli_and_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        build_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        build_report(tmp_path)
    _write_run(tmp_path, False)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html"), "--png_dir", str(tmp_path / "png")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 10_000
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["cka.png", "kv_loss.png", "router_alpha.png", "router_entropy.png", "train_layer_heatmap.png",
                    "val_layer_heatmap.png"]
    assert all((tmp_path / "png" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)
