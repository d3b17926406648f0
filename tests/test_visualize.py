"""The contract of visualize.py: the figure shows keep_indices' own keep rates; the curves read
train.py's logs."""

import json
from dataclasses import asdict
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

import masking
import model as M
import visualize

# masks per keep-rate map in these tests (the figure itself uses visualize.MC_SAMPLES)
SAMPLES = 1000


def tolerance(p, samples=SAMPLES):
    """4 standard errors of a keep rate estimated from `samples` masks, plus the ~0.01 error that
    keep_probability's large-N approximation has at G = 14 (masking.py's docstring)."""
    return 4 * math.sqrt(p * (1 - p) / samples) + 0.01


def check_image_file(path, magic):
    data = path.read_bytes()
    assert data.startswith(magic), data[:8]
    return data


def test_cli_writes_a_png_of_the_comparison_figure(tmp_path):
    out = tmp_path / "fig.png"
    visualize.main(["--out", str(out), "--samples", "200"])
    check_image_file(out, b"\x89PNG\r\n\x1a\n")
    img = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert img.shape[0] > 300 and img.shape[1] > 600  # two rows of four panels
    # a photograph, not a blank page
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 1000


def test_cli_writes_a_pdf_when_the_name_says_so(tmp_path):
    out = tmp_path / "sub" / "fig.pdf"  # missing folders are created
    visualize.main(["--out", str(out), "--samples", "50", "--sigma", "0.2", "--grid", "7"])
    assert len(check_image_file(out, b"%PDF-")) > 10_000


@pytest.mark.parametrize("args", [["--ratio", "1.5"], ["--sigma", "0"], ["--grid", "0"],
                                  ["--image", "/no/such.jpg"], ["--out", "fig.notaformat"]])
def test_bad_arguments_exit_with_a_message(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        visualize.main(args + ["--samples", "10"])
    assert str(e.value).startswith("visualize.py: error:")


def test_heat_maps_agree_with_keep_probability():
    sigmas = (0.1, 0.2, 0.8)
    fig = visualize.sigma_comparison(ratio=0.5, sigmas=sigmas, grid=14, samples=SAMPLES)
    heat_maps = [ax.images[0].get_array() for ax in fig.axes[4:8]]  # row-major axes: the bottom row
    plt.close(fig)
    columns = [("random", 0.2)] + [("gaussian", s) for s in sigmas]
    for rates, (mode, sigma) in zip(heat_maps, columns):
        expected = masking.keep_probability(14, 0.5, mode, sigma).numpy()
        # centre and corners
        for i, j in [(6, 6), (6, 7), (7, 6), (7, 7), (0, 0), (0, 13), (13, 0), (13, 13)]:
            error = abs(rates[i, j] - expected[i, j])
            assert error < tolerance(expected[i, j]), (mode, sigma, i, j)
    # the paper's point: the smaller sigma, the more the kept patches crowd the centre
    centre_minus_corner = [m[6, 6] - m[0, 0] for m in heat_maps[1:]]
    assert centre_minus_corner[0] > 0.5 and centre_minus_corner[2] < 0.3


def test_keep_rate_map_counts_what_keep_indices_returns(monkeypatch):
    # an estimate of keep_indices' behaviour, not a formula: a fake that always keeps the top half
    # shows up as such
    def top_half(batch_size, grid_size, ratio, mode, sigma=0.2, device=None, generator=None):
        return torch.arange(grid_size * grid_size // 2).expand(batch_size, -1)
    monkeypatch.setattr(masking, "keep_indices", top_half)
    rates = visualize.keep_rate_map(6, 0.5, "gaussian", sigma=0.2, samples=10)
    assert (rates[:3] == 1).all() and (rates[3:] == 0).all()


def test_random_keep_rate_map_is_uniform_at_one_minus_ratio():
    rates = visualize.keep_rate_map(14, 0.75, "random", sigma=0.2, samples=SAMPLES)
    assert rates.shape == (14, 14)
    # every mask keeps exactly K patches
    assert rates.sum().item() == pytest.approx(masking.num_kept(14, 0.75))
    # all 196 cells, ~1% chance each
    assert (rates - 0.25).abs().max().item() < 4.5 * math.sqrt(0.25 * 0.75 / SAMPLES)


def test_masked_patches_are_grey_and_kept_patches_untouched():
    grid, patch = 4, 3
    image = np.random.default_rng(0).random((grid * patch, grid * patch, 3)).astype(np.float32)
    # (row, col) (0, 1), (1, 2), (2, 0): not symmetric under a transpose
    keep = torch.tensor([1, 6, 8])
    fig, ax = plt.subplots()
    visualize.draw_masked_image(ax, image, keep, grid)
    shown = ax.images[0].get_array()
    plt.close(fig)
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        block = np.asarray(shown[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch])
        want = (image[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] if p in keep
                else visualize.MASKED_GREY)
        np.testing.assert_array_equal(block, np.broadcast_to(want, block.shape))


def write_log(path, top1):
    """A small metrics.jsonl in train.py's format: training windows and end-of-epoch evaluations,
    interleaved."""
    path.parent.mkdir(parents=True)
    lines = []
    for epoch, acc in enumerate(top1, 1):
        for step in (10 * epoch - 5, 10 * epoch):
            lines.append({"step": step, "epoch": step / 10, "loss": 5.0 / step, "lr": 1e-3,
                          "logit_scale": 14.3, "samples_per_s": 100.0, "mfu": None, "skipped": 0,
                          "time": 6.0 * step})
        lines.append({"step": 10 * epoch, "epoch": epoch, "zeroshot_top1": acc,
                      "zeroshot_top5": 1.0, "zeroshot_masked_top1": acc / 2, "time": 60.0 * epoch})
    # a trailing blank line is tolerated
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    return str(path)


def test_curves_plot_loss_and_every_top1_for_each_run(tmp_path):
    flip = write_log(tmp_path / "flip" / "metrics.jsonl", [0.2, 0.4])
    gdm = write_log(tmp_path / "gdm-flip" / "metrics.jsonl", [0.3, 0.5])
    out = tmp_path / "curves.png"
    visualize.main(["curves", flip, gdm, "--out", str(out)])
    check_image_file(out, b"\x89PNG\r\n\x1a\n")

    fig = visualize.training_curves([flip, gdm])
    (loss_step, loss_time), (top1_step, top1_time) = np.asarray(fig.axes).reshape(2, 2)
    assert [line.get_label() for line in loss_step.lines] == ["flip", "gdm-flip"]
    # evaluation lines have no loss: skipped
    assert list(loss_step.lines[0].get_xdata()) == [5, 10, 15, 20]
    assert list(loss_time.lines[0].get_xdata()) == [0.5, 1.0, 1.5, 2.0]  # wall time in minutes
    labels = {line.get_label(): line for line in top1_step.lines}
    assert set(labels) == {f"{run}: {key}" for run in ("flip", "gdm-flip")
                           for key in ("zeroshot_top1", "zeroshot_masked_top1")}
    assert list(labels["gdm-flip: zeroshot_top1"].get_ydata()) == [0.3, 0.5]
    assert list(labels["flip: zeroshot_masked_top1"].get_xdata()) == [10, 20]
    by_time = {line.get_label(): line for line in top1_time.lines}
    # evaluation times, in minutes
    assert list(by_time["flip: zeroshot_top1"].get_xdata()) == [1.0, 2.0]
    assert list(by_time["flip: zeroshot_top1"].get_ydata()) == [0.2, 0.4]
    plt.close(fig)


def test_curves_report_unreadable_logs(tmp_path):
    bad = tmp_path / "run" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2 is not JSON"):
        visualize.main(["curves", str(bad), "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="cannot read"):
        visualize.main(["curves", str(tmp_path / "missing.jsonl"),
                        "--out", str(tmp_path / "c.png")])


def write_run(run_dir, top1, **args):
    """A train.py run folder with args.json and two evaluations (steps 10 and 20, at 1 and 2
    minutes)."""
    cfg = asdict(M.PRESETS["tiny"]) | args.pop("config", {})
    run_dir.mkdir(parents=True)
    run_args = {"model": "tiny", "batch_size": 16, "accum_freq": 1, "world_size": 2,
                "pretrained": None, "image_size": None, "config": cfg} | args
    (run_dir / "args.json").write_text(json.dumps(run_args))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * k, "epoch": k, "zeroshot_top1": acc, "time": 60.0 * k}) + "\n"
        for k, acc in enumerate(top1, 1)))
    return str(run_dir)


def test_compute_figure_counts_the_tokens_each_run_encodes(tmp_path):
    reclip = write_run(tmp_path / "reclip", [0.1, 0.2], mask="none", ratio=0.0, image_size=32,
                       config={"image_size": 32})  # a 4 x 4 grid: 16 patches
    tuned = write_run(tmp_path / "reclip-tuned", [0.3, 0.4], mask="none", ratio=0.0,
                      pretrained=str(tmp_path / "reclip" / "checkpoints" / "epoch_2.pt"))
    flip = write_run(tmp_path / "flip", [0.15, 0.25], mask="random", ratio=0.75)  # 16 of 64 patches
    fig = visualize.compute_curves([tuned, flip])
    by_flops, by_time = fig.axes
    curves = {line.get_label(): line for line in by_flops.lines}
    assert set(curves) == {"RECLIP 32 px + tuning", "FLIP 75.0%"}
    # global batch 16 x 2 ranks; 16 patches encoded by both, 64 after tuning
    tiny = M.PRESETS["tiny"]
    step_flip = 3 * M.flops_per_sample(tiny, 16) * 32
    step_32px = 3 * M.flops_per_sample(M.CLIPConfig(**(asdict(tiny) | {"image_size": 32}))) * 32
    step_64 = 3 * M.flops_per_sample(tiny) * 32
    # the same 16 tokens, but masking patch-embeds all 64 patches before dropping
    assert step_32px < step_flip
    np.testing.assert_allclose(curves["FLIP 75.0%"].get_xdata(), [10 * step_flip, 20 * step_flip])
    # tuning continues from the source's end
    np.testing.assert_allclose(curves["RECLIP 32 px + tuning"].get_xdata(),
                               [10 * step_32px, 20 * step_32px, 20 * step_32px + 10 * step_64,
                                20 * step_32px + 20 * step_64])
    assert list(curves["RECLIP 32 px + tuning"].get_ydata()) == [0.1, 0.2, 0.3, 0.4]
    assert list(by_time.lines[0].get_xdata()) == [1.0, 2.0, 3.0, 4.0]  # minutes, the source's first
    plt.close(fig)
    out = tmp_path / "compute.png"
    visualize.main(["compute", reclip, flip, "--out", str(out)])
    check_image_file(out, b"\x89PNG\r\n\x1a\n")


def test_compute_counts_the_text_tokens_a_run_encodes():
    args = {"model": "tiny", "batch_size": 16, "accum_freq": 2, "world_size": 1, "mask": "random",
            "ratio": 0.75, "config": asdict(M.PRESETS["tiny"])}
    assert visualize.flops_per_step(args) == 3 * M.flops_per_sample(M.PRESETS["tiny"], 16) * 32
    shorter = visualize.flops_per_step(args | {"text_length": 8})  # train.py --text-length 8
    assert (shorter == 3 * M.flops_per_sample(M.PRESETS["tiny"], 16, 8) * 32
            and shorter < visualize.flops_per_step(args))


def test_coverage_figure_and_table(tmp_path, capsys):
    out = tmp_path / "coverage.png"
    visualize.main(["coverage", "--out", str(out), "--table"])
    assert out.read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert "| 14 x 14, 91.8% (16) |" in table and "| 8 x 8, 91.8% (5) |" in table
    row = next(line for line in table.splitlines() if line.startswith("| 14 x 14, 91.8%"))
    assert row.split(" | ")[3].startswith("65% / 0.000")  # sigma 0.2: 65% of patches under 1%
    shifts = table.split("position shift")[1]
    row = next(line for line in shifts.splitlines() if line.startswith("| 8 x 8, 75.0%"))
    assert row.split(" | ")[2] == f"{masking.position_shift(8, 0.75, 0.1):.2f}"  # sigma 0.1


# --------------------------------------------------------------------------------------------------
# how centred a set of photographs is
def disc_image(size=64, cx=32, cy=32, r=10, ground="plain", seed=0):
    """(S, S, 3) in [0, 1]: a flat red disc on a plain grey or a noisy (textured) ground."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 0.5) if ground == "plain" else rng.uniform(0, 1, (size, size, 3))
    yy, xx = np.mgrid[:size, :size] + 0.5
    image[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = [1.0, 0.1, 0.1]
    return image


def test_centredness_of_content_at_the_centre_in_a_corner_and_spread_evenly():
    keep = masking.keep_probability(8, 0.5, "gaussian", 0.2).numpy()
    centre, corner = np.zeros((64, 64)), np.zeros((64, 64))
    centre[24:40, 24:40], corner[:16, :16] = 1, 1
    offset, kept = visualize.centredness(centre, keep)
    assert offset == pytest.approx(0) and kept > 0.9  # the centre patches are kept near always
    offset, kept = visualize.centredness(corner, keep)
    assert offset == pytest.approx(0.75 * math.sqrt(2)) and kept < 0.4
    # content everywhere: Gaussian masking keeps what random masking keeps, 1 - ratio, whatever the
    # keep map; its centroid is the centre all the same (why offset alone misleads)
    offset, kept = visualize.centredness(np.ones((64, 64)), keep)
    assert offset == pytest.approx(0) and kept == pytest.approx(0.5)
    assert visualize.centredness(np.zeros((64, 64)), keep) is None  # a blank image: no measure


def test_each_saliency_finds_the_subject_where_the_docstring_says():
    keep = masking.keep_probability(8, 0.5, "gaussian", 0.2).numpy()

    def kept(measure, image):
        return visualize.centredness(visualize.SALIENCY[measure](image), keep)[1]

    plain, textured = disc_image(ground="plain"), disc_image(ground="textured")
    # on a plain ground both find the centred disc: its rim (edges), its colour (contrast)
    assert kept("edge energy", plain) > 0.6 and kept("colour contrast", plain) > 0.6
    # on a textured ground the edges are the ground's, everywhere; the flat disc stands out in colour
    assert kept("edge energy", textured) < 0.55 < kept("colour contrast", textured)
    # moved into a corner, the disc's content is kept less than random masking's half
    corner = disc_image(cx=12, cy=12, ground="plain")
    assert kept("edge energy", corner) < 0.5 and kept("colour contrast", corner) < 0.5


def test_centred_cli_measures_folders_and_shards_and_prints_the_table(tmp_path, capsys):
    import data

    for cls, cx in [("middle", 32), ("side", 12)]:  # a class folder per placement
        os.makedirs(tmp_path / "folder" / cls)
        for i in range(3):
            pixels = (255 * disc_image(cx=cx, seed=i)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / cls / f"{i}.png")
    (tmp_path / "folder" / "middle" / "broken.png").write_bytes(b"not an image")  # left out
    shards = data.convert(str(tmp_path / "folder"), str(tmp_path / "shards"))
    capsys.readouterr()  # convert's own line
    out = tmp_path / "centred.png"
    visualize.main(["centred", f"folder={tmp_path / 'folder'}", f"shards={shards}", "--table",
                    "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| set | images | measure | centroid offset | content kept at 50%")
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("| folder", "6", "edge energy"), ("| folder", "6", "colour contrast"),
        ("| shards", "6", "edge energy"), ("| shards", "6", "colour contrast")]
    assert rows[0][3:] == rows[2][3:]  # the same images, from folders or shards
    assert Image.open(out).size[0] > 600


@pytest.mark.parametrize("args, error", [
    (["centred"], "give sets as LABEL=SOURCE, or --builtin"),
    (["centred", "caltech101"], "a set is LABEL=SOURCE"),
    (["centred", "x=/no/such/folder"], "no such directory"),
])
def test_centred_bad_arguments_are_one_line(args, error, capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(args)
    assert error in capsys.readouterr().err + str(e.value)  # argparse's line, or sys.exit's
