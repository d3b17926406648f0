"""
Training-step throughput per masking ratio: how much faster does dropping patches make CLIP, next to
the FLOP ideal? Also the data pipelines, and the GPU check: every GPU figure in one run.

    python bench.py                                   # on a GPU: ViT-B-16, batch 256, bf16, TF32
    python bench.py --compile --check-sync            # compiled, and prove no host-device sync
    python bench.py --device cpu --compile            # the tiny preset, batch 64, on the CPU
    python bench.py --ratios 0 0.5 --json bench.json  # also write the table as JSON
    python bench.py --text-length 16 32               # also 16 and 32 of 77 text tokens (FLIP's)
    python bench.py --compile --openclip              # beside OpenCLIP's model of the same name
    python bench.py data --workers 15                 # images/s of the training and eval pipelines
    python bench.py memory                            # per rank (DDP, FSDP), per sample, fit
    python bench.py gpu --out DIR                     # the GPU check (docs/speed.md#the-gpu-check)
    python bench.py quickstart                        # the README's first command, in parts

A step is train.py's own (train.train_step), on synthetic tensors so that data loading is not
measured: masking.keep_indices (and masking.text_keep_indices) -> model(images, tokens, keep,
positions) -> clip_loss -> backward -> AdamW -> clamp of the logit scale. Ratio 0 with the whole
context of text is the unmasked baseline (keep=None, positions=None, as `train.py --mask none`) and
is always run first; each --text-length L adds a row per ratio in which the text tower encodes L
tokens per caption, their positions drawn per step with --text-mask, inside the timed step.

FLOPs come from the shapes (model.flops_per_sample: 2 FLOPs per multiply-add, matmuls only, training
= 3 x forward), so the FLOP-ideal speedup of a row is flops(all patches, all text tokens) / flops(K
patches, L tokens). With the whole text it stays well below 1 / (1 - ratio): the text tower,
unmasked, is 62% of ViT-B-16's FLOPs at 90% masking. After the table, one line gives the unmasked
image tower's inference images/s as eval.py runs it: compare it with `python bench.py data`'s
evaluation pipeline to see whether an ImageNet pass is bound by the data or the model. MFU =
achieved FLOP/s / the device's dense bf16 peak (distributed.peak_flops); it is not reported on the
CPU. Peak memory is torch.cuda.max_memory_allocated per row on a GPU, and the process's peak RSS
(which never goes down, so it is the largest ratio-0 figure) on the CPU. mask/step is the masks
(patches and text) timed alone over the time of a whole step.

--openclip times open_clip_torch's model of the same name (ViT-B-16, ViT-S-16) after ours, through
the same step, optimizer, precision, compilation and synthetic batch, with OpenCLIP's own patch
dropout (FLIP's random masking, at the same place and keeping the same number of patches) doing the
masking, with the whole text only (its text tower takes the whole context). open_clip_torch is not a
dependency of this project; install it beside it to compare. The models run one after the other: on
a shared CPU that order alone moves the comparison by a few percent (docs/speed.md), so repeat it
and read smaller differences as noise; on a GPU step times repeat closely.
"""

import contextlib
import dataclasses
import difflib
import importlib
import io
import itertools
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

import checkpoint as ckpt
import data
import masking
import distributed as D
import model as M
import photographer
import train
from tokenizer import train_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 5e-4  # OpenCLIP's default; the value does not change the time of a step


def parse_args(argv=None):
    p = data.OneLineParser(prog="bench.py", description=__doc__.strip().split("\n")[0])
    a = p.add_argument
    a("--model", default=None, choices=list(M.PRESETS),
      help="model preset (default: ViT-B-16 on cuda, tiny on cpu)")
    a("--batch-size", type=int, default=None,
      help="batch size (default: 256 on cuda; on cpu 64 for tiny, else 4)")
    a("--ratios", type=float, nargs="+", default=[0, 0.5, 0.75, 0.9],
      help="masking ratios to time (0 is added)")
    a("--mask", default="gaussian", choices=masking.MODES,
      help="random = FLIP, gaussian = GDM-FLIP (same cost)")
    a("--sigma", type=float, default=0.2,
      help="Gaussian masking's sigma (a variance, as in the paper's code)")
    a("--text-length", type=int, nargs="+", default=[], metavar="L", help="also time each ratio "
      "with L text tokens encoded per caption (the whole context is always timed)")
    a("--text-mask", default="prioritized", choices=masking.TEXT_MODES, help="which L text tokens "
      "survive (FLIP's prioritized drops padding first; every mode costs the same)")
    a("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    a("--precision", choices=D.PRECISIONS, help=D.PRECISION_HELP)
    a("--compile", action="store_true",
      help="torch.compile the model; each (K, L) is its own static-shape graph")
    a("--steps", type=int, default=20, help="timed steps per ratio")
    a("--warmup", type=int, default=3,
      help="untimed steps per ratio first (compilation, allocator, cuDNN autotune)")
    a("--check-sync", action="store_true",
      help="run one step per ratio under torch.cuda.set_sync_debug_mode('error')")
    a("--seed", type=int, default=0, help="seed for the weights, the synthetic batch and the masks")
    a("--json", default=None, metavar="OUT",
      help="also write the settings and the table to this JSON file")
    a("--openclip", action="store_true", help="also time open_clip_torch's model of the same name "
      "(installed separately) with its patch dropout, side by side")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but this torch sees no CUDA device")
    on_gpu = args.device == "cuda"
    args.model = args.model or ("ViT-B-16" if on_gpu else "tiny")
    if args.batch_size is None:
        args.batch_size = 256 if on_gpu else 64 if args.model == "tiny" else 4
    args.precision = args.precision or D.default_precision("cuda" if on_gpu else "cpu")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1 and --warmup >= 0")
    try:
        for r in args.ratios:
            masking.check_args(2, r, args.mask, args.sigma)
        context_length = M.PRESETS[args.model].context_length
        for length in args.text_length:
            masking.check_text_args(context_length, length, args.text_mask)
    except ValueError as e:
        p.error(str(e))
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: no such directory")
    if args.openclip:
        try:
            import open_clip
            missing = None if args.model in open_clip.list_models() else \
                f"OpenCLIP has no model named {args.model!r}"
        except ImportError as e:
            missing = f"open_clip_torch is not installed ({e})"
        if missing:  # our rows still run
            print(f"bench.py: warning: --openclip skipped: {missing}", file=sys.stderr)
            args.openclip = False
    # ratio 0 is the baseline of every speedup, and so is the whole text
    args.ratios = sorted(set([0.0, *args.ratios]))
    args.text_length = sorted(set([context_length, *args.text_length]), reverse=True)
    return args


def synthetic_batch(cfg, batch_size, device, generator):
    """Random images (B, 3, S, S) and token ids (B, T) whose end-of-text (the largest id) sits at
    varied positions."""
    S, T, V = cfg.image_size, cfg.context_length, cfg.vocab_size
    images = torch.randn(batch_size, 3, S, S, device=device, generator=generator)
    # ordinary words
    tokens = torch.randint(1, V - 1, (batch_size, T), device=device, generator=generator)
    # captions of 2..T tokens
    eot = torch.randint(1, T, (batch_size, 1), device=device, generator=generator)
    position = torch.arange(T, device=device)
    # zero padding after the caption, as CLIP's tokenizer
    tokens = torch.where(position < eot, tokens, 0)
    return images, tokens.scatter(1, eot, V - 1)


def make_step(model, orig_model, optimizer, autocast):
    """train.py's own step (train.train_step: one rank, no accumulation) on a batch whose text is
    gathered at `positions` as train.py gathers it; returns nothing, so nothing syncs.

    model(images, tokens, keep, positions) -> normalised features and the logit scale; orig_model is
    the uncompiled module, whose logit scale the step clamps."""
    def step(images, tokens, keep, positions):
        if positions is not None:  # the text tokens kept, (B, T) -> (B, L)
            tokens = tokens.gather(1, positions)
        train.train_step(model, orig_model, optimizer, [(images, tokens)], [keep], [positions],
                         autocast, LR)
    return step


def seconds_per_call(fn, n, device):
    """Mean wall time of fn() over n calls. CUDA runs asynchronously, so wait for the GPU before
    reading the clock."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def peak_memory_mib(device):
    if device.type == "cuda":
        # since the reset at the start of this ratio
        return torch.cuda.max_memory_allocated(device) / 2**20
    # KiB on Linux; the process's peak RSS so far
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_is_sync_free(step, images, tokens, make_masks):
    """One step (masks included) under which any host-device synchronisation raises: True if none
    happened."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(images, tokens, *make_masks())
        return True
    except RuntimeError as e:
        print(f"host-device sync inside the step: {str(e).splitlines()[0]}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def bench_ratio(ratio, text_length, step, cfg, args, device, generator, own_mask=True):
    """Time `args.steps` training steps at one masking ratio and text length; returns that row of
    the table as a dict.

    own_mask: the step takes keep_indices (our model); False for a model that drops patches inside
    (OpenCLIP's)."""
    B = args.batch_size
    images, tokens = synthetic_batch(cfg, B, device, generator)
    masks_patches = ratio > 0 and own_mask
    masks_text = text_length < cfg.context_length

    # drawn afresh every step as in training; None: encode every patch / every text token
    def make_masks():
        keep = masking.keep_indices(B, cfg.grid_size, ratio, args.mask, args.sigma, device=device,
                                    generator=generator) if masks_patches else None  # (B, K)
        positions = masking.text_keep_indices(tokens, text_length, args.text_mask,
                                              generator=generator) if masks_text else None  # (B, L)
        return keep, positions

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # with --compile the first call at a new (K, L) compiles: its time less a step's is compile_s
    warmup_s = [seconds_per_call(lambda: step(images, tokens, *make_masks()), 1, device)
                for _ in range(args.warmup)]
    # a whole step, masks included; then the masks alone
    step_s = seconds_per_call(lambda: step(images, tokens, *make_masks()), args.steps, device)
    masks_s = (seconds_per_call(make_masks, args.steps, device) if masks_patches or masks_text
               else None)
    on_gpu_check = args.check_sync and device.type == "cuda"
    sync_free = step_is_sync_free(step, images, tokens, make_masks) if on_gpu_check else None
    kept = masking.num_kept(cfg.grid_size, ratio)  # every patch at ratio 0
    samples_per_s = B / step_s
    flops = M.train_flops_per_sample(cfg, ratio, text_length)  # as train.py counts them for MFU
    tflops = flops * samples_per_s / 1e12
    peak = D.peak_flops(device)
    return dict(ratio=ratio, kept=kept, text_tokens=text_length, samples_per_s=samples_per_s,
                step_ms=1e3 * step_s, ideal_speedup=M.train_flops_per_sample(cfg, 0.0) / flops,
                tflops=tflops, mfu=None if peak is None else tflops * 1e12 / peak,
                peak_mem_mib=peak_memory_mib(device),
                mask_fraction=None if masks_s is None else masks_s / step_s, sync_free=sync_free,
                compile_s=max(0.0, warmup_s[0] - step_s) if args.compile and warmup_s else None)


def inference_images_per_s(model, cfg, args, device):
    """Images/s of the unmasked image tower as eval.py runs it (no grad, autocast, eager, the
    bench's batch): beside `python bench.py data`'s evaluation pipeline, it tells whether an
    ImageNet pass is bound by data or by the model."""
    autocast = D.autocast(device, args.precision)
    images = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    model.eval()

    def encode():
        with torch.no_grad(), autocast:
            model.encode_image(images)

    for _ in range(args.warmup):
        encode()
    rate = args.batch_size / seconds_per_call(encode, args.steps, device)
    model.train()
    return rate


def format_table(rows, memory_kind):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'ratio':>5} {'kept':>5} {'text':>4} {'samples/s':>10} {'speedup':>8} {'ideal':>7} "
             f"{'TFLOP/s':>8} {'MFU':>6} {memory_kind:>12} {'mask/step':>9} {'sync-free':>9} "
             f"{'compile s':>9}"]
    for r in rows:  # text: the text tokens encoded per caption
        sync = {None: "-", True: "yes", False: "NO"}[r["sync_free"]]
        lines.append(f"{r['ratio']:5.2f} {r['kept']:5d} {r['text_tokens']:4d} "
                     f"{r['samples_per_s']:10.1f} {r['speedup']:7.2f}x {r['ideal_speedup']:6.2f}x "
                     f"{r['tflops']:8.3f} {fmt(r['mfu'], '.1%'):>6} {r['peak_mem_mib']:12.0f} "
                     f"{fmt(r['mask_fraction'], '.2%'):>9} {sync:>9} "
                     f"{fmt(r['compile_s'], '.1f'):>9}")
    return "\n".join(lines)


def openclip_model(name):
    """open_clip_torch's model of the same name, with a PatchDropout module whose prob bench_model
    sets per ratio."""
    import open_clip  # parse_args checked that it is there and has the model

    # force_patch_dropout puts OpenCLIP's FLIP masking where ours is: after the positional
    # embedding, before ln_pre
    oc = open_clip.create_model(name, force_patch_dropout=0.5)
    return oc, f"OpenCLIP {name} (open_clip_torch {open_clip.__version__})"


def openclip_blocks(model):
    """The Transformer blocks of an OpenCLIP model, both towers."""
    return [*model.visual.transformer.resblocks, *model.transformer.resblocks]


def bench_model(orig_model, cfg, args, device, openclip=False):
    """The table's rows for one model: AdamW as train.py's, torch.compile if asked, every ratio in
    turn, each with the whole text and then each shorter text length (OpenCLIP's model: the whole
    text only).

    cfg: our preset's config, for the shapes and FLOPs (an OpenCLIP model of the same name has the
    same shapes)."""
    autocast = D.autocast(device, args.precision)
    optimizer = M.configure_optimizer(orig_model, LR, weight_decay=0.2)  # train.py's, as it runs
    if args.compile:
        # each block in place, as train.py (distributed.compile_blocks): a row's K patches and L
        # text tokens recompile the blocks, static-shape (dynamic=False: no slower symbolic-shape
        # graph from the second K on), not the whole model
        graphs = 2 * len(args.ratios) * len(args.text_length) + 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        if openclip:
            for block in openclip_blocks(orig_model):
                block.compile(dynamic=False)
        else:
            D.compile_blocks(orig_model)
    model = orig_model
    # OpenCLIP's model masks inside
    forward = (lambda images, tokens, keep, positions: model(images, tokens)) if openclip else model
    step = make_step(forward, orig_model, optimizer, autocast)
    # the same batches and masks for every model
    generator = torch.Generator(device).manual_seed(args.seed)
    text_lengths = args.text_length[:1] if openclip else args.text_length  # [0]: the whole context
    rows = []
    for ratio in args.ratios:
        if openclip:
            # prob 0 returns the tokens untouched: unmasked
            orig_model.visual.patch_dropout.prob = ratio
        for text_length in text_lengths:
            rows.append(bench_ratio(ratio, text_length, step, cfg, args, device, generator,
                                    own_mask=not openclip))
    for row in rows:
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]  # rows[0] is ratio 0
    return rows


# ----------------------------------------------------------------------------- data pipelines


def fake_photo(rng, short_side):
    """A CC12M-like JPEG for benchmarks: smooth colours, shapes, grain; shortest side `short_side`,
    aspect to 16:9."""
    aspect = rng.uniform(1, 16 / 9)
    long_side = round(short_side * aspect)
    size = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    colours = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(colours).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(10, short_side / 4)
        shape = photographer.SHAPES[rng.integers(6)]
        draw.polygon(photographer.shape_points(shape, x, y, r, 0),
                     fill=tuple(rng.integers(0, 256, 3).tolist()))
    # texture, so the JPEG is photo-sized (~60-70 kB), not flat
    grain = rng.normal(0, 4, (size[1], size[0], 1))
    pixels = np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8)
    return photographer.jpeg_bytes(Image.fromarray(pixels), quality=90)


def images_per_s(loader):
    """Images/s of one pass over `loader`, the first batch (worker start-up, shuffle buffer) not
    counted."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(batch[0].shape[0] for batch in it)
    return n / (time.perf_counter() - t0)


CAPTIONS = [f"a photo of a {c} {s}" for c in photographer.COLOURS for s in photographer.SHAPES]
# (name, shortest sides drawn from, where they come from): what each pipeline reads
PHOTO_SETS = [("cc12m", (400, 501), "training, CC12M-size JPEGs (shortest side 400-500 px)"),
              ("s256", (256, 257), "training, 256 px JPEGs (img2dataset --resize 256)"),
              ("val", (333, 376), "evaluation, ImageNet-size JPEGs (333-375 px), class folders")]


def make_photos(count, sides, seed, processes):
    """`count` fake_photo JPEGs with shortest sides drawn from range(*sides), made in parallel."""
    jobs = [(seed, i, sides) for i in range(count)]
    if processes <= 1:
        return list(map(photo_job, jobs))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return pool.map(photo_job, jobs, chunksize=16)


def photo_job(job):
    seed, i, sides = job
    rng = np.random.default_rng([seed, i])
    return fake_photo(rng, int(rng.integers(*sides)))


def write_photos(name, photos, folder, shard_size=512):
    """Shards folder/shard-NNNN.tar of (jpg, txt) samples, or for "val" class folders c0 .. c9;
    returns the shard pattern or the folder."""
    os.makedirs(folder, exist_ok=True)
    if name == "val":
        for i, photo in enumerate(photos):
            os.makedirs(os.path.join(folder, f"c{i % 10}"), exist_ok=True)
            with open(os.path.join(folder, f"c{i % 10}", f"{i:06d}.jpg"), "wb") as f:
                f.write(photo)
        return folder
    for k in range(0, len(photos), shard_size):
        with wds.TarWriter(os.path.join(folder, f"shard-{k // shard_size:04d}.tar"),
                           encoder=False) as tar:
            for i, photo in enumerate(photos[k:k + shard_size], start=k):
                tar.write({"__key__": f"{i:06d}", "jpg": photo,
                           "txt": CAPTIONS[i % len(CAPTIONS)].encode()})
    last = (len(photos) - 1) // shard_size
    return os.path.join(folder, "shard-{0000..%04d}.tar" % last)


def make_loader(name, where, workers, image_size=224, batch_size=32):
    """A loader over what write_photos wrote: the training loader (resampled, three passes' worth
    of batches) over shards, or eval.py's over the class folders."""
    if name == "val":
        folder = data.ImageFolder(where, data.eval_crop(image_size))
        return DataLoader(folder, batch_size, num_workers=workers)
    num_samples = 3 * len(data.expand_urls(where)) * 512 // batch_size * batch_size
    return data.make_train_loader(where, batch_size, num_samples, image_size,
                                  train_tokenizer(CAPTIONS, 1024, 77), workers=workers,
                                  resampled=True)


def bench_pipelines(workers, num_images=256, out=None, image_size=224):
    """Images/s of the training pipeline (CC12M-size and 256 px JPEGs from shards) and of the
    evaluation pipeline (ImageNet-size JPEGs from class folders), against a plain PIL decode +
    resize of the same JPEGs in one process. `out`: keep the shards and folders there."""
    rates, cores = {}, len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, sides, what) in enumerate(PHOTO_SETS):
            photos = make_photos(num_images, sides, seed, cores)
            print(f"{what}: {num_images}, mean {sum(map(len, photos)) / len(photos) / 1e3:.0f} kB, "
                  f"{image_size} px output")
            t0 = time.perf_counter()
            for photo in photos[:64]:
                image = Image.open(io.BytesIO(photo)).convert("RGB")
                image.resize((image_size, image_size), Image.BICUBIC)
            rate = min(64, num_images) / (time.perf_counter() - t0)
            print(f"  plain PIL decode + resize (1 process): {rate:7.1f} images/s")
            where = write_photos(name, photos, os.path.join(out or tmp, name))
            rates[name] = {"pil_1_process": rate, "where": where}
            for w in sorted({0, workers}):
                rate = images_per_s(make_loader(name, where, w, image_size))
                per = f"{rate / max(w, 1):.1f} per {'worker' if w else 'process'}"
                print(f"  {name + ' pipeline,':21}{w:2d} workers:{'':6}{rate:7.1f} images/s "
                      f"({per})")
                rates[name][f"{w}_workers"] = rate
    return rates


def data_main(argv):
    """`python bench.py data`: images/s of the training and evaluation pipelines against a plain
    PIL decode."""
    p = data.OneLineParser(prog="bench.py data", description=bench_pipelines.__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=1,
                   help="dataloader workers (also measured: 0, in-process)")
    p.add_argument("--num-images", type=int, default=256, help="JPEGs made for each pipeline")
    p.add_argument("--out", help="keep the shards and folders here, and write data.json")
    args = p.parse_args(argv)
    if args.workers < 0 or args.num_images < 64:
        p.error("--workers must be >= 0 and --num-images >= 64 (two batches of 32 at least)")
    threads = torch.get_num_threads()
    # as in a dataloader worker, so the in-process rate compares with theirs
    torch.set_num_threads(1)
    try:
        rates = bench_pipelines(args.workers, args.num_images, args.out)
    finally:
        torch.set_num_threads(threads)
    if args.out:
        write_json(os.path.join(args.out, "data.json"), {"workers": args.workers, "rates": rates})
    return rates


# ----------------------------------------------------------------------------- memory
# `python bench.py memory`: what a GPU must hold to train each model, three ways: the weights,
# gradients and AdamW state per rank under DDP and FSDP (computed from the shapes), the activations
# of a training step per sample (measured on the CPU), and from both the largest batch per GPU that
# fits (docs/speed.md#memory-per-rank-and-the-largest-batch)

GPU_BYTES = {"80 GB": 80e9, "141 GB": 141e9}  # as sold: H100 / A100 80 GB, H200
MARGIN = 0.1  # of the card: CUDA context, cuBLAS and NCCL workspaces, allocator fragmentation
BATCHES = (2, 4)  # per sample: the difference over 2 samples; what does not grow with them cancels
MEMORY_MODELS = ("ViT-B-16", "ViT-L-16", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")
RANKS = (1, 8, 64)
# bytes a parameter, bf16 training: under DDP on every rank the fp32 weight (4), its gradient (4),
# AdamW's two moments (8) and the bf16 copy autocast makes (2); under FSDP the first 16 split over
# the ranks, and of each unit whole at the moment its bf16 weight (2) and, in backward, its
# gradient in bf16 and in fp32 for the reduce-scatter (6): the root for the whole step, and two
# blocks (the one running, the next prefetched)
DDP_BYTES, SHARDED_BYTES, WHOLE_BYTES = 18, 16, 8
# the local loss's logits, (B, W*B) per rank in fp32: clip_loss peaks at about 4 such matrices
# (measured at N = 512 and 1,024, docs/speed.md), 16 bytes a logit
LOGIT_BYTES = 16


def state_bytes(cfg, strategy, ranks):
    """Bytes per rank of the weights, gradients and AdamW state of `cfg` trained under "DDP" or
    "FSDP" on `ranks` GPUs in bf16: computed from the parameter counts (DDP_BYTES...), not
    measured."""
    with torch.device("meta"):  # shapes only: ViT-bigG-14's 2.5B parameters never allocated
        model = M.CLIP(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    params = count(model)
    if strategy == "DDP":
        return DDP_BYTES * params
    blocks = [count(b) for b in [*model.visual.blocks, *model.text.blocks]]
    root = params - sum(blocks)
    return SHARDED_BYTES * params / ranks + WHOLE_BYTES * (root + 2 * max(blocks))


def allocations(fn):
    """(fn(), [(op, bytes it allocated less those it freed)] in time order, for the ops that
    allocate) of the CPU tensors fn allocates: torch.profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        out = fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return out, [(e.name, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage]


def as_cuda_runs_bf16():
    """A context in which the CPU runs bf16 autocast as CUDA does: layer_norm in fp32 (the CPU's
    keeps bf16), and attention in bf16 (model.Attention attends in fp32 on the CPU, for speed)."""
    norm, attend = F.layer_norm, F.scaled_dot_product_attention
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(F, "layer_norm",
                                          lambda x, *a, **k: norm(x.float(), *a, **k)))
    stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention",
                                          lambda *qkv, **k: attend(*(t.bfloat16() for t in qkv),
                                                                   **k)))
    return stack


def step_memory(model, batch_size, ratio, precision):
    """(the ops of a training forward and backward, the bytes allocated after each, the forward's
    ops). bf16: as CUDA runs it (as_cuda_runs_bf16), and the forward only: this CPU's bf16 matmuls
    of the backward take minutes."""
    cfg, g = model.config, torch.Generator().manual_seed(0)
    images, tokens = synthetic_batch(cfg, batch_size, torch.device("cpu"), g)
    keep = masking.keep_indices(batch_size, cfg.grid_size, ratio, "random", generator=g) \
        if ratio else None
    with as_cuda_runs_bf16() if precision == "bf16" else nullcontext(), \
            D.autocast("cpu", precision):
        loss, forward = allocations(lambda: M.clip_loss(*model(images, tokens, keep)))
    backward = [] if precision == "bf16" else allocations(loss.backward)[1]  # into p.grad
    ops, sizes = zip(*forward + backward)
    return ops, list(itertools.accumulate(sizes)), len(forward)


def measured_activations(cfg, ratio, checkpointed):
    """{"fp32_saved", "fp32_peak", "bf16_saved"}: bytes per sample of a training step of `cfg`,
    measured on the CPU at batch 4 against batch 2."""
    torch.manual_seed(0)
    model = M.CLIP(cfg).train()
    model.set_grad_checkpointing(checkpointed)
    for p in model.parameters():  # allocated once: a step's bytes do not count them
        p.grad = torch.zeros_like(p)
    (b1, b2), row = BATCHES, {}
    for precision in ("fp32", "bf16"):
        (ops1, small, n1), (ops2, large, n2) = [step_memory(model, b, ratio, precision)
                                                for b in BATCHES]
        row[f"{precision}_saved"] = (large[n2 - 1] - small[n1 - 1]) / (b2 - b1)
        if precision == "fp32":
            # the peak of what grows with the batch, op by op (a constant, such as the token
            # embedding's gradient, cancels); a few tiny ops come and go with the batch size, so
            # the two runs' ops are matched by name
            matched = difflib.SequenceMatcher(None, ops1, ops2, autojunk=False)
            row["fp32_peak"] = max((large[j + k] - small[i + k]) / (b2 - b1)
                                   for i, j, size in matched.get_matching_blocks()
                                   for k in range(size))
    return row


def activations(cfg, ratio, checkpointed, full_depth=False):
    """measured_activations of `cfg` with its bf16 peak, {"fp32_saved", "fp32_peak",
    "bf16_saved", "bf16_peak"}. Unless full_depth, measured on copies with one block in each
    tower, then one more in either, and extrapolated to the towers' depths: every block of a tower
    is the same module on the same tokens, so each adds the same saved bytes; the peak is the saved
    bytes plus what backward holds on top of them (one block's, recomputed when checkpointed),
    which does not grow with depth. ViT-bigG-14 is measured in minutes, not hours."""
    if full_depth:
        row = measured_activations(cfg, ratio, checkpointed)
    else:
        base, image, text = (measured_activations(
            dataclasses.replace(cfg, vision_layers=v, text_layers=t), ratio, checkpointed)
            for v, t in [(1, 1), (2, 1), (1, 2)])
        row = {key: base[key] + (cfg.vision_layers - 1) * (image[key] - base[key])
               + (cfg.text_layers - 1) * (text[key] - base[key])
               for key in ("fp32_saved", "bf16_saved")}
        row["fp32_peak"] = row["fp32_saved"] + max(m["fp32_peak"] - m["fp32_saved"]
                                                   for m in (base, image, text))
    # bf16's peak: over its saved bytes as much as fp32's peak is over fp32's
    return row | {"bf16_peak": row["bf16_saved"] * row["fp32_peak"] / row["fp32_saved"]}


def largest_batch(budget, per_sample, ranks):
    """The largest batch per GPU B with per_sample * B + the local loss's logits
    (LOGIT_BYTES * ranks * B^2) within `budget` bytes; 0 when none fits."""
    if budget <= 0:
        return 0
    a = LOGIT_BYTES * ranks
    return int((-per_sample + math.sqrt(per_sample ** 2 + 4 * a * budget)) / (2 * a))


def memory_main(argv):
    p = data.OneLineParser(prog="bench.py memory", description="Memory per rank, per sample, and "
                           "the largest batch per GPU.")
    p.add_argument("--models", nargs="+", default=list(MEMORY_MODELS), choices=list(M.PRESETS))
    p.add_argument("--ratios", type=train.FRACTION, nargs="+", default=[0, 0.5, 0.75, 0.9])
    p.add_argument("--fit-ratio", type=train.FRACTION, default=0.5, help="masking ratio of the "
                   "largest-batch tables (default: the paper's 0.5)")
    p.add_argument("--full-depth", action="store_true", help="measure each model whole instead of "
                   "extrapolating from one block per tower (hours for the largest)")
    args = p.parse_args(argv)
    print(format_states(args.models))
    print(f"\nActivations, MB per sample, measured on the CPU (torch.profiler, batch 4 against 2"
          + ("" if args.full_depth else "; 1 or 2 blocks per tower, extrapolated to the depth")
          + "): fp32 saved, fp32 peak, bf16 saved, bf16 peak (est.)")
    rows = []
    for name, ratio, checkpointed in itertools.product(args.models, args.ratios, (False, True)):
        cfg = M.PRESETS[name]
        row = {"model": name, "ratio": ratio, "checkpointed": checkpointed,
               **activations(cfg, ratio, checkpointed, args.full_depth)}
        row["largest_bf16_batch"] = {
            f"{strategy} {ranks}": {gpu: largest_batch((1 - MARGIN) * size
                                                       - state_bytes(cfg, strategy, ranks),
                                                       row["bf16_peak"], ranks)
                                    for gpu, size in GPU_BYTES.items()}
            for strategy, ranks in itertools.product(("DDP", "FSDP"), RANKS)}
        rows.append(row)
        print(f"{name} ratio {ratio:.2f}{', checkpointed' if checkpointed else '':14}: "
              + ", ".join(f"{row[k] / 1e6:.1f}" for k in ("fp32_saved", "fp32_peak",
                                                          "bf16_saved", "bf16_peak")), flush=True)
    for gpu in GPU_BYTES:
        print("\n" + format_fit(rows, gpu, args.fit_ratio))
    return rows


def format_states(names):
    lines = ["Weights, gradients and AdamW state per rank, GB, bf16 training: computed from the "
             f"parameter counts, not measured (DDP {DDP_BYTES} B a parameter on every rank; FSDP "
             f"{SHARDED_BYTES} B / ranks, and {WHOLE_BYTES} B of each parameter whole at once: the "
             "root's and two blocks')",
             f"{'model':12} {'params':>8} {'DDP, any':>9}" + "".join(f"{f'FSDP {w}':>9}"
                                                                   for w in RANKS)]
    for name in names:
        cfg = M.PRESETS[name]
        params = state_bytes(cfg, "DDP", 1) / DDP_BYTES
        lines.append(f"{name:12} {params / 1e6:7.0f}M {state_bytes(cfg, 'DDP', 1) / 1e9:9.1f}"
                     + "".join(f"{state_bytes(cfg, 'FSDP', w) / 1e9:9.1f}" for w in RANKS))
    return "\n".join(lines)


def format_fit(rows, gpu, ratio):
    """The largest bf16 batch per GPU of one card at one masking ratio: a row per model, without
    and with --grad-checkpointing; '-' where the states alone do not fit."""
    columns = [f"{s} {w}" for s in ("DDP", "FSDP") for w in RANKS]
    lines = [f"Largest bf16 batch per {gpu} GPU at {ratio:.0%} masking, --local-loss: computed "
             f"from the two tables above, {MARGIN:.0%} of the card kept back; '-': does not fit",
             f"{'model':24}" + "".join(f"{c:>9}" for c in columns)]
    for r in rows:
        if r["ratio"] == ratio:
            name = r["model"] + (", checkpointed" if r["checkpointed"] else "")
            lines.append(f"{name:24}" + "".join(f"{r['largest_bf16_batch'][c][gpu] or '-':>9}"
                                                for c in columns))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the GPU check
# `python bench.py gpu --out DIR`: every GPU figure of docs/speed.md in one run of under 8 minutes,
# part by part in priority order, each in its own process under its own time limit, so that one
# failure or hang loses nothing else; DIR gets each part's log and JSON and summary.md as it goes.
# --small runs the same parts with the tiny preset on the CPU in a minute: the test suite's.

GPU_CHECK_S = 480  # all parts together: 8 minutes, inside the 10 a lent machine's call allows
PART_LIMITS_S = {"preflight": 20, "quick start": 90, "step": 150, "data": 50, "train 0%": 40,
                 "train 90%": 40, "train FSDP 0%": 40, "evaluation": 40}
TRAIN_STEPS = 60  # train.py on the generated shards: enough windows past the first for data wait


def gpu_main(argv):
    p = data.OneLineParser(prog="bench.py gpu", description="Every GPU figure in one run.")
    p.add_argument("--out", required=True, help="folder for the logs, JSON and summary.md")
    p.add_argument("--small", action="store_true", help="the tiny preset on the CPU, a few steps "
                   "(the test suite runs this)")
    p.add_argument("--budget", type=float, default=GPU_CHECK_S, help="seconds for all parts")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    check = new_check(os.path.abspath(args.out), args.small, time.time() + args.budget)
    for name, run in [("preflight", gpu_preflight), ("quick start", gpu_quick_start),
                      ("step", gpu_step), ("data", gpu_data),
                      ("train 0%", lambda check: gpu_train(check, 0.0)),
                      ("train 90%", lambda check: gpu_train(check, 0.9)),
                      ("train FSDP 0%", lambda check: gpu_train(check, 0.0, fsdp=True)),
                      ("evaluation", gpu_evaluation)]:
        run_part(check, name, run)
    print(f"bench.py gpu: summary in {os.path.join(args.out, 'summary.md')}")
    return check.results


def new_check(out, small, deadline):
    """What the parts of `bench.py gpu` share. A part is a function of it that returns its headline
    figures as {label: text} and raises PartFailed (a one-line reason) when it cannot give them;
    the data part leaves `rates` (and its shards) for the train and evaluation parts."""
    return SimpleNamespace(
        out=out, small=small, deadline=deadline, limit=None, results=[], facts={},
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        workers=0 if small else max(1, len(os.sched_getaffinity(0)) - 1),
        compile=False, openclip=False,  # until the preflight finds a compiler, open_clip
        step_result=None, rates=None)


def run_part(check, name, run):
    limit = min(PART_LIMITS_S[name], check.deadline - time.time())
    t0, check.limit = time.time(), limit
    if limit < 5:
        status, found = "skipped: the check's time is spent", {}
    else:
        try:
            status, found = "ok", run(check)
        except PartFailed as e:
            status, found = f"failed: {e}", {}
        except Exception as e:  # a bug in the check itself must not lose the other parts
            status, found = f"failed: {type(e).__name__}: {e}", {}
    check.results.append({"part": name, "status": status, "seconds": time.time() - t0,
                          "figures": found})
    print(f"bench.py gpu: {name}: {status} ({time.time() - t0:.0f} s)", flush=True)
    write_gpu_summary(check)


def run_command(check, name, cmd):
    """Run cmd (a list) with the part's time limit, output in <name>.log; its output's text."""
    log = os.path.join(check.out, name.replace(" ", "_").replace("%", "") + ".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                cwd=HERE, start_new_session=True)  # its workers: one group
        try:
            code = proc.wait(timeout=check.limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise PartFailed(f"timed out after {check.limit:.0f} s (see "
                             f"{os.path.basename(log)})")
    with open(log) as f:
        text = f.read()
    if code:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise PartFailed(f"exit {code}: {last[:200]} (see {os.path.basename(log)})")
    return text


def gpu_preflight(check):
    """The machine and what it has: the GPU, versions, cores, /dev/shm, a C compiler for
    Triton (without one everything runs uncompiled), the optional packages."""
    gpu = torch.cuda.is_available()
    if not gpu and not check.small:
        raise PartFailed("no CUDA device (torch.cuda.is_available() is False)")
    driver = "-"
    if gpu and shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,"
                                 "noheader"], capture_output=True, text=True).stdout.strip()
    check.compile = bool(shutil.which("cc") or shutil.which("gcc")) and not check.small
    optional = {m: importable(m) for m in ("webdataset", "braceexpand", "ftfy", "wcwidth",
                                           "open_clip")}
    check.openclip = optional["open_clip"]
    shm = shutil.disk_usage("/dev/shm").free / 1e9 if os.path.isdir("/dev/shm") else 0.0
    check.facts = {"device": torch.cuda.get_device_name() if gpu else "cpu",
                   "driver": driver, "torch": torch.__version__,
                   "cuda": torch.version.cuda or "-", "python": sys.version.split()[0],
                   "cores": len(os.sched_getaffinity(0)), "dev/shm free GB": f"{shm:.1f}",
                   "compile": "on" if check.compile else "off (--small)" if check.small
                   else "off (no C compiler for Triton)",
                   "packages": ", ".join(f"{m} {'yes' if ok else 'no'}"
                                         for m, ok in optional.items())}
    # 15 workers x 2 prefetched batches of 320 uint8 images of 224 px: ~1.4 GB of /dev/shm
    if not check.small and shm < 2:
        check.facts["warning"] = f"/dev/shm has {shm:.1f} GB free; the loaders need ~1.4 GB"
    return dict(check.facts)


def gpu_quick_start(check):
    """The README's first command on this machine (built-in data; bf16 and compiled on a GPU):
    wall time, time per epoch, zero-shot top-1."""
    cmd = [sys.executable, "train.py", "--mask", "gaussian", "--ratio", "0.5", "--log-dir",
           os.path.join(check.out, "runs"), "--name", "quick-start"]
    if check.small:
        folder = write_photos("val", make_photos(20, (64, 65), 0, 1),
                              os.path.join(check.out, "tiny-val"))
        cmd += ["--builtin-samples", "256", "--epochs", "1", "--batch-size", "32",
                "--zeroshot-data", folder, "--workers", "0"]
    t0 = time.time()
    run_command(check, "quick start", cmd + ([] if check.compile else ["--no-compile"]))
    evals = [r for r in read_records(os.path.join(check.out, "runs", "quick-start"))
             if "zeroshot_top1" in r]
    epochs = [b["time"] - a["time"] for a, b in zip([{"time": 0.0}] + evals, evals)]
    return {"wall time": f"{time.time() - t0:.0f} s",
            "per epoch": ", ".join(f"{e:.0f} s" for e in epochs),
            "top-1 unmasked / masked": f"{evals[-1]['zeroshot_top1']:.4f} / "
                                       f"{evals[-1].get('zeroshot_masked_top1', 0):.4f}"}


def gpu_step(check):
    """bench.py's step table: ViT-B-16, batch 256, bf16, compiled, at 0 / 50 / 75 / 90%, and
    OpenCLIP's ViT-B-16 beside it when it imports."""
    out = os.path.join(check.out, "step.json")
    cmd = [sys.executable, "bench.py", "--json", out, "--check-sync", "--steps", "10",
           "--warmup", "2"] + (["--compile"] if check.compile else [])
    cmd += ["--openclip"] if check.openclip else []
    if check.small:
        cmd += ["--device", "cpu", "--model", "tiny", "--batch-size", "8", "--steps", "1",
                "--warmup", "1", "--ratios", "0.5"]
    try:
        run_command(check, "step", cmd)
    except PartFailed:  # our rows are written before OpenCLIP's run starts: keep them
        if not os.path.exists(out):
            raise
    with open(out) as f:
        result = json.load(f)
    check.step_result = result
    found = {f"{r['ratio']:.0%}": f"{r['samples_per_s']:.0f}/s, {r['speedup']:.2f}x of "
             f"{r['ideal_speedup']:.2f}x ideal" + (f", MFU {r['mfu']:.0%}" if r["mfu"] else "")
             for r in result["rows"]}
    if "openclip_rows" in result:
        found["ours / OpenCLIP"] = ", ".join(f"{r['samples_per_s'] / o['samples_per_s']:.2f}x"
                                             for r, o in zip(result["rows"],
                                                             result["openclip_rows"]))
    else:
        found["OpenCLIP"] = "skipped: open_clip does not import"
    return found


def gpu_data(check):
    """bench.py data with a worker per core but one, on generated shards and class folders;
    they stay in data/ for the next parts."""
    num = 64 if check.small else 4096
    run_command(check, "data", [sys.executable, "bench.py", "data", "--workers", check.workers,
                                "--num-images", num, "--out", os.path.join(check.out, "data")])
    with open(os.path.join(check.out, "data", "data.json")) as f:
        check.rates = json.load(f)["rates"]
    return {name: f"{r[f'{check.workers}_workers']:.0f} images/s with {check.workers} workers"
            for name, r in check.rates.items()}


def gpu_train(check, ratio, fsdp=False):
    """train.py itself on the CC12M-size shards for TRAIN_STEPS steps: samples/s and data wait
    (the share of the time blocked on the loader) past the first, compiling, step. fsdp: the same
    run under --fsdp (FSDP2 on one rank: bf16 weights from fp32 shards, NCCL), and whether the
    checkpoint it gathers loads as DDP's does."""
    if check.rates is None:
        raise PartFailed("needs the data part's shards")
    batch, steps = (16, 4) if check.small else (256, TRAIN_STEPS)
    name = f"shards-{'fsdp-' * fsdp}{ratio:g}"
    cmd = [sys.executable, "train.py", "--train-data", check.rates["cc12m"]["where"],
           "--train-num-samples", batch * steps, "--dataset-resampled", "--epochs", "1",
           "--batch-size", batch, "--mask", "random" if ratio else "none", "--ratio", ratio,
           "--log-every", 1 if check.small else 10, "--log-dir", os.path.join(check.out, "runs"),
           "--name", name, "--save-frequency", "0", "--workers", check.workers,
           "--model", "tiny" if check.small else "ViT-B-16"] + ["--fsdp"] * fsdp
    run_command(check, f"train {'FSDP ' * fsdp}{ratio:.0%}",
                cmd + ([] if check.compile else ["--no-compile"]))
    windows = [r for r in read_records(os.path.join(check.out, "runs", name))
               if r.get("samples_per_s")]
    if not windows:
        raise PartFailed("no timed log window")
    rate = sum(r["samples_per_s"] for r in windows) / len(windows)
    wait = sum(r["data_wait"] for r in windows) / len(windows)
    mfu = [r["mfu"] for r in windows if r["mfu"]]
    found = {"samples/s": f"{rate:.0f}", "data wait": f"{wait:.0%}",
             "MFU": f"{sum(mfu) / len(mfu):.0%}" if mfu else "-"}
    if fsdp:
        path = os.path.join(check.out, "runs", name, "checkpoints", "epoch_latest.pt")
        ckpt.load_checkpoint(path)  # a ValueError (the part fails) if not DDP's format
        found["checkpoint"] = "loads as DDP's"
    return found


def gpu_evaluation(check):
    """eval.py's zero-shot pass over the ImageNet-size class folder: images/s, and how much of
    it waited for data."""
    if check.rates is None:
        raise PartFailed("needs the data part's class folder")
    name = "tiny" if check.small else "ViT-B-16"
    tokenizer = train_tokenizer(CAPTIONS, 1024, M.PRESETS[name].context_length)
    model = M.create_model(name, vocab_size=tokenizer.vocab_size)
    path = os.path.join(check.out, "eval-model.pt")
    torch.save({"state_dict": model.state_dict(), "config": dataclasses.asdict(model.config),
                "model": name, "tokenizer": tokenizer.to_json()}, path)
    text = run_command(check, "evaluation", [
        sys.executable, "eval.py", "--checkpoint", path, "--dataset",
        check.rates["val"]["where"], "--workers", check.workers, "--output",
        os.path.join(check.out, "eval.json")] + (["--device", "cpu"] if check.small else []))
    done = [line for line in text.splitlines() if line.startswith("images (unmasked):")][-1]
    return {"images": done.split(": ", 1)[1]}


def write_gpu_summary(check):
    lines = [f"# GPU check, {check.started}", "",
             f"`python bench.py gpu --out DIR{' --small' if check.small else ''}`: "
             + ", ".join(f"{k} {v}" for k, v in check.facts.items()), "",
             "| part | status | seconds | figures |", "|---|---|---|---|"]
    for r in check.results:
        figures = "; ".join(f"{k}: {v}" for k, v in r["figures"].items()
                            if r["part"] != "preflight")
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.0f} | {figures} |")
    if check.step_result:
        lines += ["", "Step benchmark (bench.py):", "", "```",
                  format_table(check.step_result["rows"], check.step_result["memory"]), "```"]
    if check.step_result and check.rates:  # does masking pay end to end?
        lines += ["", "What a step consumes against what the loaders make "
                  f"({check.workers} workers):", ""]
        for r in check.step_result["rows"]:
            made = {n: check.rates[n][f"{check.workers}_workers"] for n in ("cc12m", "s256")}
            lines.append(f"- {r['ratio']:.0%} masking: {r['samples_per_s']:.0f} samples/s; "
                         + ", ".join(f"{n} shards {v:.0f}/s"
                                     + (" (data-bound)" if v < r["samples_per_s"] else "")
                                     for n, v in made.items()))
    with open(os.path.join(check.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_json(os.path.join(check.out, "summary.json"), {"facts": check.facts,
                                                         "parts": check.results})


class PartFailed(Exception):
    pass


def importable(module):
    """Whether `module` imports here (open_clip needs timm >= 1.0.17 beside it, for one)."""
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


def read_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    """Run the benchmark for the given command line; print the table and return its rows (a list of
    dicts)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        return data_main(argv[1:])
    if argv[:1] == ["gpu"]:
        return gpu_main(argv[1:])
    if argv[:1] == ["memory"]:
        return memory_main(argv[1:])
    if argv[:1] == ["quickstart"]:
        return quickstart_main(argv[1:])
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        # fp32 leftovers on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    orig_model = M.create_model(args.model).to(device).train()
    cfg = orig_model.config

    grid = cfg.grid_size
    peak = D.peak_flops(device)
    name = (torch.cuda.get_device_name(device) if on_gpu
            else f"cpu, {torch.get_num_threads()} threads")
    params = sum(p.numel() for p in orig_model.parameters())
    print(f"{args.model}: {params / 1e6:.2f}M parameters, {grid}x{grid} patches; batch "
          f"{args.batch_size}, {args.precision}, compile {args.compile}, {args.mask} masking; text "
          f"{', '.join(map(str, args.text_length))} of {cfg.context_length} tokens "
          f"({args.text_mask} when shorter)")
    print(f"device {name}, torch {torch.__version__}; peak for MFU: "
          + ("none known (MFU not reported)" if peak is None
             else f"{peak / 1e12:.0f} TFLOP/s dense bf16"))
    print(f"{args.warmup} warm-up + {args.steps} timed steps per row; forward GFLOPs per sample "
          f"(x3 for a step), image tower + text tower:")
    for ratio in args.ratios:
        kept = masking.num_kept(grid, ratio)  # every patch at ratio 0
        flops = ", ".join(f"{M.flops_per_sample(cfg, kept, t) / 1e9:.3f} ({t} text tokens)"
                          for t in args.text_length)
        print(f"  ratio {ratio:4.2f}: {kept:4d} patches kept, {flops}")
    if args.check_sync and not on_gpu:
        print("--check-sync: skipped on the CPU (there is no device to synchronise with)")

    # GPU: allocated tensors; CPU: the whole process
    memory_kind = "peak MiB" if on_gpu else "peak RSS MiB"
    rows = bench_model(orig_model, cfg, args, device)
    print(format_table(rows, memory_kind))
    inference = inference_images_per_s(orig_model, cfg, args, device)
    print(f"inference, image tower unmasked as eval.py runs it: {inference:.1f} images/s")
    result = {"settings": vars(args), "device": name, "torch": torch.__version__,
              "memory": memory_kind, "rows": rows, "inference_images_per_s": inference}
    write_json(args.json, result)  # now, so that our table survives if OpenCLIP's run fails
    if args.openclip:
        del orig_model  # free its weights and optimizer state before the second model
        torch._dynamo.reset()  # and the compiled graphs, which hold on to them
        if on_gpu:
            torch.cuda.empty_cache()
        torch.manual_seed(args.seed)
        oc, label = openclip_model(args.model)
        oc_rows = bench_model(oc.to(device).train(), cfg, args, device, openclip=True)
        print(f"{label}, the same steps with its patch dropout:")
        print(format_table(oc_rows, memory_kind))
        # OpenCLIP's rows, in the same order
        full_text = [r for r in rows if r["text_tokens"] == cfg.context_length]
        print("ours / OpenCLIP samples/s: " + ", ".join(
            f"{r['ratio']:.2f}: {r['samples_per_s'] / o['samples_per_s']:.2f}x"
            for r, o in zip(full_text, oc_rows)))
        write_json(args.json, result | {"openclip": label, "openclip_rows": oc_rows})
    return rows


def quickstart_main(argv):
    """`python bench.py quickstart`: the README's first command in parts. The built-in dataset (its
    cache, or generated afresh in a temporary $GDMFLIP_DATA with --generate), training samples/s
    (median of the log windows after the first) over --steps steps of its settings, one zero-shot
    pass of the test split, and the whole command projected from those (its epochs of the built-in
    training set, a pass after each). docs/results.md#the-first-command."""
    p = data.OneLineParser(prog="bench.py quickstart")
    p.add_argument("--steps", type=int, default=60, help="training steps of batch 128 (default 60)")
    p.add_argument("--generate", action="store_true", help="time the dataset generated afresh")
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error("--steps must be >= 20 (two log windows after the first at least)")
    epochs = train.parse_args([]).epochs  # the first command's
    with tempfile.TemporaryDirectory() as tmp:
        # train.py's own built-in path, as the first command takes it; --generate: from nothing
        with mock.patch.dict(os.environ, {"GDMFLIP_DATA": tmp} if args.generate else {}):
            t = time.time()
            photographer.builtin_dataset()
            generated = time.time() - t
            train.main(["--mask", "gaussian", "--ratio", "0.5", "--epochs", "1", "--log-every",
                        "10", "--train-num-samples", str(args.steps * 128), "--log-dir", tmp,
                        "--name", "run"])
        records = read_records(os.path.join(tmp, "run"))
    steps = [r for r in records if "loss" in r]
    rates = sorted(r["samples_per_s"] for r in steps[1:] if r["samples_per_s"])
    rate = rates[len(rates) // 2]
    evaluation = next(r for r in records if "zeroshot_top1" in r)["time"] - steps[-1]["time"]
    whole = epochs * (photographer.NUM_TRAIN / rate + evaluation)
    print(f"quickstart: dataset {generated:.1f} s ({'generated' if args.generate else 'cached'}); "
          f"training {rate:.0f} samples/s (median of {len(rates)} windows, {rates[0]:.0f}-"
          f"{rates[-1]:.0f}); zero-shot pass {evaluation:.1f} s; projected first command "
          f"{whole / 60:.1f} min + start-up")
    return {"dataset_s": generated, "samples_per_s": rate, "eval_s": evaluation, "whole_s": whole}


def write_json(path, result):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
