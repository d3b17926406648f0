"""bench.py: the table has a row per ratio, the FLOP-ideal speedup is the model's FLOP ratio, the
OpenCLIP side-by-side runs the same steps at the same ratios, bad flags are one line, the memory per
sample is what autograd saves.

Smoke tests on the CPU with the tiny preset and one or two steps; no timing is asserted (speed is
measured by running bench.py, not by tests).
"""

import contextlib
import io
import json
import sys
import time
import types

import pytest
import torch

import bench
import data
import masking
import model as M
import train

TINY = ["--device", "cpu", "--model", "tiny", "--batch-size", "8", "--steps", "1", "--warmup", "1"]


def test_table_has_a_row_per_ratio_with_the_flop_ideal_speedup(capsys, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(TINY + ["--ratios", "0", "0.5", "--check-sync", "--json", str(out)])
    cfg = M.PRESETS["tiny"]
    grid = cfg.grid_size  # 8 x 8 patches
    # both with the whole text
    assert [r["ratio"] for r in rows] == [0.0, 0.5] and [r["text_tokens"] for r in rows] == [32, 32]
    assert [r["kept"] for r in rows] == [grid * grid, masking.num_kept(grid, 0.5)]  # 64, 32

    assert 1 < rows[1]["ideal_speedup"] < 2  # fewer patches, but the text tower is not masked

    for r in rows:
        assert r["samples_per_s"] > 0 and r["peak_mem_mib"] > 0
        # the FLOPs train.py counts for MFU, per sample per step
        per_sample = M.train_flops_per_sample(cfg, r["ratio"])
        assert r["tflops"] == pytest.approx(per_sample * r["samples_per_s"] / 1e12)
        # no peak known and no sync check on the CPU
        assert r["mfu"] is None and r["sync_free"] is None
    # ratio 0 builds no mask
    assert rows[0]["mask_fraction"] is None and rows[1]["mask_fraction"] > 0

    printed = capsys.readouterr().out
    table = printed[printed.index("ratio  kept"):].splitlines()
    assert (len(table) == 4 and table[1].split()[:3] == ["0.00", "64", "32"]
            and table[2].split()[:2] == ["0.50", "32"])
    assert (table[3].startswith("inference, image tower unmasked")
            and "skipped on the CPU" in printed)
    written = json.loads(out.read_text())
    assert written["rows"] == rows and written["inference_images_per_s"] > 0
    assert f"{written['inference_images_per_s']:.1f} images/s" in table[3]


def test_text_length_rows_encode_fewer_tokens_and_raise_the_ideal_speedup(monkeypatch, capsys):
    seen, forward = [], M.CLIP.forward  # (text tokens, positions given) of every call of the model

    def recording_forward(self, images, tokens, keep=None, positions=None):
        seen.append((tokens.shape[1], positions is not None))
        return forward(self, images, tokens, keep, positions)

    monkeypatch.setattr(M.CLIP, "forward", recording_forward)
    rows = bench.main(TINY + ["--ratios", "0.75", "0.9", "--text-length", "16",
                              "--text-mask", "random"])
    cfg = M.PRESETS["tiny"]
    assert [(r["ratio"], r["text_tokens"]) for r in rows] == [(0, 32), (0, 16), (0.75, 32),
                                                              (0.75, 16), (0.9, 32), (0.9, 16)]
    # warm-up + timed step per row
    assert seen == [(32, False), (32, False), (16, True), (16, True)] * 3
    for r in rows:
        kept = masking.num_kept(cfg.grid_size, r["ratio"])
        flops = M.flops_per_sample(cfg, kept, r["text_tokens"])
        assert r["ideal_speedup"] == pytest.approx(M.flops_per_sample(cfg) / flops)
    full, short = rows[0::2], rows[1::2]
    # shorter text, fewer FLOPs
    assert all(s["ideal_speedup"] > f["ideal_speedup"] for f, s in zip(full, short))
    # and the more patches are dropped, the larger the text tower's share, so the more shortening it
    # pays
    assert (short[2]["ideal_speedup"] / full[2]["ideal_speedup"]
            > short[1]["ideal_speedup"] / full[1]["ideal_speedup"])
    # the text mask is built in the step
    assert short[0]["mask_fraction"] > 0 and full[0]["mask_fraction"] is None
    table = capsys.readouterr().out.split("ratio  kept text")[1].splitlines()[1:7]
    assert [line.split()[:3] for line in table] == [["0.00", "64", "32"], ["0.00", "64", "16"],
                                                    ["0.75", "16", "32"], ["0.75", "16", "16"],
                                                    ["0.90", "6", "32"], ["0.90", "6", "16"]]


def test_bench_times_train_pys_own_step(monkeypatch):
    calls, step = [], train.train_step

    def counting_step(*args, **kwargs):
        calls.append(args[3])  # the micro-batches
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counting_step)  # what train.py's loop calls
    bench.main(TINY + ["--ratios", "0.5"])
    assert len(calls) == 2 * (1 + 1)  # 2 ratios x (1 warm-up + 1 timed step), all through train.py
    assert all(len(micro) == 1 and micro[0][0].shape[0] == 8 for micro in calls)


def test_ratio_zero_is_always_the_baseline():
    rows = bench.main(TINY + ["--ratios", "0.75", "--mask", "random"])
    assert [r["ratio"] for r in rows] == [0.0, 0.75]


def test_synthetic_tokens_end_with_the_largest_id_at_varied_positions():
    cfg = M.PRESETS["tiny"]
    generator = torch.Generator().manual_seed(0)
    images, tokens = bench.synthetic_batch(cfg, 64, torch.device("cpu"), generator)
    assert images.shape == (64, 3, 64, 64) and tokens.shape == (64, cfg.context_length)
    eot = cfg.vocab_size - 1
    # exactly one end-of-text per caption: the text tower pools there
    assert ((tokens == eot).sum(dim=1) == 1).all()
    positions = tokens.argmax(dim=1)
    assert len(positions.unique()) > 5
    after = torch.arange(cfg.context_length) > positions[:, None]
    assert (tokens[after] == 0).all()  # padding after the caption


class PatchDroppingCLIP(M.CLIP):
    """Stands in for an OpenCLIP model in these tests: forward(images, tokens) drops patches itself,
    at the rate held in visual.patch_dropout.prob (as OpenCLIP's PatchDropout module does), and
    records the rates it ran at."""

    def forward(self, images, tokens):
        prob = self.visual.patch_dropout.prob
        self.rates_seen.append(prob)
        keep = (None if prob == 0
                else masking.keep_indices(len(images), self.visual.grid_size, prob, "random"))
        return super().forward(images, tokens, keep)


def fake_open_clip():
    """A module with the two functions of open_clip that bench.py calls (open_clip_torch is not a
    dependency)."""
    def create_model(name, force_patch_dropout):
        model = PatchDroppingCLIP(M.PRESETS[name])
        model.visual.patch_dropout = types.SimpleNamespace(prob=force_patch_dropout)
        model.rates_seen = []
        created.append(model)
        return model
    created = []
    return types.SimpleNamespace(__version__="fake", list_models=lambda: ["tiny"],
                                 create_model=create_model, created=created)


def test_openclip_runs_side_by_side_at_the_same_ratios(monkeypatch, capsys, tmp_path):
    fake = fake_open_clip()
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    out = tmp_path / "bench.json"
    rows = bench.main(TINY + ["--ratios", "0.5", "--text-length", "16", "--openclip",
                              "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == rows and result["openclip"] == "OpenCLIP tiny (open_clip_torch fake)"
    oc_rows = result["openclip_rows"]  # the whole text only: its text tower takes the whole context
    assert ([(r["ratio"], r["kept"], r["text_tokens"]) for r in oc_rows]
            == [(0.0, 64, 32), (0.5, 32, 32)])
    # its mask is built inside its forward: not timed apart
    assert all(r["mask_fraction"] is None for r in oc_rows)
    # the model's own dropout rate was set before each ratio: warm-up + timed steps at 0, then at
    # 0.5
    (model,) = fake.created
    assert model.rates_seen == [0.0] * 2 + [0.5] * 2
    printed = capsys.readouterr().out
    assert "OpenCLIP tiny (open_clip_torch fake), the same steps" in printed
    # our whole-text rows
    compared = printed.split("ours / OpenCLIP samples/s: ")[1].splitlines()[0].split(", ")
    assert [c.split(":")[0] for c in compared] == ["0.00", "0.50"]


def usage_error(capsys, argv):
    """The one line (on stderr) that parse_args exits with, status 2 as argparse's."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def test_openclip_missing_or_without_the_model_is_a_warning_and_our_rows_run(monkeypatch, capsys):
    # what `import open_clip` meets when it is not installed
    monkeypatch.setitem(sys.modules, "open_clip", None)
    rows = bench.main(TINY + ["--ratios", "0.5", "--openclip"])
    err = capsys.readouterr().err
    assert "warning: --openclip skipped: open_clip_torch is not installed" in err
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    monkeypatch.setitem(sys.modules, "open_clip", fake_open_clip())
    args = bench.parse_args(["--device", "cpu", "--model", "ViT-Ti-16", "--openclip"])
    assert not args.openclip
    assert "OpenCLIP has no model named 'ViT-Ti-16'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--ratios", "0.5", "1.0"], "masking ratio must be in [0, 1)"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--model", "ViT-Z"], "invalid choice"),
    # the tiny preset on the CPU: 32 tokens
    (["--text-length", "1"], "text length must be in [2, 32]"),
    (["--text-length", "16", "78"], "text length must be in [2, 32]"),
    (["--text-mask", "block"], "invalid choice"),
])
def test_bad_flags_exit_with_one_line(flags, message, capsys):
    assert message in usage_error(capsys, ["--device", "cpu"] + flags)


def test_bench_times_the_training_and_evaluation_pipelines_and_keeps_their_data(capsys, tmp_path):
    rates = bench.main(["data", "--workers", "0", "--num-images", "64", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(rates) == {"cc12m", "s256", "val"}
    assert all(r["0_workers"] > 0 for r in rates.values())
    assert "shortest side 400-500 px" in out and "256 px" in out and "(333-375 px)" in out
    assert json.loads((tmp_path / "data.json").read_text())["rates"] == rates
    assert len(data.expand_urls(rates["cc12m"]["where"])) == 1  # 64 samples: one shard, kept
    assert len(data.ImageFolder(rates["val"]["where"], data.eval_crop(64))) == 64


def saved_tensor_bytes(model, batch_size):
    """Bytes of the activations autograd saves in a training forward, counted independently of
    torch.profiler: each storage a saved_tensors_hooks pack sees, once, parameters not counted."""
    images, tokens = bench.synthetic_batch(model.config, batch_size, torch.device("cpu"),
                                           torch.Generator().manual_seed(0))
    params, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        M.clip_loss(*model(images, tokens))
    return sum(n for ptr, n in saved.items() if ptr not in params)


@pytest.fixture(scope="module")
def tiny_memory():
    """(rows, printed text) of `bench.py memory` on the tiny preset, measured whole."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = bench.main(["memory", "--models", "tiny", "--ratios", "0", "0.75", "--full-depth"])
    return rows, out.getvalue()


def test_memory_per_sample_is_what_autograd_saves_and_checkpointing_saves_less(tiny_memory):
    rows, out = tiny_memory
    assert [(r["ratio"], r["checkpointed"]) for r in rows] == [(0, False), (0, True), (0.75, False),
                                                               (0.75, True)]
    plain, checkpointed, masked, _ = rows
    torch.manual_seed(0)
    model = M.create_model("tiny").train()
    by_hooks = (saved_tensor_bytes(model, 4) - saved_tensor_bytes(model, 2)) / 2
    # the same bytes, but for the input images (saved by the patch embedding, allocated before the
    # forward that the profiler sees) and the features and logits (alive, but not saved)
    assert plain["fp32_saved"] == pytest.approx(by_hooks, rel=0.05)
    assert plain["fp32_saved"] > 4 * checkpointed["fp32_saved"]
    # backward frees what it used as it goes: the peak is where it starts, unless a block is
    # recomputed there
    assert plain["fp32_peak"] == pytest.approx(plain["fp32_saved"], rel=0.01)
    assert checkpointed["fp32_peak"] > 1.5 * checkpointed["fp32_saved"]
    assert plain["fp32_saved"] > masked["fp32_saved"] > plain["fp32_saved"] / 4  # 16 of 64 patches
    # bf16 as CUDA runs it: the layer norms' inputs stay fp32, attention saves bf16 (the CPU's
    # own fp32 attention would save 72% of fp32's bytes)
    assert 0.5 * plain["fp32_saved"] < plain["bf16_saved"] < 0.6 * plain["fp32_saved"]
    params = sum(p.numel() for p in model.parameters())
    assert plain["largest_bf16_batch"]["DDP 1"]["80 GB"] == bench.largest_batch(
        0.9 * 80e9 - 18 * params, plain["bf16_peak"], 1)
    assert "tiny ratio 0.75, checkpointed" in out and "Largest bf16 batch per 141 GB GPU" in out


def test_activations_extrapolated_from_one_block_a_tower_are_the_whole_models(tiny_memory):
    whole = tiny_memory[0][3]  # 4 blocks a tower, 75% masking, checkpointed
    extrapolated = bench.activations(M.PRESETS["tiny"], 0.75, checkpointed=True)
    for key in ("fp32_saved", "bf16_saved"):
        assert extrapolated[key] == pytest.approx(whole[key], rel=1e-3)
    # the peak over the saved bytes at the shallowest: at most a tenth over the whole model's
    assert whole["fp32_peak"] <= extrapolated["fp32_peak"] <= 1.1 * whole["fp32_peak"]


def test_ddp_holds_18_bytes_a_parameter_on_every_rank_and_fsdp_a_share():
    cfg = M.PRESETS["ViT-bigG-14"]
    params = 2_539_567_105
    assert bench.state_bytes(cfg, "DDP", 1) == bench.state_bytes(cfg, "DDP", 64) == 18 * params
    whole = [bench.state_bytes(cfg, "FSDP", w) - 16 * params / w for w in (1, 8, 64)]
    # what is whole at once, 8 bytes a parameter: the root, 68.5M parameters (token embedding
    # 49408 x 1280 = 63.2M, projections 1664 x 1280 and 1280 x 1280, patch embedding 3 x 14 x 14 x
    # 1664, positions, norms, the logit scale) and two image blocks, 38.4M each (q, k, v and out
    # 4 x 1664^2, MLP 2 x 1664 x 8192, biases and norms)
    assert whole[0] == whole[1] == whole[2] == 8 * (68_526_081 + 2 * 38_361_728)
    assert bench.state_bytes(cfg, "FSDP", 64) < 2e9 < 40e9 < bench.state_bytes(cfg, "DDP", 1)


@pytest.mark.parametrize("budget, per_sample, ranks", [(72e9, 6e6, 1), (72e9, 6e6, 64),
                                                        (1e9, 2e8, 8), (5e6, 6e6, 1)])
def test_the_largest_batch_is_the_last_whose_activations_and_logits_fit(budget, per_sample, ranks):
    batch = bench.largest_batch(budget, per_sample, ranks)
    held = lambda b: per_sample * b + 16 * ranks * b * b  # noqa: E731
    assert held(batch) <= budget < held(batch + 1)
    assert bench.largest_batch(-1.0, per_sample, ranks) == 0  # the states alone do not fit


def test_compile_seconds_are_reported_per_row(tmp_path):
    rows = bench.main(TINY + ["--ratios", "0.5", "--compile", "--warmup", "2"])
    assert all(r["compile_s"] is not None and r["compile_s"] >= 0 for r in rows)
    assert rows[0]["compile_s"] > 1  # the first row compiles the blocks (seconds on a CPU)
    assert all(r["compile_s"] is None for r in bench.main(TINY + ["--ratios", "0.5"]))


def test_the_gpu_check_small_mode_runs_every_part_and_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("GDMFLIP_DATA", str(tmp_path / "cache"))  # the built-in dataset, small
    results = bench.main(["gpu", "--out", str(tmp_path / "out"), "--small"])
    assert [r["part"] for r in results] == list(bench.PART_LIMITS_S)
    assert all(r["status"] == "ok" for r in results), results
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert all(f"| {part} | ok |" in summary for part in bench.PART_LIMITS_S)
    assert "samples/s" in summary and "images/s" in summary and "top-1" in summary
    for name in ("step.json", "eval.json", "summary.json", "data/data.json", "quick_start.log"):
        assert (tmp_path / "out" / name).exists(), name


def test_a_failing_or_hanging_gpu_check_part_loses_nothing_else(tmp_path):
    check = bench.new_check(str(tmp_path), small=True, deadline=time.time() + 60)
    bench.run_part(check, "preflight", lambda check: 1 / 0)  # a bug in a part
    check.limit = 1
    with pytest.raises(bench.PartFailed, match="timed out after 1 s"):  # killed, not waited for
        bench.run_command(check, "data", [sys.executable, "-c", "import time; time.sleep(60)"])
    bench.run_part(check, "data", lambda check: {"it": "ran"})  # the next part still runs
    check.deadline = time.time()
    bench.run_part(check, "step", lambda check: {"it": "ran"})  # the check's time spent: skipped
    assert [r["status"] for r in check.results] == [
        "failed: ZeroDivisionError: division by zero", "ok", "skipped: the check's time is spent"]
    assert "| data | ok |" in (tmp_path / "summary.md").read_text()
