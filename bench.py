"""
Training-step throughput per masking ratio: how much faster does dropping patches make CLIP, next to the FLOP ideal?

    python bench.py                                   # ViT-B-16, batch 256 on a GPU: bf16, TF32, fused AdamW
    python bench.py --compile --check-sync            # compiled, and prove the step never syncs host and device
    python bench.py --device cpu --compile            # the tiny preset, batch 64, fp32 on the CPU
    python bench.py --ratios 0 0.5 --json bench.json  # also write the table as JSON
    python bench.py --text-length 16 32               # also 16 and 32 of the 77 text tokens (FLIP's text masking)
    python bench.py --compile --openclip              # and OpenCLIP's model of the same name, side by side
    python bench.py data --workers 15                 # images/s of the training and evaluation data pipelines

A step is what train.py does for one batch, on synthetic tensors so that data loading is not measured:
masking.keep_indices (and masking.text_keep_indices) -> model(images, tokens, keep, positions) -> clip_loss -> backward
-> AdamW -> clamp of the logit scale. Ratio 0 with the whole context of text is the unmasked baseline (keep=None,
positions=None, as `train.py --mask none`) and is always run first; each --text-length L adds a row per ratio in which
the text tower encodes L tokens per caption, their positions drawn per step with --text-mask, inside the timed step.

FLOPs come from the shapes (model.flops_per_sample: 2 FLOPs per multiply-add, matmuls only, training = 3 x forward),
so the FLOP-ideal speedup of a row is flops(all patches, all text tokens) / flops(K patches, L tokens). With the whole
text it stays well below 1 / (1 - ratio): the text tower, unmasked, is 62% of ViT-B-16's FLOPs at 90% masking.
After the table, one line gives the unmasked image tower's inference images/s as eval.py runs it: compare it with
`python bench.py data`'s evaluation pipeline to see whether an ImageNet pass is bound by the data or the model.
MFU = achieved FLOP/s / the device's dense bf16 peak (model.peak_flops); it is not reported on the CPU.
Peak memory is torch.cuda.max_memory_allocated per row on a GPU, and the process's peak RSS (which never goes down,
so it is the largest ratio-0 figure) on the CPU. mask/step is the masks (patches and text) timed alone over the time of
a whole step.

--openclip times open_clip_torch's model of the same name (ViT-B-16, ViT-S-16) after ours, through the same step,
optimizer, precision, compilation and synthetic batch, with OpenCLIP's own patch dropout (FLIP's random masking, at
the same place and keeping the same number of patches) doing the masking, with the whole text only (its text tower
takes the whole context). open_clip_torch is not a dependency of this project; install it beside it to compare. The
models run one after the other: on a shared CPU that order alone moves the comparison by a few percent (README), so
there repeat it and read smaller differences as noise; on a GPU step times repeat closely.
"""

import io
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

import data
import masking
import model as M
import photographer
import train
from tokenizer import train_tokenizer

LR = 5e-4  # OpenCLIP's default; the value does not change the time of a step


def parse_args(argv=None):
    p = data.OneLineParser(prog="bench.py", description=__doc__.strip().split("\n")[0])
    a = p.add_argument
    a("--model", default=None, choices=list(M.PRESETS), help="model preset (default: ViT-B-16 on cuda, tiny on cpu)")
    a("--batch-size", type=int, default=None, help="batch size (default: 256 on cuda; on cpu 64 for tiny, else 4)")
    a("--ratios", type=float, nargs="+", default=[0, 0.5, 0.75, 0.9], help="masking ratios to time (0 is added)")
    a("--mask", default="gaussian", choices=masking.MODES, help="random = FLIP, gaussian = GDM-FLIP (same cost)")
    a("--sigma", type=float, default=0.2, help="Gaussian masking's sigma (a variance, as in the paper's code)")
    a("--text-length", type=int, nargs="+", default=[], metavar="L", help="also time each ratio with L text tokens "
      "encoded per caption (the whole context is always timed)")
    a("--text-mask", default="prioritized", choices=masking.TEXT_MODES, help="which L text tokens survive (FLIP's "
      "prioritized drops padding first; every mode costs the same)")
    a("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    a("--precision", default=None, choices=["bf16", "fp32"], help="bf16 autocast (cuda default) or fp32 (cpu default)")
    a("--compile", action="store_true", help="torch.compile the model; each (K, L) is its own static-shape graph")
    a("--steps", type=int, default=20, help="timed steps per ratio")
    a("--warmup", type=int, default=3, help="untimed steps per ratio first (compilation, allocator, cuDNN autotune)")
    a("--check-sync", action="store_true", help="run one step per ratio under torch.cuda.set_sync_debug_mode('error')")
    a("--seed", type=int, default=0, help="seed for the weights, the synthetic batch and the masks")
    a("--json", default=None, metavar="OUT", help="also write the settings and the table to this JSON file")
    a("--openclip", action="store_true", help="also time open_clip_torch's model of the same name (installed "
      "separately) with its patch dropout, side by side")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but this torch sees no CUDA device")
    on_gpu = args.device == "cuda"
    args.model = args.model or ("ViT-B-16" if on_gpu else "tiny")
    if args.batch_size is None:
        args.batch_size = 256 if on_gpu else 64 if args.model == "tiny" else 4
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
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
        except ImportError as e:
            p.error(f"--openclip needs open_clip_torch, which is not installed ({e})")
        if args.model not in open_clip.list_models():
            p.error(f"--openclip: OpenCLIP has no model named {args.model!r}")
    args.ratios = sorted(set([0.0, *args.ratios]))  # ratio 0 is the baseline of every speedup
    args.text_length = sorted(set([context_length, *args.text_length]), reverse=True)  # and the whole text
    return args


def synthetic_batch(cfg, batch_size, device, generator):
    """Random images (B, 3, S, S) and token ids (B, T) whose end-of-text (the largest id) sits at varied positions."""
    S, T, V = cfg.image_size, cfg.context_length, cfg.vocab_size
    images = torch.randn(batch_size, 3, S, S, device=device, generator=generator)
    tokens = torch.randint(1, V - 1, (batch_size, T), device=device, generator=generator)  # ordinary words
    eot = torch.randint(1, T, (batch_size, 1), device=device, generator=generator)  # captions of 2..T tokens
    position = torch.arange(T, device=device)
    tokens = torch.where(position < eot, tokens, 0)  # zero padding after the caption, as CLIP's tokenizer
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
    """Mean wall time of fn() over n calls. CUDA runs asynchronously, so wait for the GPU before reading the clock."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20  # since the reset at the start of this ratio
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the process's peak RSS so far


def step_is_sync_free(step, images, tokens, make_masks):
    """One step (masks included) under which any host-device synchronisation raises: True if none happened."""
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
    """Time `args.steps` training steps at one masking ratio and text length; returns that row of the table as a dict.

    own_mask: the step takes keep_indices (our model); False for a model that drops patches inside (OpenCLIP's)."""
    B = args.batch_size
    images, tokens = synthetic_batch(cfg, B, device, generator)
    masks_patches = ratio > 0 and own_mask
    masks_text = text_length < cfg.context_length

    def make_masks():  # drawn afresh every step as in training; None: encode every patch / every text token
        keep = masking.keep_indices(B, cfg.grid_size, ratio, args.mask, args.sigma, device=device,
                                    generator=generator) if masks_patches else None  # (B, K)
        positions = masking.text_keep_indices(tokens, text_length, args.text_mask,
                                              generator=generator) if masks_text else None  # (B, L)
        return keep, positions

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):  # with --compile the first call at a new (K, L) compiles a new graph
        step(images, tokens, *make_masks())
    step_s = seconds_per_call(lambda: step(images, tokens, *make_masks()), args.steps, device)  # masks included
    masks_s = seconds_per_call(make_masks, args.steps, device) if masks_patches or masks_text else None  # alone
    on_gpu_check = args.check_sync and device.type == "cuda"
    sync_free = step_is_sync_free(step, images, tokens, make_masks) if on_gpu_check else None
    kept = masking.num_kept(cfg.grid_size, ratio)  # every patch at ratio 0
    samples_per_s = B / step_s
    flops = M.train_flops_per_sample(cfg, ratio, text_length)  # as train.py counts them for MFU
    tflops = flops * samples_per_s / 1e12
    peak = M.peak_flops(device)
    return dict(ratio=ratio, kept=kept, text_tokens=text_length, samples_per_s=samples_per_s, step_ms=1e3 * step_s,
                ideal_speedup=M.train_flops_per_sample(cfg, 0.0) / flops, tflops=tflops,
                mfu=None if peak is None else tflops * 1e12 / peak, peak_mem_mib=peak_memory_mib(device),
                mask_fraction=None if masks_s is None else masks_s / step_s, sync_free=sync_free)


def inference_images_per_s(model, cfg, args, device):
    """Images/s of the unmasked image tower as eval.py runs it (no grad, autocast, eager, the bench's batch): beside
    `python bench.py data`'s evaluation pipeline, it tells whether an ImageNet pass is bound by data or by the model."""
    autocast = M.autocast(device, args.precision)
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
    lines = [f"{'ratio':>5} {'kept':>5} {'text':>4} {'samples/s':>10} {'speedup':>8} {'ideal':>7} {'TFLOP/s':>8} "
             f"{'MFU':>6} {memory_kind:>12} {'mask/step':>9} {'sync-free':>9}"]
    for r in rows:  # text: the text tokens encoded per caption
        sync = {None: "-", True: "yes", False: "NO"}[r["sync_free"]]
        lines.append(f"{r['ratio']:5.2f} {r['kept']:5d} {r['text_tokens']:4d} {r['samples_per_s']:10.1f} "
                     f"{r['speedup']:7.2f}x {r['ideal_speedup']:6.2f}x {r['tflops']:8.3f} {fmt(r['mfu'], '.1%'):>6} "
                     f"{r['peak_mem_mib']:12.0f} {fmt(r['mask_fraction'], '.2%'):>9} {sync:>9}")
    return "\n".join(lines)


def openclip_model(name):
    """open_clip_torch's model of the same name, with a PatchDropout module whose prob bench_model sets per ratio."""
    import open_clip  # parse_args checked that it is there and has the model

    # force_patch_dropout puts OpenCLIP's FLIP masking where ours is: after the positional embedding, before ln_pre
    oc = open_clip.create_model(name, force_patch_dropout=0.5)
    return oc, f"OpenCLIP {name} (open_clip_torch {open_clip.__version__})"


def bench_model(orig_model, cfg, args, device, openclip=False):
    """The table's rows for one model: AdamW as train.py's, torch.compile if asked, every ratio in turn, each with the
    whole text and then each shorter text length (OpenCLIP's model: the whole text only).

    cfg: our preset's config, for the shapes and FLOPs (an OpenCLIP model of the same name has the same shapes)."""
    autocast = M.autocast(device, args.precision)
    optimizer = M.configure_optimizer(orig_model, LR, weight_decay=0.2)  # train.py's, as it runs
    model = orig_model
    if args.compile:
        # Each row keeps a different number K of patches and L of text tokens: a new static-shape graph per (K, L)
        # (dynamic=False, so dynamo does not switch to a slower symbolic-shape graph at the second K), plus the
        # keep=None / positions=None graphs.
        graphs = 2 * len(args.ratios) * len(args.text_length)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        model = torch.compile(orig_model, dynamic=False)
    forward = (lambda images, tokens, keep, positions: model(images, tokens)) if openclip else model  # masks inside
    step = make_step(forward, orig_model, optimizer, autocast)
    generator = torch.Generator(device).manual_seed(args.seed)  # the same batches and masks for every model
    text_lengths = args.text_length[:1] if openclip else args.text_length  # [0]: the whole context
    rows = []
    for ratio in args.ratios:
        if openclip:
            orig_model.visual.patch_dropout.prob = ratio  # prob 0 returns the tokens untouched: unmasked
        for text_length in text_lengths:
            rows.append(bench_ratio(ratio, text_length, step, cfg, args, device, generator, own_mask=not openclip))
    for row in rows:
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]  # rows[0] is ratio 0
    return rows


# ----------------------------------------------------------------------------- data pipelines


def fake_photo(rng, short_side):
    """A CC12M-like JPEG for benchmarks: smooth colours, shapes, grain; shortest side `short_side`, aspect to 16:9."""
    aspect = rng.uniform(1, 16 / 9)
    size = (round(short_side * aspect), short_side) if rng.random() < 0.7 else (short_side, round(short_side * aspect))
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(10, short_side / 4)
        shape = photographer.SHAPES[rng.integers(6)]
        draw.polygon(photographer.shape_points(shape, x, y, r, 0), fill=tuple(rng.integers(0, 256, 3).tolist()))
    grain = rng.normal(0, 4, (size[1], size[0], 1))  # texture, so the JPEG is photo-sized (~60-70 kB), not flat
    pixels = np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8)
    return photographer.jpeg_bytes(Image.fromarray(pixels), quality=90)


def images_per_s(loader):
    """Images/s of one pass over `loader`, the first batch (worker start-up, shuffle buffer) not counted."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(batch[0].shape[0] for batch in it)
    return n / (time.perf_counter() - t0)


def shard_loader_factory(photos, tmp, image_size, batch_size):
    """workers -> a training loader over one shard of `photos`, resampled for three passes' worth of batches."""
    captions = [f"a photo of a {c} {s}" for c in photographer.COLOURS for s in photographer.SHAPES]
    shard = os.path.join(tmp, "bench-0000.tar")
    with wds.TarWriter(shard, encoder=False) as tar:
        for i, photo in enumerate(photos):
            tar.write({"__key__": f"{i:06d}", "jpg": photo, "txt": captions[i % len(captions)].encode()})
    tokenizer, num_samples = train_tokenizer(captions, 1024, 77), 3 * len(photos) // batch_size * batch_size
    return lambda w: data.make_train_loader(shard, batch_size, num_samples, image_size, tokenizer, workers=w,
                                            resampled=True)


def folder_loader_factory(photos, tmp, image_size, batch_size):
    """workers -> an evaluation loader over a class folder of `photos`, read as eval.py reads ImageNet."""
    for i, photo in enumerate(photos):
        os.makedirs(os.path.join(tmp, "val", f"c{i % 10}"), exist_ok=True)
        with open(os.path.join(tmp, "val", f"c{i % 10}", f"{i:06d}.jpg"), "wb") as f:
            f.write(photo)
    folder = data.ImageFolder(os.path.join(tmp, "val"), data.eval_crop(image_size))
    return lambda w: DataLoader(folder, batch_size, num_workers=w)


def bench_pipelines(workers, num_images=256, image_size=224, batch_size=32):
    """Images/s of the training pipeline (CC12M-like JPEGs, shortest side 400-500 px, from a shard) and of the
    evaluation pipeline (ImageNet-like, shortest side 333-375 px, from class folders), against a plain PIL
    decode + resize of the same JPEGs in one process."""
    rng = np.random.default_rng(0)
    pipelines = {"training": ((400, 501), shard_loader_factory), "evaluation": ((333, 376), folder_loader_factory)}
    for what, (sides, loader_factory) in pipelines.items():
        photos = [fake_photo(rng, int(rng.integers(*sides))) for _ in range(num_images)]
        print(f"{what}: {num_images} JPEGs of shortest side {sides[0]}-{sides[1] - 1} px, "
              f"mean {sum(map(len, photos)) / len(photos) / 1e3:.0f} kB, {image_size} px output")
        t0 = time.perf_counter()
        for photo in photos:
            Image.open(io.BytesIO(photo)).convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        print(f"  plain PIL decode + resize (1 process): {num_images / (time.perf_counter() - t0):7.1f} images/s")
        with tempfile.TemporaryDirectory() as tmp:
            make_loader = loader_factory(photos, tmp, image_size, batch_size)
            for w in sorted({0, workers}):
                rate = images_per_s(make_loader(w))
                per = f"{rate / max(w, 1):.1f} per {'worker' if w else 'process'}"
                print(f"  {what + ' pipeline,':21}{w:2d} workers:{'':6}{rate:7.1f} images/s ({per})")


def data_main(argv):
    """`python bench.py data`: images/s of the training and evaluation pipelines against a plain PIL decode."""
    p = data.OneLineParser(prog="bench.py data", description=bench_pipelines.__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=1, help="dataloader workers (also measured: 0, in-process)")
    p.add_argument("--num-images", type=int, default=256, help="JPEGs to generate for each pipeline")
    args = p.parse_args(argv)
    if args.workers < 0 or args.num_images < 64:
        p.error("--workers must be >= 0 and --num-images >= 64 (two batches of 32 at least)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a dataloader worker, so the in-process rate compares with theirs
    try:
        bench_pipelines(args.workers, args.num_images)
    finally:
        torch.set_num_threads(threads)




def main(argv=None):
    """Run the benchmark for the given command line; print the table and return its rows (a list of dicts)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        return data_main(argv[1:])
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 leftovers on tensor cores
    torch.manual_seed(args.seed)
    orig_model = M.create_model(args.model).to(device).train()
    cfg = orig_model.config

    grid = cfg.grid_size
    peak = M.peak_flops(device)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model}: {sum(p.numel() for p in orig_model.parameters()) / 1e6:.2f}M parameters, {grid}x{grid} "
          f"patches; batch {args.batch_size}, {args.precision}, compile {args.compile}, {args.mask} masking; text "
          f"{', '.join(map(str, args.text_length))} of {cfg.context_length} tokens ({args.text_mask} when shorter)")
    print(f"device {name}, torch {torch.__version__}; peak for MFU: "
          + ("none known (MFU not reported)" if peak is None else f"{peak / 1e12:.0f} TFLOP/s dense bf16"))
    print(f"{args.warmup} warm-up + {args.steps} timed steps per row; forward GFLOPs per sample (x3 for a step), "
          f"image tower + text tower:")
    for ratio in args.ratios:
        kept = masking.num_kept(grid, ratio)  # every patch at ratio 0
        flops = ", ".join(f"{M.flops_per_sample(cfg, kept, t) / 1e9:.3f} ({t} text tokens)" for t in args.text_length)
        print(f"  ratio {ratio:4.2f}: {kept:4d} patches kept, {flops}")
    if args.check_sync and not on_gpu:
        print("--check-sync: skipped on the CPU (there is no device to synchronise with)")

    memory_kind = "peak MiB" if on_gpu else "peak RSS MiB"  # GPU: allocated tensors; CPU: the whole process
    rows = bench_model(orig_model, cfg, args, device)
    print(format_table(rows, memory_kind))
    inference = inference_images_per_s(orig_model, cfg, args, device)
    print(f"inference, image tower unmasked as eval.py runs it: {inference:.1f} images/s")
    result = {"settings": vars(args), "device": name, "torch": torch.__version__, "memory": memory_kind, "rows": rows,
              "inference_images_per_s": inference}
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
        full_text = [r for r in rows if r["text_tokens"] == cfg.context_length]  # OpenCLIP's rows, in the same order
        print("ours / OpenCLIP samples/s: " + ", ".join(
            f"{r['ratio']:.2f}: {r['samples_per_s'] / o['samples_per_s']:.2f}x" for r, o in zip(full_text, oc_rows)))
        write_json(args.json, result | {"openclip": label, "openclip_rows": oc_rows})
    return rows


def write_json(path, result):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
