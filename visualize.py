"""
Figures: the paper's sigma comparison (which patches GDM-FLIP keeps) and training curves from
metrics.jsonl logs.

    python visualize.py  # -> docs/sigma_comparison.png, the figure in the README
    python visualize.py --out fig.pdf --sigma 0.1 0.2 0.8 --ratio 0.5 --image my_photo.jpg
    python visualize.py coverage --table  # -> docs/sigma_coverage.png: patches kept < 1%, by sigma
    python visualize.py curves logs/flip/metrics.jsonl logs/gdm-flip/metrics.jsonl --out curves.png
    python visualize.py compute logs/repro/centered-{reclip-32px,gdmflip-0.75}-s0-tuned
    python visualize.py centred caltech101=DIR scene15=DIR --builtin --table  # docs/centredness.png

The comparison figure has one column per masking: (a) FLIP's random masking, then GDM-FLIP's
Gaussian masking for each sigma. Top row: one sample of masking.keep_indices drawn over a
photograph, masked patches blanked grey. Bottom row: the keep probability of every patch,
*estimated* by counting how often keep_indices keeps it over many samples, so the figure shows what
the code does, not what a formula says it should do. PNG or PDF, from the --out file name.

The compute figure is FLIP's: zero-shot top-1 against training compute (FLOPs of the tokens each run
encodes, model.flops_per_sample) and against wall time, one curve per run folder; a run tuned from
another (--pretrained) continues its source's curve, so RECLIP and masking are compared over
pre-training and tuning together.
"""

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import cbook  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import masking  # noqa: E402
import model as M  # noqa: E402
import photographer  # noqa: E402

PATCH_PX = 16  # pixels per patch, as in ViT-B/16: grid 14 -> a 224 px image
MASKED_GREY = 0.5  # what a dropped patch looks like (RGB in [0, 1])
# keep-rate estimate std <= sqrt(0.25 / 4000) ~ 0.008, well under one colour-bar step
MC_SAMPLES = 4000
# a portrait that ships with matplotlib's sample data: nothing to download
DEFAULT_IMAGE = "grace_hopper.jpg"


# ----------------------------------------------------------------------------- helpers shared by
# the figures


def load_image(path, size):
    """(size, size, 3) float array in [0, 1]: the photograph centre-cropped to a square, then
    resized."""
    path = path or cbook.get_sample_data(DEFAULT_IMAGE, asfileobj=False)
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        sys.exit(f"visualize.py: error: cannot read image {path}: {e}")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255


def keep_rate_map(grid, ratio, mode, sigma, samples=MC_SAMPLES, seed=0):
    """(G, G) fraction of `samples` draws of masking.keep_indices in which each patch was kept."""
    g = torch.Generator().manual_seed(seed)
    keep = masking.keep_indices(samples, grid, ratio, mode, sigma, generator=g)  # (samples, K)
    # (G*G,) times each patch was kept
    counts = torch.bincount(keep.flatten(), minlength=grid * grid).double()
    return (counts / samples).view(grid, grid)


def draw_masked_image(ax, image, keep, grid):
    """Show `image` (S, S, 3) on `ax` with every patch not in `keep` (K,) painted grey."""
    kept = torch.zeros(grid * grid, dtype=torch.bool)
    kept[keep] = True
    patch = image.shape[0] // grid
    # patch -> pixels
    kept_px = np.kron(kept.view(grid, grid).numpy(), np.ones((patch, patch), dtype=bool))  # (S, S)
    ax.imshow(np.where(kept_px[..., None], image, MASKED_GREY))
    ax.set_axis_off()


def draw_heat_map(ax, rates):
    """Show a (G, G) keep-rate map on `ax` on a fixed 0..1 scale, so the columns can be compared;
    returns the image."""
    im = ax.imshow(rates.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


# ----------------------------------------------------------------------------- the sigma comparison


def sigma_comparison(image=None, ratio=0.5, sigmas=(0.1, 0.2, 0.8), grid=14, seed=0,
                     samples=MC_SAMPLES):
    """The comparison figure: columns random, gaussian(sigma) ...; rows one masked sample, estimated
    keep rates."""
    photo = load_image(image, grid * PATCH_PX)
    columns = [("random", 0.2, "(a) random masking (FLIP)")]  # sigma is unused by random masking
    columns += [("gaussian", s, f"({chr(ord('b') + i)}) Gaussian, sigma = {s:g}\n"
                                f"(a variance: std = {math.sqrt(s):.2f})")
                for i, s in enumerate(sigmas)]
    fig, axes = plt.subplots(2, len(columns), figsize=(2.4 * len(columns) + 1, 5.6), squeeze=False,
                             # constrained: the colour bar takes room from the last column only
                             layout="constrained")
    g = torch.Generator().manual_seed(seed)
    for col, (mode, sigma, title) in enumerate(columns):
        keep = masking.keep_indices(1, grid, ratio, mode, sigma, generator=g)[0]  # (K,) one sample
        draw_masked_image(axes[0, col], photo, keep, grid)
        axes[0, col].set_title(title, fontsize=9)
        im = draw_heat_map(axes[1, col], keep_rate_map(grid, ratio, mode, sigma, samples, seed))
    axes[1, 0].set_ylabel(f"keep rate over {samples} masks", fontsize=9)
    fig.colorbar(im, ax=axes[:, -1].tolist(), shrink=0.6, label="P(patch kept)")
    fig.suptitle(f"{ratio:.0%} of {grid} x {grid} patches masked. The paper's sigma is the "
                 "Gaussian's covariance diagonal,\ni.e. a variance, in units of half the image "
                 "width (centres on linspace(-1, 1, G)), as in its code", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- training curves


def read_metrics(path):
    """The records of a metrics.jsonl written by train.py: one JSON object per line (blank lines
    skipped)."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        sys.exit(f"visualize.py: error: cannot read {path}: {e.strerror}")
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"visualize.py: error: {path}:{n} is not JSON: {e.msg}")
    return records


def series(records, x, y):
    """(xs, ys) from the records that have both keys with a finite number (train and eval lines mix
    in one log)."""
    # train.py may log "mfu": null
    ok = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    pairs = [(r[x] / (60 if x == "time" else 1), r[y]) for r in records
             if ok(r.get(x)) and ok(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def training_curves(paths):
    """Loss (top row) and every *top1* metric (bottom row) against step (left) and wall time
    (right); a colour a run."""
    # logs/<name>/...
    runs = [(os.path.basename(os.path.dirname(os.path.abspath(p))), read_metrics(p)) for p in paths]
    # one line style per metric across all runs (a FLIP run logs zeroshot_masked_top1, an unmasked
    # one does not)
    keys = sorted({k for _, records in runs for r in records for k in r if "top1" in k},
                  key=lambda k: (k != "zeroshot_top1", k))  # the headline metric first, drawn solid
    styles = dict(zip(keys, ["-o", "--s", ":^", "-.v"] * len(keys)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for i, (run, records) in enumerate(runs):
        for col, x in enumerate(["step", "time"]):
            axes[0, col].plot(*series(records, x, "loss"), color=f"C{i % 10}", label=run)
            for key in keys:
                xs, ys = series(records, x, key)
                if xs:
                    axes[1, col].plot(xs, ys, styles[key], color=f"C{i % 10}", markersize=3,
                                      label=f"{run}: {key}")
    for col, xlabel in enumerate(["step", "wall time (min)"]):
        axes[0, col].set(xlabel=xlabel, ylabel="contrastive loss")
        axes[1, col].set(xlabel=xlabel, ylabel="zero-shot top-1")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- accuracy against
# compute


def read_run(run_dir):
    """(args.json of a train.py run folder, its zero-shot evaluation records)."""
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            args = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"visualize.py: error: {run_dir} is not a train.py run folder (args.json: {e})")
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return args, [r for r in records if "zeroshot_top1" in r]


def flops_per_step(args):
    """Training FLOPs of one optimizer step of a run: 3 x forward of the tokens it encodes (patches
    kept, text tokens kept with --text-length), over the global batch, as train.py counts them for
    MFU."""
    per_sample = M.train_flops_per_sample(M.CLIPConfig(**args["config"]), args["ratio"],
                                          args.get("text_length"))
    return per_sample * args["batch_size"] * args["accum_freq"] * args.get("world_size", 1)


def run_label(args):
    size = args["config"]["image_size"]
    if args["mask"] != "none":
        return f"{'FLIP' if args['mask'] == 'random' else 'GDM-FLIP'} {args['ratio']:.1%}"
    return f"RECLIP {size} px" if size < M.PRESETS[args["model"]].image_size else "CLIP"


def compute_points(run_dir):
    """(label, FLOPs, minutes, top-1) at each evaluation of a run, after those of the run it was
    tuned from."""
    args, records = read_run(run_dir)
    label, flops0, minutes0, points = run_label(args), 0.0, 0.0, ([], [], [])
    if args.get("pretrained"):  # logs/<source>/checkpoints/epoch_K.pt: continue the source's curve
        source = os.path.dirname(os.path.dirname(os.path.abspath(args["pretrained"])))
        if os.path.isfile(os.path.join(source, "args.json")):
            label, *points = compute_points(source)
            label += " + tuning"
            flops0, minutes0 = (points[0][-1], points[1][-1]) if points[0] else (0.0, 0.0)
    per_step = flops_per_step(args)
    return (label, points[0] + [flops0 + r["step"] * per_step for r in records],
            points[1] + [minutes0 + r["time"] / 60 for r in records],
            points[2] + [r["zeroshot_top1"] for r in records])


def compute_curves(run_dirs):
    """Zero-shot top-1 (unmasked inference) against training FLOPs (left) and wall time (right); a
    curve a run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, run_dir in enumerate(run_dirs):
        label, flops, minutes, top1 = compute_points(run_dir)
        axes[0].plot(flops, top1, "-o", color=f"C{i % 10}", markersize=3, label=label)
        axes[1].plot(minutes, top1, "-o", color=f"C{i % 10}", markersize=3, label=label)
    for ax, xlabel in zip(axes, ["training compute (FLOPs)", "wall time (min)"]):
        ax.set(xlabel=xlabel, ylabel="zero-shot top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- coverage against sigma

COVERAGE_RATIOS = (0.5, 0.75, 0.918)  # the paper's ratios
COVERAGE_SIGMAS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def coverage_table(grids=(14, 8), ratios=COVERAGE_RATIOS, sigmas=COVERAGE_SIGMAS, samples=4000,
                   seed=0):
    """Markdown rows: per grid and ratio, for each sigma the share of patches kept less than 1% of
    the time and the smallest keep probability (masking.coverage), then the share measured over
    `samples` draws of keep_indices; then a table of masking.position_shift."""
    head = ["| grid, ratio (kept) | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
            "|---|" + "---|" * len(sigmas)]
    covered, shifted = list(head), list(head)
    for grid in grids:
        for ratio in ratios:
            cells = []
            for sigma in sigmas:
                share, least = masking.coverage(grid, ratio, sigma)
                drawn = (keep_rate_map(grid, ratio, "gaussian", sigma, samples, seed) < 0.01)
                cells.append(f"{share:.0%} / {least:.3f} ({drawn.double().mean().item():.0%})")
            shifts = [f"{masking.position_shift(grid, ratio, sigma):.2f}" for sigma in sigmas]
            row = f"| {grid} x {grid}, {ratio:.1%} ({masking.num_kept(grid, ratio)}) | "
            covered.append(row + " | ".join(cells) + " |")
            shifted.append(row + " | ".join(shifts) + " |")
    return "\n".join(covered + ["", "position shift (masking.position_shift):", ""] + shifted)


def coverage_figure(grids=(14, 8), ratios=COVERAGE_RATIOS):
    """Against sigma, a column per grid: the share of the patches kept less than 1% of the time
    (top), the smallest keep probability (middle) and the position shift (bottom), a curve per
    ratio, `--sigma auto`'s choice dotted."""
    sigmas = np.geomspace(0.03, 3, 60)
    fig, axes = plt.subplots(3, len(grids), figsize=(5.2 * len(grids), 9.0), squeeze=False,
                             sharex=True)
    for col, grid in enumerate(grids):
        for i, ratio in enumerate(ratios):
            share, least = zip(*[masking.coverage(grid, ratio, s) for s in sigmas])
            label = f"{ratio:.1%} masking ({masking.num_kept(grid, ratio)} kept)"
            axes[0, col].plot(sigmas, share, color=f"C{i}", label=label)
            axes[1, col].plot(sigmas, np.maximum(least, 1e-4), color=f"C{i}")
            shift = [masking.position_shift(grid, ratio, s) for s in sigmas]
            axes[2, col].plot(sigmas, shift, color=f"C{i}")
            auto = masking.auto_sigma(grid, ratio)
            for ax in axes[:, col]:
                ax.axvline(auto, color=f"C{i}", linestyle=":")
        for ax in axes[:, col]:
            ax.axvline(0.2, color="grey", linestyle="--", linewidth=1)
            ax.grid(alpha=0.3)
        axes[0, col].set(title=f"{grid} x {grid} patches", ylabel="share of patches kept < 1%",
                         ylim=(-0.02, 1))
        axes[0, col].legend(fontsize=8)
        axes[1, col].axhline(0.01, color="black", linewidth=0.8)
        axes[1, col].set(xscale="log", yscale="log",
                         ylabel="smallest keep probability (floor 1e-4)")
        axes[2, col].set(xlabel="sigma (a variance)", ylim=(0, 1),
                         ylabel="position shift (train vs unmasked)")
    fig.suptitle("Gaussian masking's coverage of the patch grid (dashed: the paper's sigma 0.2; "
                 "dotted: --sigma auto)", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- how centred a set
# of photographs is, from its pixels: where two plain stand-ins for saliency put an image's content,
# and how much of it Gaussian masking keeps against random masking's 1 - ratio
CENTRED_SIZE, CENTRED_GRID = 64, 8  # what the tiny preset sees: 64 px, 8 x 8 patches of 8 px
BINOMIAL_5 = np.array([1, 4, 6, 4, 1]) / 16  # a 5-tap Gaussian, as Achanta et al. blur


def edge_energy(image):
    """(S, S) gradient magnitude of an (S, S, 3) image in [0, 1]: its edges and texture. Finds an
    object against a plain or blurred ground; on a textured ground it finds the ground."""
    gy, gx = np.gradient(image.mean(-1))
    return np.hypot(gx, gy)


def colour_contrast(image):
    """(S, S) distance of each (slightly blurred) pixel's colour from the image's mean colour:
    frequency-tuned saliency (Achanta et al., CVPR 2009, in RGB). Finds a flat-coloured subject on
    a textured ground; a white or sky ground, far from the mean colour, counts as content too."""
    blurred = image
    for axis in (0, 1):  # separable blur, edges repeated
        pad = [(2, 2) if a == axis else (0, 0) for a in range(3)]
        padded, n = np.pad(blurred, pad, mode="edge"), image.shape[axis]
        blurred = sum(w * np.take(padded, range(i, i + n), axis=axis)
                      for i, w in enumerate(BINOMIAL_5))
    return np.linalg.norm(blurred - image.reshape(-1, 3).mean(0), axis=-1)


SALIENCY = {"edge energy": edge_energy, "colour contrast": colour_contrast}


def centredness(content, keep):
    """(offset, kept) of an (S, S) content map, None for an empty one. offset: its centroid's
    distance from the image centre in half-widths (0 the centre, 1 the middle of a side; content
    spread evenly has its centroid at the centre too); kept: the share of it in the patches that
    a (G, G) keep probability map keeps, in expectation (random masking keeps 1 - ratio of any
    image, Gaussian masking more of a centred one)."""
    total, size, grid = content.sum(), content.shape[0], keep.shape[0]
    if total <= 0:
        return None
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres on [-1, 1]
    cx, cy = (content.sum(0) * coords).sum() / total, (content.sum(1) * coords).sum() / total
    per_patch = content.reshape(grid, size // grid, grid, size // grid).sum((1, 3))  # (G, G)
    return float(np.hypot(cx, cy)), float((per_patch * keep).sum() / total)


def set_images(source, size=CENTRED_SIZE):
    """(name, (S, S, 3) image in [0, 1]) of every image of a folder (any depth: class folders or
    not) or of shards, as evaluation sees them (data.eval_crop: shortest side to S, centre crop);
    unreadable ones are left out."""
    crop = data.eval_crop(size)
    if os.path.isdir(source):
        items = ((os.path.relpath(os.path.join(d, f), source), os.path.join(d, f))
                 for d, _, fs in sorted(os.walk(source)) for f in sorted(fs)
                 if f.rsplit(".", 1)[-1].lower() in data.FOLDER_IMAGE_EXTS)
        read = lambda path: open(path, "rb").read()  # noqa: E731
    else:
        items = ((s["__key__"], s) for url in data.expand_urls(source) for s in data.read_shard(url)
                 if s is not None)
        read = lambda s: next(s[e] for e in data.IMAGE_EXTS if e in s)  # noqa: E731
    for name, item in items:
        try:
            image = crop(data.open_image(read(item)))  # (3, S, S) uint8
        except Exception:  # a broken file: not part of the measure
            continue
        yield name, image.permute(1, 2, 0).numpy().astype(np.float32) / 255


def measure_set(source, ratio=0.5, sigma=0.2):
    """Per saliency measure: ({image name: (offset, kept)}, the set's mean (G, G) content map, each
    image's normalised to mean 1 a patch: 1 everywhere is content spread evenly). kept: at `ratio`
    and `sigma`, the training run's."""
    keep = masking.keep_probability(CENTRED_GRID, ratio, "gaussian", sigma).numpy()  # (G, G)
    per_image, maps = {m: {} for m in SALIENCY}, {m: [] for m in SALIENCY}
    for name, image in set_images(source):
        for measure, saliency in SALIENCY.items():
            content = saliency(image)
            if (found := centredness(content, keep)) is not None:
                per_image[measure][name] = found
                g, size = CENTRED_GRID, content.shape[0]
                patches = content.reshape(g, size // g, g, size // g).sum((1, 3))
                maps[measure].append(patches * g * g / patches.sum())
    if not maps["edge energy"]:
        raise ValueError(f"{source}: no readable image to measure")
    return {m: (per_image[m], np.mean(maps[m], axis=0)) for m in SALIENCY}


def centred_table(measured, ratio=0.5):
    """A Markdown table: per set and saliency measure, the images, the mean centroid offset, the
    mean share of content Gaussian masking keeps at `ratio` (random masking: 1 - ratio) and the
    share of images where it keeps more than random masking."""
    lines = [f"| set | images | measure | centroid offset | content kept at {ratio:.0%} (random "
             f"{1 - ratio:.2f}) | images above random |", "|---|---|---|---|---|---|"]
    for label, by_measure in measured.items():
        for measure, (per_image, _) in by_measure.items():
            offset, kept = np.array(list(per_image.values())).T
            lines.append(f"| {label} | {len(per_image)} | {measure} | {offset.mean():.3f} | "
                         f"{kept.mean():.3f} | {(kept > 1 - ratio).mean():.0%} |")
    return "\n".join(lines)


def centred_figure(measured, ratio=0.5):
    """One row per saliency measure: each set's mean content map over the 8 x 8 patches (1 = an
    even share), then the distribution over its images of the content Gaussian masking keeps at
    `ratio` against random masking's 1 - ratio."""
    n, measures = len(measured), list(SALIENCY)
    fig, axes = plt.subplots(len(measures), n + 1, figsize=(1.9 * n + 4.5, 2.3 * len(measures)),
                             layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": [1] * n + [2.6]})
    for row, measure in enumerate(measures):
        for col, (label, by_measure) in enumerate(measured.items()):
            ax = axes[row, col]
            im = ax.imshow(by_measure[measure][1], cmap="magma", vmin=0, vmax=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
            if col == 0:
                ax.set_ylabel(measure, fontsize=9)
        ax = axes[row, -1]
        for label, by_measure in measured.items():
            kept = np.sort([k for _, k in by_measure[measure][0].values()])
            ax.plot(kept, np.arange(1, len(kept) + 1) / len(kept), label=label)
        ax.axvline(1 - ratio, color="grey", linestyle="--", label="random masking")
        ax.set_xlabel(f"share of its {measure} that Gaussian masking keeps "
                      f"({ratio:.0%}, sigma 0.2)", fontsize=8)
        ax.set_ylabel("fraction of images", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.colorbar(im, ax=axes[:, :n].ravel().tolist(), shrink=0.8, location="left",
                 label="content / even share")
    fig.suptitle(f"How centred each set is, from its pixels ({CENTRED_SIZE} px centre crops, "
                 f"{CENTRED_GRID} x {CENTRED_GRID} patches)", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    if argv and argv[0] == "coverage":
        p = data.OneLineParser(prog="visualize.py coverage", description=coverage_figure.__doc__)
        p.add_argument("--out", default="docs/sigma_coverage.png",
                       help="output file; .png, .pdf or .svg, from the name")
        p.add_argument("--table", action="store_true", help="also print the coverage table")
        args = p.parse_args(argv[1:])
        args.coverage = True
        return args
    if argv and argv[0] == "compute":
        p = data.OneLineParser(prog="visualize.py compute", description=compute_curves.__doc__)
        p.add_argument("runs", nargs="+", help="train.py run folders (args.json and metrics.jsonl)")
        p.add_argument("--out", default="compute.png",
                       help="output file; .png, .pdf or .svg, from the name")
        return p.parse_args(argv[1:])
    if argv and argv[0] == "centred":
        p = data.OneLineParser(prog="visualize.py centred", description=centred_figure.__doc__)
        p.add_argument("sets", nargs="*", metavar="LABEL=SOURCE", help="a set of photographs: an "
                       "image folder (class folders or not) or shards, e.g. caltech101=DIR")
        p.add_argument("--builtin", action="store_true", help="also the built-in dataset's test "
                       "splits, one per layout (centered, uniform, edge)")
        p.add_argument("--out", default="docs/centredness.png",
                       help="output file; .png, .pdf or .svg, from the name")
        p.add_argument("--table", action="store_true", help="also print the table of figures")
        args = p.parse_args(argv[1:])
        if not args.sets and not args.builtin:
            p.error("give sets as LABEL=SOURCE, or --builtin")
        if bad := [s for s in args.sets if "=" not in s]:
            p.error(f"a set is LABEL=SOURCE (e.g. caltech101=data/caltech101-test), got {bad[0]}")
        args.sets = dict(s.split("=", 1) for s in args.sets)
        return args
    if argv and argv[0] == "curves":
        p = data.OneLineParser(prog="visualize.py curves",
                               description="Training curves from metrics.jsonl logs.")
        p.add_argument("logs", nargs="+",
                       help="metrics.jsonl files from train.py; the legend is each parent folder")
        p.add_argument("--out", default="curves.png",
                       help="output file; .png, .pdf or .svg, from the name")
        return p.parse_args(argv[1:])
    p = data.OneLineParser(prog="visualize.py", description="The sigma comparison figure (or "
                           "`visualize.py curves LOG ...`, `visualize.py compute RUN ...`).")
    p.add_argument("--out", default="docs/sigma_comparison.png",
                   help="output file; .png, .pdf or .svg, from the name")
    p.add_argument("--image", default=None,
                   help=f"photograph to mask (default: matplotlib's sample {DEFAULT_IMAGE})")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of patches masked (paper's figure: 0.5)")
    p.add_argument("--sigma", type=float, nargs="+", default=[0.1, 0.2, 0.8],
                   help="the paper's sigma (a variance) of each Gaussian column")
    p.add_argument("--grid", type=int, default=14,
                   help="patches per side (14 = 224 px at patch 16)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the masks drawn and of the keep-rate estimate")
    p.add_argument("--samples", type=int, default=MC_SAMPLES,
                   help="masks drawn to estimate each keep-rate map")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if hasattr(args, "coverage"):
            fig = coverage_figure()
            if args.table:
                print(coverage_table())
        elif hasattr(args, "sets"):
            sources = args.sets | ({layout: photographer.builtin_dataset(layout)["test"]
                                    for layout in photographer.LAYOUTS} if args.builtin else {})
            measured = {label: measure_set(source) for label, source in sources.items()}
            fig = centred_figure(measured)
            if args.table:
                print(centred_table(measured))
        elif hasattr(args, "runs"):
            fig = compute_curves(args.runs)
        elif hasattr(args, "logs"):
            fig = training_curves(args.logs)
        else:
            if args.samples < 1:
                raise ValueError(f"--samples must be >= 1, got {args.samples}")
            fig = sigma_comparison(args.image, args.ratio, args.sigma, args.grid, args.seed,
                                   args.samples)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        fig.savefig(args.out, dpi=100, bbox_inches="tight")  # format from the file name
        plt.close(fig)
    # bad --ratio / --sigma / --grid (from masking.py) or an unknown --out format
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"visualize.py: error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
