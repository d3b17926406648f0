"""bench.py: the table has a row per ratio, the FLOP-ideal speedup is the model's FLOP ratio, bad flags are one line.

Smoke tests on the CPU with the tiny preset and one or two steps; no timing is asserted (speed is measured by running
bench.py, not by tests).
"""

import json

import pytest
import torch

import bench
import masking
import model as M

TINY = ["--device", "cpu", "--model", "tiny", "--batch-size", "8", "--steps", "1", "--warmup", "1"]


def test_table_has_a_row_per_ratio_with_the_flop_ideal_speedup(capsys, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(TINY + ["--ratios", "0", "0.5", "--check-sync", "--json", str(out)])
    cfg = M.PRESETS["tiny"]
    grid = cfg.image_size // cfg.patch_size  # 8 x 8 patches
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    assert [r["kept"] for r in rows] == [grid * grid, masking.num_kept(grid, 0.5)]  # 64, 32

    dense, masked = M.flops_per_sample(cfg), M.flops_per_sample(cfg, masking.num_kept(grid, 0.5))
    assert rows[0]["ideal_speedup"] == 1.0 and rows[0]["speedup"] == 1.0
    assert rows[1]["ideal_speedup"] == pytest.approx(dense / masked, rel=1e-12)
    assert rows[1]["ideal_speedup"] > 1  # fewer patches, fewer FLOPs
    assert rows[1]["ideal_speedup"] < 2  # but less than 1 / (1 - 0.5): the text tower is not masked

    for r in rows:
        assert r["samples_per_s"] > 0 and r["peak_mem_mib"] > 0
        assert r["tflops"] == pytest.approx(3 * M.flops_per_sample(cfg, r["kept"]) * r["samples_per_s"] / 1e12)
        assert r["mfu"] is None and r["sync_free"] is None  # no peak known and no sync check on the CPU
    assert rows[0]["mask_fraction"] is None and rows[1]["mask_fraction"] > 0  # ratio 0 builds no mask

    printed = capsys.readouterr().out
    table = printed[printed.index("ratio  kept"):].splitlines()
    assert len(table) == 3 and table[1].split()[:2] == ["0.00", "64"] and table[2].split()[:2] == ["0.50", "32"]
    assert "skipped on the CPU" in printed
    assert json.loads(out.read_text())["rows"] == rows


def test_ratio_zero_is_always_the_baseline():
    rows = bench.main(TINY + ["--ratios", "0.75", "--mask", "random"])
    assert [r["ratio"] for r in rows] == [0.0, 0.75]


def test_synthetic_tokens_end_with_the_largest_id_at_varied_positions():
    cfg = M.PRESETS["tiny"]
    images, tokens = bench.synthetic_batch(cfg, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 64, 64) and tokens.shape == (64, cfg.context_length)
    eot = cfg.vocab_size - 1
    assert ((tokens == eot).sum(dim=1) == 1).all()  # exactly one end-of-text per caption: the text tower pools there
    positions = tokens.argmax(dim=1)
    assert len(positions.unique()) > 5
    after = torch.arange(cfg.context_length) > positions[:, None]
    assert (tokens[after] == 0).all()  # padding after the caption


@pytest.mark.parametrize("flags, message", [
    (["--ratios", "0.5", "1.0"], "masking ratio must be in [0, 1)"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--model", "ViT-Z"], "invalid choice"),
])
def test_bad_flags_exit_with_one_line(flags, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu"] + flags)
    assert message in str(e.value) and "\n" not in str(e.value)
