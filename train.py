"""
Pre-train CLIP with FLIP (random) or GDM-FLIP (centred, Gaussian) patch masking, tune it unmasked,
and evaluate it zero-shot. One DDP script (FSDP2 with --fsdp, for the models whose weights,
gradients and AdamW state do not fit each GPU); bf16 autocast and torch.compile on GPUs.

With no --train-data it trains the `tiny` preset on the built-in "photographer" dataset (generated
once and cached by photographer.py) and evaluates on its test split, on a laptop CPU in minutes:
    torchrun --nproc_per_node=1 train.py --mask gaussian --ratio 0.5     # or: python train.py ...
The paper's GDM-FLIP run on CC12M, 4 GPUs x 320 = global batch 1280, then unmasked tuning:
    torchrun --nproc_per_node=4 train.py --model ViT-B-16 --mask gaussian --ratio 0.5 \\
        --train-data '/data/cc12m/cc12m-train-{0000..2175}.tar' --train-num-samples 10968539 \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --imagenet-val /data/imagenet/val \\
        --batch-size 320 --lr 1e-3 --crop-scale 0.5 1.0 --epochs 30
    torchrun --nproc_per_node=4 train.py --pretrained logs/RUN/checkpoints/epoch_30.pt \\
        --mask none --batch-size 160 --lr 1e-5 --epochs 1 ...            # the same data flags

One step: uint8 images and token ids from the loader, normalised on the device -> the patches each
image keeps (masking.keep_indices) -> model(images, tokens, keep) -> clip_loss over the global batch
-> backward -> AdamW -> the temperature clamped.
"""

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import checkpoint as ckpt
import data
import masking
import distributed as D
import model as M
import photographer
from eval import training_record
from tokenizer import load_tokenizer, train_tokenizer, trim_padding

# -----------------------------------------------------------------------------
# configuration: flags with literal defaults; those that depend on the data are settled once, below

# (on the built-in dataset, on real data): the tiny preset trains in minutes on a CPU; real data
# gets OpenCLIP's defaults (the README's commands spell out the paper's values)
DATA_DEFAULTS = {"model": ("tiny", "ViT-B-16"), "batch_size": (128, 64), "epochs": (4, 32),
                 "lr": (1e-3, 5e-4), "log_every": (10, 100), "zeroshot_frequency": (1, 2)}
OPENCLIP_WARMUP = 10_000  # steps; a run shorter than 20x this warms up over 5% of its steps instead
COUNT = data.checked(int, lambda v: v >= 1, ">= 1")
NATURAL = data.checked(int, lambda v: v >= 0, ">= 0")
FRACTION = data.checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
POSITIVE = data.checked(float, lambda v: v > 0, "> 0")
NON_NEGATIVE = data.checked(float, lambda v: v >= 0, ">= 0")


def parse_args(argv=None):
    p = data.OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    # the model and the masking
    a("--model", choices=list(M.PRESETS), help="preset (default: tiny on built-in data, else "
      "ViT-B-16)")
    a("--image-size", type=COUNT, help="train at another resolution (RECLIP); --pretrained weights "
      "of another patch grid get their positional embedding resized")
    a("--mask", default="none", choices=["none", *masking.MODES],
      help="none = CLIP, random = FLIP, gaussian = GDM-FLIP")
    a("--ratio", type=FRACTION, default=0.5, help="fraction of the patches --mask drops")
    a("--sigma", type=data.checked(sigma, lambda v: v == "auto" or v > 0, "> 0 or auto"),
      default=0.2,
      help="Gaussian masking's sigma: a variance, as in the paper's code; auto: the paper's 0.2 "
      "unless it leaves patches kept under 1%% of the time, else the smallest sigma that does not "
      "(masking.auto_sigma; where it helps and where not: docs/results.md#picking-sigma)")
    a("--text-length", type=COUNT, help="text tokens per caption in training (FLIP's text masking; "
      "default: the whole context); evaluation reads the whole caption")
    a("--text-mask", default="truncate", choices=masking.TEXT_MODES, help="which tokens "
      "--text-length keeps: the first, random ones, or padding dropped first")
    # data
    a("--train-data", help="webdataset shards, brace patterns joined with '::' (default: built-in)")
    a("--train-num-samples", type=COUNT, help="samples per epoch (required with --train-data)")
    a("--dataset-resampled", action="store_true", help="draw shards with replacement (default: "
      "each epoch reads every shard once, in a fresh order, as the paper's OpenCLIP runs)")
    a("--builtin-layout", default="centered", choices=photographer.LAYOUTS, help="built-in data: "
      "the subject near the centre, anywhere, or against an edge (the controls)")
    a("--builtin-samples", type=COUNT, default=photographer.NUM_TRAIN, help="built-in: images")
    a("--tokenizer", help="CLIP's BPE vocab (bpe_simple_vocab_16e6.txt.gz), a tokenizer.json, or "
      "captions to train on (default: a BPE trained on the training captions)")
    a("--vocab-size", type=data.checked(int, lambda v: v >= 515, ">= 515"),
      help="vocabulary of a tokenizer trained here (default: the preset's)")
    a("--crop-scale", type=float, nargs=2, default=(0.9, 1.0), metavar=("MIN", "MAX"),
      help="random resized crop scale (OpenCLIP's default; the paper used 0.5 1.0)")
    a("--workers", type=NATURAL, help="loader workers per GPU (default: its cores less one; 1 on "
      "the CPU)")
    # optimisation
    a("--batch-size", type=COUNT, help="per-GPU batch (default: 128 on built-in data, else 64)")
    a("--accum-freq", type=COUNT, default=1, help="micro-batches per step (the full-batch loss)")
    a("--local-loss", action="store_true", help="each rank computes the loss of its own images and "
      "texts against all: logits / ranks, the same gradients (OpenCLIP's flag, with its "
      "--gather-with-grad)")
    a("--epochs", type=COUNT, help="epochs (default: 4 on built-in data, else 32 as OpenCLIP)")
    a("--lr", type=NON_NEGATIVE, help="peak learning rate (default: 1e-3 built-in, else 5e-4)")
    a("--wd", type=NON_NEGATIVE, default=0.2, help="AdamW weight decay (OpenCLIP's rule: model.py)")
    a("--beta1", type=FRACTION, default=0.9, help="AdamW beta1")
    a("--beta2", type=FRACTION, default=0.98, help="AdamW beta2")
    a("--eps", type=POSITIVE, default=1e-6, help="AdamW epsilon")
    a("--warmup", type=NATURAL, help=f"linear warmup steps (default: {OPENCLIP_WARMUP} as "
      "OpenCLIP, or 5%% of a run shorter than 20x that)")
    a("--precision", choices=D.PRECISIONS, help=D.PRECISION_HELP)
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each Transformer "
      "block (default: on GPU)")
    a("--grad-checkpointing", action="store_true", help="recompute each Transformer block's "
      "activations in backward instead of keeping them: less memory, one more forward")
    a("--fsdp", action="store_true", help="shard the weights, gradients and AdamW state over the "
      "ranks (FSDP2, each Transformer block a unit) instead of DDP's copy on each: for models that "
      "do not fit (docs/reference.md#clusters); the same checkpoints")
    a("--sync-debug", action="store_true", help="CUDA: raise at any host-device sync inside a "
      "training step (torch.cuda.set_sync_debug_mode); the log window's one sync is outside")
    a("--seed", type=int, default=0, help="seed of the weights, data order, crops and masks")
    # evaluation
    a("--imagenet-val", type=data.existing("directory"), help="ImageNet validation folder (a "
      "folder per WordNet id) for zero-shot")
    a("--zeroshot-data", type=data.existing("directory"), help="any other class-folder test "
      "split (names from its classnames.txt or folders, prompts from its templates.txt or OpenAI's "
      "80)")
    a("--zeroshot-frequency", type=COUNT, help="evaluate every N epochs and at the end (default: "
      "1 on built-in data, else 2 as OpenCLIP)")
    # checkpoints and logs
    a("--pretrained", type=data.existing("file"), help="checkpoint to start from, weights only "
      "(unmasked tuning)")
    a("--resume", type=data.existing("file", allowed=["latest"]), help="checkpoint path, or "
      "'latest' for this run's epoch_latest.pt")
    a("--save-frequency", type=NATURAL, default=1, help="write epoch_K.pt every N epochs and at "
      "the end; 0: only epoch_latest.pt (OpenCLIP's flag)")
    a("--delete-previous-checkpoint", action="store_true", help="delete the previous epoch_K.pt "
      "after writing a new one (OpenCLIP's flag)")
    a("--save-every-n-steps", type=NATURAL, default=0, help="also write epoch_latest.pt every N "
      "steps, mid-epoch (resume continues from that step exactly); 0: only at epochs' ends")
    a("--save-most-recent", action="store_true", help="OpenCLIP's flag for epoch_latest.pt, always "
      "written here: accepted so that OpenCLIP command lines run")
    a("--log-every", type=COUNT, help="log every N steps (default: 10 on built-in data, else 100)")
    a("--report-to", type=ckpt.report_to, default=[], help="also log metrics.jsonl's records to "
      "tensorboard, wandb or both: 'tensorboard,wandb' (OpenCLIP's flag)")
    a("--log-dir", type=data.folder_to_make, default="./logs", help="root of the run folders")
    a("--name", help="run name: the folder under --log-dir (default: date and settings)")
    args = p.parse_args(argv)
    try:
        settle_defaults(args)
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    args.name = args.name or run_name(args)  # each rank makes one; main keeps rank 0's
    return args


def sigma(text):
    return text if text == "auto" else float(text)


def settle_defaults(args):
    """Every default that depends on the data or the machine, in one place: args.json records the
    values the run used."""
    builtin = args.train_data is None
    for key, (on_builtin, on_real_data) in DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, on_builtin if builtin else on_real_data)
    if builtin and args.train_num_samples is None:
        args.train_num_samples = args.builtin_samples
    if args.mask == "none":
        args.ratio = 0.0  # CLIP: every patch
    args.sigma_auto = args.sigma == "auto"
    if args.sigma_auto:  # from the ratio and the patch grid the run trains on
        cfg = M.PRESETS[args.model]
        grid = (args.image_size or cfg.image_size) // cfg.patch_size
        args.sigma = masking.auto_sigma(grid, args.ratio) if args.ratio else 0.2
    on_gpu = torch.cuda.is_available()
    args.precision = args.precision or D.default_precision("cuda" if on_gpu else "cpu")
    args.compile = on_gpu if args.compile is None else args.compile
    args.workers = (data.default_workers(on_gpu, D.launch_env()[3]) if args.workers is None
                    else args.workers)
    if args.warmup is None and args.train_num_samples:
        args.warmup = default_warmup(args.epochs * steps_per_epoch(args, D.launch_env()[2]))


def check_args(args):
    """What a flag's own type cannot check: flags that depend on each other; before any folder,
    dataset or model is made (ValueError: one line)."""
    cfg, world_size = M.PRESETS[args.model], D.launch_env()[2]
    if args.text_length is not None and not 2 <= args.text_length <= cfg.context_length:
        raise ValueError(f"--text-length must be in [2, {cfg.context_length}] (the start and "
                         f"end-of-text tokens, up to {args.model}'s context), got "
                         f"{args.text_length}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise ValueError("--crop-scale must be MIN MAX with 0 < MIN <= MAX <= 1, got "
                         f"{args.crop_scale}")
    if args.image_size is not None and args.image_size % cfg.patch_size:
        raise ValueError(f"--image-size must be a multiple of {args.model}'s patch size "
                         f"{cfg.patch_size}, got {args.image_size}")
    if args.train_data and not args.train_num_samples:
        raise ValueError("--train-num-samples is required with --train-data (samples per epoch)")
    if steps_per_epoch(args, world_size) < 1:
        raise ValueError(f"--train-num-samples {args.train_num_samples} is smaller than one global "
                         f"batch ({args.batch_size * args.accum_freq * world_size})")
    if args.sync_debug and not torch.cuda.is_available():
        raise ValueError("--sync-debug needs a CUDA device: it checks host-device syncs")
    if args.imagenet_val and args.zeroshot_data:
        raise ValueError("pass --imagenet-val or --zeroshot-data, not both")
    if args.pretrained and args.resume:
        raise ValueError("use --pretrained (weights only, fresh optimizer) or --resume (the whole "
                         "state), not both")
    if args.resume == "latest" and not args.name:
        raise ValueError("--resume latest needs the --name of the run to continue")


def steps_per_epoch(args, world_size):
    """Optimizer steps per epoch: every rank makes train_num_samples // (batch * ranks) batches."""
    return args.train_num_samples // (args.batch_size * world_size) // args.accum_freq


def run_name(args):
    size = [] if args.image_size is None else [f"{args.image_size}px"]
    mask = args.mask if args.mask == "none" else f"{args.mask}{args.ratio:g}"
    return "-".join([time.strftime("%Y_%m_%d-%H_%M_%S"), args.model, *size, mask,
                     f"b{args.batch_size}", f"lr{args.lr:g}", f"s{args.seed}"])


# -----------------------------------------------------------------------------
# one training step


def default_warmup(total_steps):
    """OpenCLIP's 10,000 steps when the run is long enough (the paper's: ~257k), else 5% of it."""
    return OPENCLIP_WARMUP if total_steps >= 20 * OPENCLIP_WARMUP else max(1, total_steps // 20)


def lr_at(step, base_lr, warmup, total):
    """Linear warmup to base_lr, then cosine decay to 0 (OpenCLIP's cosine schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def next_step_batches(batches, args, grid_size, device, generator, log):
    """The accum_freq micro-batches of one step on the device, [(images, tokens)], with their image
    masks (None for CLIP) and text positions (None for whole captions). The time blocked on the
    loader and the bad samples it skipped go to the log window."""
    micro, keeps, text_keeps = [], [], []
    for _ in range(args.accum_freq):
        t = time.time()
        images, tokens, skipped = next(batches)
        log.waited += time.time() - t
        log.skipped += skipped
        if args.text_length is None:  # whole captions: the padding after the longest is inert
            tokens = trim_padding(tokens)  # (B, T) -> (B, T'), still on the host
        images = data.normalize(images.to(device, non_blocking=True))  # uint8 -> (B, 3, S, S) float
        tokens = tokens.to(device, non_blocking=True)  # (B, T)
        keep = None if args.mask == "none" else masking.keep_indices(
            len(images), grid_size, args.ratio, args.mask, args.sigma, device, generator)  # (B, K)
        positions = None
        if args.text_length is not None and args.text_length < tokens.shape[1]:  # FLIP's text mask
            positions = masking.text_keep_indices(tokens, args.text_length, args.text_mask,
                                                  generator)
            tokens = tokens.gather(1, positions)  # (B, L), encoded at their own positions
        micro.append((images, tokens))
        keeps.append(keep)
        text_keeps.append(positions)
    return micro, keeps, text_keeps


def forward_backward(model, micro_batches, keeps, autocast, world_size, text_keeps=None,
                     local_loss=False):
    """Loss and gradients of the contrastive loss over the whole global batch, micro-batch by
    micro-batch.

    The InfoNCE loss of a batch does not split into a sum over micro-batches (every image is
    contrasted with every text), so with accumulation we do what OpenCLIP does: embed all
    micro-batches without gradients first, then re-embed one at a time with gradients, splicing its
    features into the cached ones. Each backward then gives the gradient of the full loss through
    that micro-batch; DDP (or FSDP) reduces only on the last one (distributed.no_grad_sync).
    Gradients through the other ranks' features arrive by that average, hence the factor
    world_size. The logit scale is the exception: every rank and micro-batch sees all of it, so its
    gradient is divided.
    local_loss: each rank computes its share of the loss instead (distributed.local_clip_loss,
    logits world_size times smaller); the other ranks' gradients reach its features through the
    gather, and the average of the shares' gradients is the global loss's: no factor. The
    returned loss is the global one either way (the shares' mean).
    keeps: each micro-batch's (B, K) kept patches or None; text_keeps: its (B, L) positions or None.
    """
    n = len(micro_batches)
    weight = 1 if local_loss else world_size  # the gradient's factor, as above
    steps = list(zip(micro_batches, keeps, text_keeps or [None] * n))
    cached = None
    if n > 1:
        with torch.no_grad(), autocast:
            cached = [model(images, tokens, keep, pos)[:2] for (images, tokens), keep, pos in steps]
    for j, ((images, tokens), keep, positions) in enumerate(steps):
        with nullcontext() if j == n - 1 else D.no_grad_sync(model):
            with autocast:
                image_features, text_features, scale = model(images, tokens, keep, positions)
            if n > 1:  # the other micro-batches' cached features around this one's
                image_features = torch.cat([c[0] for c in cached[:j]] + [image_features]
                                           + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [text_features]
                                          + [c[1] for c in cached[j + 1:]])
            if scale.requires_grad:  # each micro-batch (and rank, but for shares) sees all of it
                scale.register_hook(lambda grad: grad / (n * weight))
            if local_loss:
                loss = D.local_clip_loss(image_features.float(), text_features.float(), scale)
            else:
                loss = M.clip_loss(D.gather_features(image_features.float()),
                                   D.gather_features(text_features.float()), scale)
            (loss * weight).backward()
    loss = loss.detach()
    if local_loss and world_size > 1:  # no host-device sync: the sum stays on the device
        dist.all_reduce(loss)
        loss /= world_size
    return loss


def train_step(model, orig_model, optimizer, micro, keeps, text_keeps, autocast, lr, world_size=1,
               local_loss=False):
    """One optimizer step at learning rate `lr`: what the loop below runs and bench.py times.
    Returns the loss, still on the device (no host-device sync). orig_model: the module inside
    DDP's wrapper, whose temperature is clamped."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = forward_backward(model, micro, keeps, autocast, world_size, text_keeps, local_loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    M.clamp_logit_scale(orig_model)
    return loss


# -----------------------------------------------------------------------------
# the phases of a run


def fail(message):
    sys.exit(f"train.py: error: {message}")


def prepare_data(args, local_rank, world_size, say):
    """(shard pattern, test folder or None): the built-in dataset is generated once per machine
    (cached), by local rank 0."""
    if args.train_data is not None:
        return args.train_data, None
    say("no --train-data: training on the built-in 'photographer' dataset (python photographer.py "
        "--help);\n  for real data pass e.g. --train-data "
        "'/data/cc12m/cc12m-train-{0000..2175}.tar' --train-num-samples 10968539 "
        "--imagenet-val /data/imagenet/val --model ViT-B-16")
    if local_rank != 0:
        dist.barrier()  # local rank 0 generates it, the others then read it
    builtin = photographer.builtin_dataset(args.builtin_layout, num_train=args.builtin_samples)
    if local_rank == 0 and world_size > 1:
        dist.barrier()
    say(f"  built-in training shards {builtin['train']}\n  built-in test split {builtin['test']}")
    return builtin["train"], builtin["test"]


def build_model_and_tokenizer(args, checkpoint, rank, train_data):
    """(model on the CPU, tokenizer): --pretrained's weights, a --resume checkpoint's, or fresh
    from the preset. A tokenizer trained here is trained on rank 0 and sent to the others."""
    if args.pretrained:
        model, tokenizer = ckpt.load_checkpoint(args.pretrained, args.model, args.tokenizer,
                                                image_size=args.image_size)
        return model.train(), tokenizer
    cfg = M.CLIPConfig(**checkpoint["config"]) if checkpoint else M.PRESETS[args.model]
    if checkpoint and args.image_size not in (None, cfg.image_size):
        raise ValueError(f"--resume continues at the checkpoint's {cfg.image_size} px, not "
                         f"--image-size {args.image_size}; to start from its weights at another "
                         "resolution use --pretrained")
    spec = checkpoint["tokenizer"] if checkpoint else args.tokenizer
    if spec is None and rank == 0:  # train a BPE on the captions, on rank 0
        captions, vocab = data.read_captions(train_data), args.vocab_size or cfg.vocab_size
        spec = train_tokenizer(captions, vocab, cfg.context_length).to_json()
    tokenizer = load_tokenizer(D.from_rank_zero(spec), cfg.context_length)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if checkpoint:
        return M.CLIP(cfg), tokenizer
    size = {} if args.image_size is None else {"image_size": args.image_size}
    return M.create_model(args.model, vocab_size=tokenizer.vocab_size, **size), tokenizer


class LogWindow:
    """The steps since the last log line. Losses stay on the device until the window closes: one
    host-device sync per window, not per step. `waited`: the time blocked on the loader (near all
    of the window: data-bound)."""

    def __init__(self, samples_per_step, flops_per_step, peak_flops, total_steps, per_epoch):
        self.samples_per_step, self.flops_per_step, self.peak = samples_per_step, flops_per_step, \
            peak_flops
        self.total_steps, self.per_epoch = total_steps, per_epoch
        self.skipped = torch.zeros((), dtype=torch.long)  # bad samples since the run (re)started
        self.reset()

    def reset(self):
        self.losses, self.start, self.waited, self.untimed = [], time.time(), 0.0, 0

    def start_clock(self):
        """Time the window from here: the steps so far (the first after a start, which compiles)
        count in its loss, not in its samples/s, MFU or data wait."""
        self.start, self.waited, self.untimed = time.time(), 0.0, len(self.losses)

    def close(self, step, lr, logit_scale, elapsed):
        """The window's record for metrics.jsonl and its log line; stops on a non-finite loss."""
        losses = torch.stack(self.losses).tolist()
        if bad := [i for i, v in enumerate(losses) if not math.isfinite(v)]:
            fail(f"loss is {losses[bad[0]]} at step {step - len(losses) + bad[0] + 1}; stopping "
                 "without saving")
        dt, n = time.time() - self.start, len(losses) - self.untimed  # n: the timed steps
        r = {"step": step, "epoch": round(step / self.per_epoch, 3),
             "loss": sum(losses) / len(losses), "lr": lr, "logit_scale": logit_scale,
             "samples_per_s": None, "mfu": None,
             "data_wait": None, "skipped": int(self.skipped), "time": elapsed}
        line = (f"step {step}/{self.total_steps} epoch {r['epoch']:.2f} | loss {r['loss']:.4f} | "
                f"lr {lr:.2e} | scale {logit_scale:.1f}")
        if n:  # a window of the first step alone has nothing timed
            r |= {"samples_per_s": n * self.samples_per_step / dt, "data_wait": self.waited / dt,
                  "mfu": self.flops_per_step * n / dt / self.peak if self.peak else None}
            line += (f" | {r['samples_per_s']:.0f} samples/s"
                     + (f" | mfu {100 * r['mfu']:.1f}%" if r["mfu"] else "")
                     + f" | data wait {100 * r['data_wait']:.0f}%")
        line += f" | skipped {r['skipped']}"
        line += f" | eta {(self.total_steps - step) * dt / n / 60:.1f} min" if n else ""
        self.reset()
        return r, line


def save(state, ckpt_dir, epoch, master, numbered, delete_previous=False):
    """Rank 0 writes the checkpoint (one line when it cannot: the previous one stays); all wait."""
    if master:
        try:
            ckpt.save_checkpoint(state, ckpt_dir, epoch, numbered, delete_previous)
        except OSError as e:
            fail(e)
    D.barrier()  # no rank runs ahead while rank 0 evaluates and saves


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    args = parse_args(argv)
    try:
        rank, local_rank, world_size, device = D.setup_distributed()
    except ValueError as e:
        fail(e)
    master = rank == 0  # prints, writes checkpoints and metrics.jsonl
    say = print if master else (lambda *a, **k: None)
    args.name = D.from_rank_zero(args.name)  # the name holds a time: rank 0's
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = D.autocast(device, args.precision)  # bf16 autocast, or a no-op for fp32

    # data, model and tokenizer, the run folder: what cannot be read or written is one line now
    run_dir = os.path.join(args.log_dir, args.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    try:
        train_data, test_dir = prepare_data(args, local_rank, world_size, say)
        checkpoint = ckpt.resume_state(args.resume, run_dir)
        orig_model, tokenizer = build_model_and_tokenizer(args, checkpoint, rank, train_data)
        loader = data.make_train_loader(train_data, args.batch_size, args.train_num_samples,
                                        orig_model.config.image_size, tokenizer, args.workers,
                                        args.seed, rank, world_size, scale=tuple(args.crop_scale),
                                        resampled=args.dataset_resampled)
        # metrics.jsonl and --report-to's writers, on rank 0 (None elsewhere)
        metrics = ckpt.open_run_folder(run_dir, checkpoint["step"] if checkpoint else None, rank,
                                       args.report_to, vars(args))
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    cfg = orig_model.config

    # the model wrapped (DDP) or sharded (FSDP), then the optimizer of what it trains, or the
    # whole state of a --resume checkpoint, whichever of the two wrote it
    orig_model.to(device)
    orig_model.set_grad_checkpointing(args.grad_checkpointing)
    if args.compile:  # each block in place (regional): seconds, and no `_orig_mod.` in the keys
        D.compile_blocks(orig_model)
    # DDP's wrapper around it on several ranks, or with --fsdp orig_model itself, sharded;
    # orig_model is what is saved and evaluated
    model = D.wrap_model(orig_model, device, world_size, args.fsdp, args.precision)
    betas = (args.beta1, args.beta2)
    optimizer = M.configure_optimizer(orig_model, args.lr, args.wd, betas, args.eps)
    start_epoch, step, elapsed, position = 0, 0, 0.0, None
    if checkpoint:
        start_epoch, step, elapsed = ckpt.restore_training_state(checkpoint, orig_model, optimizer)
        position = checkpoint.get("position")  # None at an epoch's end
        say(f"resumed from {checkpoint['path']} at epoch {start_epoch}, step {step}"
            + (" (in the middle of the epoch)" if position else ""))
    t0, start_step = time.time() - elapsed, step  # wall time counts on across resumes

    # the arithmetic of the run, printed (as nanoGPT does) and written to args.json
    per_epoch = steps_per_epoch(args, world_size)
    total_steps = per_epoch * args.epochs
    global_batch = args.batch_size * args.accum_freq * world_size
    flops = M.train_flops_per_sample(cfg, args.ratio, args.text_length)
    kept, text = M.encoded_tokens(cfg, args.ratio, args.text_length)
    params = sum(p.numel() for p in orig_model.parameters())
    say(f"run {run_dir}: {args.model} ({params / 1e6:.2f}M parameters), mask {args.mask}, ratio "
        f"{args.ratio:g}, sigma {args.sigma:g}{' (auto)' * args.sigma_auto}: {kept} of "
        f"{cfg.grid_size ** 2} patches encoded, "
        f"{text} of {cfg.context_length} text tokens"
        + (f" ({args.text_mask})" if text < cfg.context_length else ""))
    say(f"global batch {args.batch_size} x {args.accum_freq} accum x {world_size} ranks = "
        f"{global_batch}; {per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; "
        f"warmup {args.warmup} steps; {flops / 1e9:.2f} GFLOPs per sample per step; {device}, "
        f"{args.precision}, compile {args.compile}, {args.workers} workers"
        + (", blocks checkpointed" if args.grad_checkpointing else "")
        + (f"; FSDP: 1/{world_size} of the weights, gradients and AdamW state on each rank"
           if args.fsdp else ""))
    if master:
        trained_here = not (args.tokenizer or checkpoint or args.pretrained)
        ckpt.write_run_config(run_dir, args, cfg, world_size, tokenizer if trained_here else None)
    flops_per_step = flops * args.batch_size * args.accum_freq  # this rank's, against its own GPU
    log = LogWindow(global_batch, flops_per_step, D.peak_flops(device), total_steps, per_epoch)
    if position:  # the log window the interrupted run had open goes on
        log.losses, log.skipped = [torch.tensor(v) for v in position["window"]], position["skipped"]

    preemption = ckpt.Preemption(world_size)  # SIGTERM / SIGUSR1: stop at a step and save it
    signum = 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        mine = position["ranks"][rank] if position and epoch == start_epoch else None
        try:
            loader.set_epoch(epoch, mine and mine["loader"])  # mid-epoch: reads past, no decoding
        except ValueError as e:
            fail(e)
        # an epoch's masks are a function of (seed, epoch, rank): a resumed run draws what the
        # uninterrupted one drew
        seed = data.derived_seed(args.seed, "masks", epoch, rank)
        mask_gen = torch.Generator(device).manual_seed(seed)
        if mine:
            mask_gen.set_state(mine["masks"])
        batches = iter(loader)
        for _ in range(step - epoch * per_epoch, per_epoch):  # all of it, or what a resume left
            with D.syncs_raise(args.sync_debug):  # --sync-debug: a host-device sync here raises
                micro, keeps, text_keeps = next_step_batches(batches, args, cfg.grid_size, device,
                                                             mask_gen, log)
                lr = lr_at(step, args.lr, args.warmup, total_steps)
                loss = train_step(model, orig_model, optimizer, micro, keeps, text_keeps, autocast,
                                  lr, world_size, args.local_loss)
            log.losses.append(loss)
            step += 1
            if step == start_step + 1:
                log.start_clock()  # the first step compiles: not counted in samples/s or MFU
            if step % args.log_every == 0 or step % per_epoch == 0:
                scale = orig_model.logit_scale.exp().item()
                record, line = log.close(step, lr, scale, time.time() - t0)
                say(line)
                if master:
                    metrics.append(record, "train")
            signum = preemption.requested()  # the same on every rank, at the same step
            if signum or (args.save_every_n_steps and step % args.save_every_n_steps == 0
                          and step % per_epoch):  # mid-epoch: epoch_latest.pt, of this step
                where = ckpt.mid_epoch_position(loader, mask_gen, log.losses, log.skipped)
                state = ckpt.training_state(orig_model, optimizer, tokenizer, args, epoch, step,
                                            time.time() - t0, where)  # every rank: FSDP gathers
                save(state, ckpt_dir, epoch, master, numbered=False)
            if signum:
                break
        if signum:  # saved at this step: every rank leaves the loop together
            break

        done, eval_root = epoch + 1, args.imagenet_val or args.zeroshot_data or test_dir
        if eval_root and (done % args.zeroshot_frequency == 0 or done == args.epochs):
            with torch.compiler.set_stance("force_eager"):  # other shapes: no recompiles
                try:
                    # FSDP: a whole copy on each rank, as eval.py shares the images out
                    record = training_record(ckpt.evaluation_model(orig_model), tokenizer,
                                             eval_root, args.mask, args.ratio, args.sigma,
                                             workers=args.workers,
                                             batch_size=max(args.batch_size, 256), device=device,
                                             imagenet=bool(args.imagenet_val),
                                             precision=args.precision)
                except ValueError as e:  # e.g. most images of the folder unreadable
                    fail(f"zero-shot evaluation on {eval_root}: {e}")
            say("zero-shot " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if "top" in k))
            if master:
                metrics.append({"step": step, "epoch": done, **record, "time": time.time() - t0},
                               "val")
        state = ckpt.training_state(orig_model, optimizer, tokenizer, args, done, step,
                                    time.time() - t0)  # None but on rank 0
        numbered = args.save_frequency > 0 and (done % args.save_frequency == 0
                                                or done == args.epochs)
        save(state, ckpt_dir, done, master, numbered, args.delete_previous_checkpoint)
        log.reset()  # the next window times training only
        if signum := preemption.requested():  # during evaluation or saving: saved already
            break
    if not signum:
        say(f"done in {(time.time() - t0) / 60:.1f} min; checkpoints and metrics.jsonl in "
            f"{run_dir}")
    if master:
        metrics.close()
        ckpt.release_lock(run_dir)
    if world_size > 1:  # together: no rank tears its group down under another's last collective
        D.barrier()
        del model  # DDP's reducer holds the group: it goes first, then the group's threads
        D.teardown()
    if signum:
        preemption.stop(signum, step, rank, run_dir)  # one line, exit status 75


if __name__ == "__main__":
    main()
