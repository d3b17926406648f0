"""
Pre-train CLIP with FLIP (random) or GDM-FLIP (Gaussian, centred) patch masking, tune unmasked, and evaluate zero-shot.
One script, DDP from torchrun's environment, bf16 autocast and torch.compile on GPU.

With no --train-data it trains the `tiny` preset on the built-in "photographer" dataset (generated once, cached) and
evaluates on its test split, so the whole path runs on a laptop CPU in a few minutes:
    torchrun --nproc_per_node=1 train.py --mask gaussian --ratio 0.5          # or plain: python train.py ...
GDM-FLIP on CC12M with ImageNet zero-shot evaluation, 8 GPUs (see README for the paper's settings):
    torchrun --nproc_per_node=8 train.py --model ViT-B-16 --mask gaussian --ratio 0.5 \\
        --train-data '/data/cc12m/cc12m-train-{0000..2175}.tar' --train-num-samples 10968539 \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --imagenet-val /data/imagenet/val --batch-size 256 --epochs 30
Unmasked tuning continues from a masked checkpoint with a fresh optimizer and schedule:
    torchrun ... train.py --pretrained logs/RUN/checkpoints/epoch_30.pt --mask none --epochs 1 --lr 1e-5 ...
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import eval as zeroshot  # `eval` would shadow the builtin
import masking
import model as M
import photographer
import tokenizer as tokenizer_lib  # `tokenizer` is the name of the object train.py uses


def parse_args(argv=None):
    p = data.OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default=None, choices=list(M.PRESETS), help="model preset (default: ViT-B-16 with --train-data, "
      "else tiny)")
    a("--mask", default="none", choices=["none", *masking.MODES], help="none = CLIP, random = FLIP, gaussian = GDM-FLIP")
    a("--ratio", type=float, default=0.5, help="fraction of patches dropped when --mask is random or gaussian")
    a("--sigma", type=float, default=0.2, help="Gaussian masking's sigma, used as a variance as in the paper's code")
    a("--train-data", default=None, help="webdataset shards, brace patterns joined with '::' (default: built-in dataset)")
    a("--train-num-samples", type=int, default=None, help="samples per epoch (shards are resampled, as OpenCLIP)")
    a("--builtin-layout", default="centered", choices=photographer.LAYOUTS,
      help="built-in dataset: subject near the centre, anywhere, or against an edge (the controls)")
    a("--builtin-samples", type=int, default=20_000, help="built-in dataset: number of training images generated")
    a("--tokenizer", default=None, help="CLIP BPE vocab (bpe_simple_vocab_16e6.txt.gz), tokenizer.json, or a captions "
      "file/folder; default: train a BPE tokenizer on the training captions")
    a("--vocab-size", type=int, default=None, help="vocabulary of a tokenizer trained here (default: the preset's)")
    a("--crop-scale", type=float, nargs=2, default=(0.9, 1.0), help="random resized crop scale (FLIP used 0.5 1.0)")
    a("--batch-size", type=int, default=None, help="per-GPU batch size (default: 256, or 128 on the built-in dataset)")
    a("--accum-freq", type=int, default=1, help="micro-batches per optimizer step; the loss stays the full-batch loss")
    a("--epochs", type=int, default=None, help="epochs (default: 30 as the paper, or 4 on the built-in dataset)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 5e-4 as OpenCLIP, or 1e-3 on built-in data)")
    a("--wd", type=float, default=0.2, help="AdamW weight decay (not on biases, norms, logit scale, embeddings)")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.98, help="AdamW beta2")
    a("--eps", type=float, default=1e-6, help="AdamW epsilon")
    a("--warmup", type=int, default=None, help="linear warmup steps (default: 10000, or 5%% of steps on built-in data)")
    a("--workers", type=int, default=None, help="dataloader workers per GPU (default: the cores per GPU less one; "
      "1 on CPU)")
    a("--imagenet-val", default=None, help="ImageNet validation folder (one folder per WordNet id) for zero-shot")
    a("--zeroshot-data", default=None, help="any other class-folder test split for zero-shot (class names from its "
      "classnames.txt or the folder names, templates from its templates.txt or OpenAI's 80)")
    a("--zeroshot-frequency", type=int, default=1, help="evaluate zero-shot every N epochs (and always at the end)")
    a("--pretrained", default=None, help="checkpoint to start from, weights only (unmasked tuning)")
    a("--resume", default=None, help="checkpoint path, or 'latest' for this run's epoch_latest.pt")
    a("--precision", default=None, choices=["bf16", "fp32"], help="bf16 autocast (GPU default) or fp32 (CPU default)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on GPU only)")
    a("--seed", type=int, default=0, help="seed for initialisation, data order, crops and masks")
    a("--log-every", type=int, default=None, help="log a window every N steps (default: 50, or 10 on built-in data)")
    a("--log-dir", default="./logs", help="root of the run folders")
    a("--name", default=None, help="run name: the folder under --log-dir (default: date and settings)")
    args = p.parse_args(argv)
    if args.mask == "none":
        args.ratio = 0.0
    try:
        masking.check_args(2, args.ratio, "random" if args.mask == "none" else args.mask, args.sigma)
    except ValueError as e:
        p.error(str(e))
    if args.train_data and not args.train_num_samples:
        p.error("--train-num-samples is required with --train-data (shards are resampled)")
    if args.resume == "latest" and not args.name:
        p.error("--resume latest needs the --name of the run to continue")
    if args.imagenet_val and args.zeroshot_data:
        p.error("pass --imagenet-val or --zeroshot-data, not both")
    if args.pretrained and args.resume:
        p.error("use --pretrained (weights only, fresh optimizer) or --resume (the whole state), not both")
    builtin = args.train_data is None
    defaults = dict(model="tiny" if builtin else "ViT-B-16", batch_size=128 if builtin else 256,
                    epochs=4 if builtin else 30, lr=1e-3 if builtin else 5e-4,
                    log_every=10 if builtin else 50)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- distributed


def setup_distributed():
    """(rank, local_rank, world_size, device) from torchrun's environment; plain `python train.py` is rank 0 of 1."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in [("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


@contextmanager
def rank_zero_first(master, world_size):
    """Rank 0 runs the body first (e.g. writes a file); the other ranks run it once rank 0 is done."""
    if world_size > 1 and not master:
        dist.barrier()
    yield
    if world_size > 1 and master:
        dist.barrier()


def gather_features(features):
    """(B, E) on each rank -> (W*B, E) on every rank; the gradient flows back to this rank's own (B, E) slice only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach())
    gathered[dist.get_rank()] = features  # put back the tensor that autograd knows
    return torch.cat(gathered)


# ----------------------------------------------------------------------------- optimisation


def param_groups(model, weight_decay):
    """Decay matrices only: not biases, LayerNorm gains, the logit scale, or the class/positional embeddings."""
    no_decay = lambda n, p: p.ndim < 2 or "positional_embedding" in n or "class_embedding" in n  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0}]


def lr_at(step, base_lr, warmup, total):
    """Linear warmup to base_lr, then cosine decay to 0 (OpenCLIP's cosine schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def forward_backward(model, micro_batches, keeps, autocast, world_size):
    """Loss and gradients of the contrastive loss over the whole global batch, micro-batch by micro-batch.

    The InfoNCE loss of a batch does not split into a sum over micro-batches (every image is contrasted with every
    text), so with accumulation we do what OpenCLIP does: embed all micro-batches without gradients first, then
    re-embed one micro-batch at a time with gradients, splicing its features into the cached ones. Each backward then
    gives the gradient of the full loss through that micro-batch. DDP all-reduces only on the last one (no_sync).
    Gradients through the other ranks' features arrive via DDP's average, hence the factor world_size.
    The logit scale is the exception: every rank and every micro-batch sees all of it, so its gradient is divided.
    """
    n = len(micro_batches)
    cached = None
    if n > 1:
        with torch.no_grad(), autocast:
            cached = [model(images, tokens, keep)[:2] for (images, tokens), keep in zip(micro_batches, keeps)]
    for j, ((images, tokens), keep) in enumerate(zip(micro_batches, keeps)):
        sync = nullcontext() if j == n - 1 or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with autocast:
                image_features, text_features, scale = model(images, tokens, keep)
            if n > 1:
                image_features = torch.cat([c[0] for c in cached[:j]] + [image_features] + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [text_features] + [c[1] for c in cached[j + 1:]])
            if scale.requires_grad:  # each rank and micro-batch sees all of the temperature: count its gradient once
                scale.register_hook(lambda grad: grad / (n * world_size))
            loss = M.clip_loss(gather_features(image_features.float()), gather_features(text_features.float()), scale)
            (loss * world_size).backward()
    return loss.detach()


# ----------------------------------------------------------------------------- checkpoints and logs


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(state, ckpt_dir, epoch):
    path = os.path.join(ckpt_dir, f"epoch_{epoch}.pt")
    save_atomic(state, path)
    latest, tmp = os.path.join(ckpt_dir, "epoch_latest.pt"), os.path.join(ckpt_dir, f"latest.tmp{os.getpid()}")
    try:
        os.link(path, tmp)  # a second name for the same bytes: no second write of a large file
        os.replace(tmp, latest)
    except OSError:
        save_atomic(state, latest)


def log_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_name(args):
    return "-".join([time.strftime("%Y_%m_%d-%H_%M_%S"), args.model, args.mask if args.mask == "none" else
                     f"{args.mask}{args.ratio:g}", f"b{args.batch_size}", f"lr{args.lr:g}", f"s{args.seed}"])


def evaluate(model, tokenizer, args, root, device, step, epoch, t0):
    """Zero-shot top-1/top-5 with inference unmasking (all patches) and, for masked runs, with the training mask."""
    record = {"step": step, "epoch": epoch}
    settings = [("zeroshot", "none")] + ([("zeroshot_masked", args.mask)] if args.mask != "none" else [])
    for prefix, mask in settings:
        result = zeroshot.evaluate_folder(model, tokenizer, root, batch_size=max(args.batch_size, 256),
                                          workers=args.workers, device=device, mask=mask, ratio=args.ratio,
                                          sigma=args.sigma, imagenet=bool(args.imagenet_val))
        record |= {f"{prefix}_top1": result["acc1"], f"{prefix}_top5": result["acc5"],
                   f"{prefix}_mean_per_class_recall": result["mean_per_class_recall"]}
    record["time"] = time.time() - t0
    return record


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, world_size, device = setup_distributed()
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    on_gpu = device.type == "cuda"
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.compile = on_gpu if args.compile is None else args.compile
    args.workers = args.workers if args.workers is not None else data.default_workers(on_gpu)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = M.autocast(device, args.precision)  # bf16 autocast, or a no-op for fp32

    # --- run folder
    args.name = args.name or run_name(args)
    run_dir = os.path.join(args.log_dir, args.name)
    ckpt_dir, metrics_path = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "metrics.jsonl")
    resume = os.path.join(ckpt_dir, "epoch_latest.pt") if args.resume == "latest" else args.resume
    if resume and not os.path.isfile(resume):
        sys.exit(f"train.py: error: no checkpoint to resume at {resume}")
    if not resume and os.path.exists(os.path.join(ckpt_dir, "epoch_latest.pt")):
        sys.exit(f"train.py: error: {run_dir} already has checkpoints; pass --resume latest or another --name")
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)

    # --- data: the built-in dataset is generated once by rank 0, the others wait and then read the same files
    test_dir = None
    try:
        for flag, folder in [("--imagenet-val", args.imagenet_val), ("--zeroshot-data", args.zeroshot_data)]:
            if folder and not os.path.isdir(folder):
                raise FileNotFoundError(f"{flag} {folder} is not a directory")
        if args.train_data is None:
            say("no --train-data: training on the built-in 'photographer' dataset (python photographer.py --help);")
            say("  for real data pass e.g. --train-data '/data/cc12m/cc12m-train-{0000..2175}.tar' "
                "--train-num-samples 10968539 --imagenet-val /data/imagenet/val --model ViT-B-16")
            with rank_zero_first(master, world_size):  # rank 0 generates it (once, cached), the others then read it
                builtin = photographer.builtin_dataset(layout=args.builtin_layout, num_train=args.builtin_samples, seed=0)
            args.train_data, test_dir = builtin["train"], builtin["test"]
            args.train_num_samples = args.train_num_samples or args.builtin_samples
        data.expand_urls(args.train_data)  # fails here, before any training, if a pattern matches nothing
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"train.py: error: {e}")

    # --- model and tokenizer: from a checkpoint (pretrained / resume), a given tokenizer, or one trained here
    checkpoint = torch.load(resume, map_location="cpu", weights_only=False) if resume else None
    if args.pretrained:
        orig_model, tokenizer = zeroshot.load_checkpoint(args.pretrained, args.model, args.tokenizer, device="cpu")
        orig_model.train()
        cfg = orig_model.config
    else:
        cfg = M.CLIPConfig(**checkpoint["config"]) if checkpoint else M.PRESETS[args.model]
        tok_spec = checkpoint["tokenizer"] if checkpoint else args.tokenizer
        if tok_spec is None:  # train one on the captions (rank 0), save it with the run, the others load it
            tok_spec = os.path.join(run_dir, "tokenizer.json")
            with rank_zero_first(master, world_size):
                if master:
                    tok = tokenizer_lib.train_tokenizer(data.read_captions(args.train_data), args.vocab_size or cfg.vocab_size,
                                               cfg.context_length)
                    with open(tok_spec, "w") as f:
                        f.write(tok.to_json())
        tokenizer = tokenizer_lib.load_tokenizer(tok_spec, cfg.context_length)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        orig_model = M.CLIP(cfg) if checkpoint else M.create_model(args.model, vocab_size=tokenizer.vocab_size)
        cfg = orig_model.config
    orig_model.to(device)

    loader = data.make_train_loader(args.train_data, args.batch_size, args.train_num_samples, cfg.image_size, tokenizer,
                                    workers=args.workers, seed=args.seed, rank=rank, world_size=world_size,
                                    scale=tuple(args.crop_scale))
    steps_per_epoch = loader.num_batches // args.accum_freq
    total_steps = steps_per_epoch * args.epochs
    if steps_per_epoch < 1:
        sys.exit("train.py: error: --train-num-samples is smaller than one global batch")
    warmup = args.warmup if args.warmup is not None else (10_000 if test_dir is None else max(1, total_steps // 20))

    optimizer = torch.optim.AdamW(param_groups(orig_model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps, fused=on_gpu)
    start_epoch, step = 0, 0
    if checkpoint:
        orig_model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        torch.set_rng_state(checkpoint["rng_state"])
        say(f"resumed from {resume} at epoch {start_epoch}, step {step}")
    model = torch.compile(orig_model) if args.compile else orig_model  # orig_model stays for saving and evaluation
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if on_gpu else None)

    grid = cfg.image_size // cfg.patch_size
    kept = grid * grid if args.mask == "none" else masking.num_kept(grid, args.ratio)
    train_flops = 3 * M.flops_per_sample(cfg, kept)  # per image-text pair: forward + backward (2x forward)
    flops_per_step = train_flops * args.batch_size * args.accum_freq  # per rank
    peak = M.peak_flops(device)
    say(f"run {run_dir}: {args.model} ({sum(p.numel() for p in orig_model.parameters()) / 1e6:.2f}M parameters), "
        f"mask {args.mask}, ratio {args.ratio:g}, sigma {args.sigma:g}: {kept} of {grid * grid} patches encoded")
    say(f"global batch {args.batch_size} x {args.accum_freq} accum x {world_size} ranks = "
        f"{args.batch_size * args.accum_freq * world_size}; {steps_per_epoch} steps/epoch x {args.epochs} epochs = "
        f"{total_steps} steps, warmup {warmup}; {train_flops / 1e9:.2f} GFLOPs per sample per step; "
        f"{device}, {args.precision}, compile {args.compile}, {args.workers} workers")
    if master:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args) | {"config": asdict(cfg)}, f, indent=1)

    # --- train
    t0 = time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader.set_epoch(epoch)
        # every epoch's masks come from (seed, epoch, rank), so a resumed run draws the ones the uninterrupted run drew
        mask_gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + epoch * 1009 + rank)
        batches = iter(loader)
        window, window_t, skipped = [], time.time(), torch.zeros((), dtype=torch.long)
        waited = 0.0  # seconds of this log window spent blocked on the loader: near all of it = data-bound
        for _ in range(steps_per_epoch):
            micro, keeps = [], []
            for _ in range(args.accum_freq):
                t = time.time()
                images, tokens, n_bad = next(batches)
                waited += time.time() - t
                skipped += n_bad
                images = data.normalize(images.to(device, non_blocking=True))  # uint8 -> float on the device
                micro.append((images, tokens.to(device, non_blocking=True)))
                keeps.append(None if args.mask == "none" else masking.keep_indices(
                    images.shape[0], grid, args.ratio, args.mask, args.sigma, device=device, generator=mask_gen))
            lr = lr_at(step, args.lr, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = forward_backward(model, micro, keeps, autocast, world_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                orig_model.logit_scale.clamp_(0, math.log(100))  # temperature no lower than 0.01, as CLIP
            step += 1
            window.append(loss)

            last = step % steps_per_epoch == 0
            if step % args.log_every == 0 or last:  # one host-device sync per window, not per step
                losses = torch.stack(window).tolist()
                bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
                if bad:  # stop before anything is saved from these weights
                    sys.exit(f"train.py: error: loss is {losses[bad[0]]} at step {step - len(losses) + bad[0] + 1}; "
                             f"stopping without saving (last good checkpoint: {ckpt_dir})")
                dt = time.time() - window_t
                samples_per_s = len(window) * args.batch_size * args.accum_freq * world_size / dt
                mfu = flops_per_step * len(window) / dt / peak if peak else None
                eta = (total_steps - step) * dt / len(window)
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": sum(losses) / len(losses),
                          "lr": lr, "logit_scale": orig_model.logit_scale.exp().item(), "samples_per_s": samples_per_s,
                          "mfu": mfu, "data_wait": waited / dt, "skipped": int(skipped), "time": time.time() - t0}
                say(f"step {step}/{total_steps} epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                    f"scale {record['logit_scale']:.1f} | {samples_per_s:.0f} samples/s"
                    + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + f" | data wait {100 * record['data_wait']:.0f}%"
                    + f" | skipped {int(skipped)} | eta {eta / 60:.1f} min")
                if master:
                    log_metrics(metrics_path, record)
                window, window_t, waited = [], time.time(), 0.0

        # --- end of epoch: evaluate, then save (rank 0); the others wait so no rank runs ahead
        done = epoch + 1
        eval_root = args.imagenet_val or args.zeroshot_data or test_dir  # own shards and no eval folder: none
        if master and eval_root and (done % args.zeroshot_frequency == 0 or done == args.epochs):
            record = evaluate(orig_model, tokenizer, args, eval_root, device, step, done, t0)
            say("zero-shot " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if "top" in k))
            log_metrics(metrics_path, record)
        if master:
            save_checkpoint({"state_dict": orig_model.state_dict(), "config": asdict(cfg), "model": args.model,
                             "tokenizer": tokenizer.to_json(), "optimizer": optimizer.state_dict(), "epoch": done,
                             "step": step, "args": vars(args), "rng_state": torch.get_rng_state()},
                            ckpt_dir, done)
        if world_size > 1:
            dist.barrier()
    say(f"done in {(time.time() - t0) / 60:.1f} min; checkpoints and metrics.jsonl in {run_dir}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
