"""
Pre-train CLIP with FLIP (random) or GDM-FLIP (Gaussian, centred) patch masking, tune unmasked, and evaluate zero-shot.
One script: DDP from torchrun's environment, bf16 autocast and torch.compile on a GPU.

With no --train-data it trains the `tiny` preset on the built-in "photographer" dataset (photographer.py, generated
once and cached) and evaluates on its test split, so the whole path runs on a laptop CPU in a few minutes:
    torchrun --nproc_per_node=1 train.py --mask gaussian --ratio 0.5          # or plain: python train.py ...
The paper's GDM-FLIP run on CC12M, 4 GPUs x 320 = global batch 1280 (README: the recipe), then unmasked tuning:
    torchrun --nproc_per_node=4 train.py --model ViT-B-16 --mask gaussian --ratio 0.5 \\
        --train-data '/data/cc12m/cc12m-train-{0000..2175}.tar' --train-num-samples 10968539 \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --imagenet-val /data/imagenet/val \\
        --batch-size 320 --lr 1e-3 --crop-scale 0.5 1.0 --epochs 30
    torchrun --nproc_per_node=4 train.py --pretrained logs/RUN/checkpoints/epoch_30.pt --mask none \\
        --batch-size 160 --lr 1e-5 --epochs 1 ...                             # the same data flags
"""

import argparse
import atexit
import json
import math
import os
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import eval as zeroshot  # `eval` would shadow the builtin
import masking
import model as M
import photographer
import tokenizer as tokenizers  # `tokenizer` names the object this script trains with

# Defaults that depend on the data, settled once in parse_args: the built-in dataset trains the tiny preset in minutes
# on a CPU; real data gets OpenCLIP's defaults (the README's commands spell out the paper's values).
BUILTIN_DEFAULTS = dict(model="tiny", batch_size=128, epochs=4, lr=1e-3, log_every=10, zeroshot_frequency=1)
OPENCLIP_DEFAULTS = dict(model="ViT-B-16", batch_size=64, epochs=32, lr=5e-4, log_every=100, zeroshot_frequency=2)
OPENCLIP_WARMUP = 10_000  # steps (OpenCLIP's default); a run shorter than 20x this warms up over 5% of its steps
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)  # rank 0 alone writes checkpoints (~1.8 GB for ViT-B-16)


def parse_args(argv=None):
    p = data.OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default=None, choices=list(M.PRESETS), help="model preset (default: ViT-B-16 with --train-data, "
      "else tiny)")
    a("--image-size", type=int, default=None, help="train the preset at another resolution (RECLIP); the patch grid "
      "follows, and --pretrained weights of another grid get their positional embedding resized")
    a("--mask", default="none", choices=["none", *masking.MODES], help="none = CLIP, random = FLIP, gaussian = GDM-FLIP")
    a("--ratio", type=float, default=0.5, help="fraction of patches dropped when --mask is random or gaussian")
    a("--sigma", type=float, default=0.2, help="Gaussian masking's sigma, used as a variance as in the paper's code")
    a("--text-length", type=int, default=None, help="text tokens encoded per caption in training (FLIP's text "
      "masking; default: the whole context); evaluation always reads the whole caption")
    a("--text-mask", default="truncate", choices=masking.TEXT_MODES, help="which text tokens --text-length keeps: the "
      "first, a random subset, or padding dropped first (start and end-of-text always kept)")
    a("--train-data", default=None, help="webdataset shards, brace patterns joined with '::' (default: built-in dataset)")
    a("--train-num-samples", type=int, default=None, help="samples per epoch (required with --train-data)")
    a("--dataset-resampled", action="store_true", help="draw shards with replacement (default: each epoch visits the "
      "shards in a fresh shuffled order, as the paper's OpenCLIP runs)")
    a("--builtin-layout", default="centered", choices=photographer.LAYOUTS,
      help="built-in dataset: subject near the centre, anywhere, or against an edge (the controls)")
    a("--builtin-samples", type=int, default=photographer.NUM_TRAIN, help="built-in dataset: training images")
    a("--tokenizer", default=None, help="CLIP BPE vocab (bpe_simple_vocab_16e6.txt.gz), tokenizer.json, or a captions "
      "file/folder; default: train a BPE tokenizer on the training captions")
    a("--vocab-size", type=int, default=None, help="vocabulary of a tokenizer trained here (default: the preset's)")
    a("--crop-scale", type=float, nargs=2, default=(0.9, 1.0), help="random resized crop scale (OpenCLIP's default; "
      "the paper used 0.5 1.0)")
    a("--batch-size", type=int, default=None, help="per-GPU batch size (default: 64 as OpenCLIP, 128 on built-in data)")
    a("--accum-freq", type=int, default=1, help="micro-batches per optimizer step; the loss stays the full-batch loss")
    a("--epochs", type=int, default=None, help="epochs (default: 32 as OpenCLIP, or 4 on the built-in dataset)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 5e-4 as OpenCLIP, or 1e-3 on built-in data)")
    a("--wd", type=float, default=0.2, help="AdamW weight decay (OpenCLIP's rule: not on biases, norms, logit scale)")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.98, help="AdamW beta2")
    a("--eps", type=float, default=1e-6, help="AdamW epsilon")
    a("--warmup", type=int, default=None, help=f"linear warmup steps (default: {OPENCLIP_WARMUP} as OpenCLIP, or 5%% "
      "of the steps of a run shorter than 20x that)")
    a("--workers", type=int, default=None, help="dataloader workers per GPU (default: the cores per GPU less one; "
      "1 on CPU)")
    a("--imagenet-val", default=None, help="ImageNet validation folder (one folder per WordNet id) for zero-shot")
    a("--zeroshot-data", default=None, help="any other class-folder test split for zero-shot (class names from its "
      "classnames.txt or the folder names, templates from its templates.txt or OpenAI's 80)")
    a("--zeroshot-frequency", type=int, default=None, help="evaluate zero-shot every N epochs and at the end "
      "(default: 2 as OpenCLIP, or 1 on built-in data)")
    a("--pretrained", default=None, help="checkpoint to start from, weights only (unmasked tuning)")
    a("--resume", default=None, help="checkpoint path, or 'latest' for this run's epoch_latest.pt")
    a("--save-frequency", type=int, default=1, help="write epoch_K.pt every N epochs and at the end; 0: only "
      "epoch_latest.pt (OpenCLIP's flag)")
    a("--delete-previous-checkpoint", action="store_true", help="delete the previous epoch_K.pt after writing a new "
      "one (OpenCLIP's flag; epoch_latest.pt stays)")
    a("--save-most-recent", action="store_true", help="OpenCLIP's flag for writing epoch_latest.pt, which train.py "
      "always writes: accepted so OpenCLIP command lines run unchanged")
    a("--precision", default=None, choices=["bf16", "fp32"], help="bf16 autocast (GPU default) or fp32 (CPU default)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on GPU only)")
    a("--seed", type=int, default=0, help="seed for initialisation, data order, crops and masks")
    a("--log-every", type=int, default=None, help="log a window every N steps (default: 100 as OpenCLIP, or 10 on "
      "built-in data)")
    a("--log-dir", default="./logs", help="root of the run folders")
    a("--name", default=None, help="run name: the folder under --log-dir (default: date and settings)")
    args = p.parse_args(argv)
    if args.mask == "none":
        args.ratio = 0.0
    defaults = BUILTIN_DEFAULTS if args.train_data is None else OPENCLIP_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_args(args):
    """Every flag's range and every path, before any folder, dataset or model is made (ValueError: one line)."""
    for flag in ("batch_size", "accum_freq", "epochs", "log_every", "zeroshot_frequency", "builtin_samples",
                 "train_num_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    context = M.PRESETS[args.model].context_length
    for flag, value, ok, allowed in [
            ("--ratio", args.ratio, 0 <= args.ratio < 1, "in [0, 1)"), ("--sigma", args.sigma, args.sigma > 0, "> 0"),
            ("--text-length", args.text_length, args.text_length is None or 2 <= args.text_length <= context,
             f"in [2, {context}] (the start and end-of-text tokens, up to {args.model}'s context)"),
            ("--lr", args.lr, args.lr >= 0, ">= 0"), ("--wd", args.wd, args.wd >= 0, ">= 0"),
            ("--beta1", args.beta1, 0 <= args.beta1 < 1, "in [0, 1)"),
            ("--beta2", args.beta2, 0 <= args.beta2 < 1, "in [0, 1)"), ("--eps", args.eps, args.eps > 0, "> 0"),
            ("--warmup", args.warmup, args.warmup is None or args.warmup >= 0, ">= 0"),
            ("--save-frequency", args.save_frequency, args.save_frequency >= 0, ">= 0"),
            ("--workers", args.workers, args.workers is None or args.workers >= 0, ">= 0"),
            ("--vocab-size", args.vocab_size, args.vocab_size is None or args.vocab_size >= 515, ">= 515"),
            ("--crop-scale", args.crop_scale, 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1,
             "MIN MAX with 0 < MIN <= MAX <= 1")]:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}, got {value}")
    patch = M.PRESETS[args.model].patch_size
    if args.image_size is not None and (args.image_size < patch or args.image_size % patch):
        raise ValueError(f"--image-size must be a multiple of {args.model}'s patch size {patch}, got {args.image_size}")
    if args.train_data and not args.train_num_samples:
        raise ValueError("--train-num-samples is required with --train-data (samples per epoch, as OpenCLIP)")
    global_batch = args.batch_size * args.accum_freq * int(os.environ.get("WORLD_SIZE", 1))
    num_samples = args.train_num_samples or args.builtin_samples
    if num_samples < global_batch:
        raise ValueError(f"--train-num-samples {num_samples} is smaller than one global batch ({global_batch})")
    if args.imagenet_val and args.zeroshot_data:
        raise ValueError("pass --imagenet-val or --zeroshot-data, not both")
    if args.pretrained and args.resume:
        raise ValueError("use --pretrained (weights only, fresh optimizer) or --resume (the whole state), not both")
    if args.resume == "latest" and not args.name:
        raise ValueError("--resume latest needs the --name of the run to continue")
    resume = None if args.resume == "latest" else args.resume  # latest: checked once the run folder is known
    for flag, path in [("--pretrained", args.pretrained), ("--resume", resume)]:
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    for flag, path in [("--imagenet-val", args.imagenet_val), ("--zeroshot-data", args.zeroshot_data)]:
        if path and not os.path.isdir(path):
            raise ValueError(f"{flag} {path}: no such directory")
    existing = os.path.abspath(args.log_dir)
    while not os.path.exists(existing):  # the nearest part of --log-dir that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--log-dir {args.log_dir}: {existing} is a file, not a folder")


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return rank, local_rank, world, device


def from_rank_zero(value):
    """Rank 0's `value` on every rank (any picklable object): what one rank decides, the others never recompute."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_features(features):
    """(B, E) on each rank -> (W*B, E) on every rank; the gradient flows back to this rank's own (B, E) slice only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach())
    gathered[dist.get_rank()] = features  # put back the tensor that autograd knows
    return torch.cat(gathered)


def fail(message):
    sys.exit(f"train.py: error: {message}")


# ----------------------------------------------------------------------------- optimisation


def param_groups(model, weight_decay):
    """OpenCLIP's rule, as the paper trained: decay every parameter of 2+ dimensions unless its name has bn, ln, bias
    or logit_scale. So both positional embeddings, the token embedding and the projections decay; the 1-D class
    embedding, LayerNorm gains and biases do not."""
    exclude = lambda n, p: p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale"))  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if not exclude(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0}]


def default_warmup(total_steps):
    """OpenCLIP's 10,000 steps when the run is long enough for it (the paper's has ~257k), else 5% of the run."""
    return OPENCLIP_WARMUP if total_steps >= 20 * OPENCLIP_WARMUP else max(1, total_steps // 20)


def lr_at(step, base_lr, warmup, total):
    """Linear warmup to base_lr, then cosine decay to 0 (OpenCLIP's cosine schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def forward_backward(model, micro_batches, keeps, autocast, world_size, text_keeps=None):
    """Loss and gradients of the contrastive loss over the whole global batch, micro-batch by micro-batch.

    The InfoNCE loss of a batch does not split into a sum over micro-batches (every image is contrasted with every
    text), so with accumulation we do what OpenCLIP does: embed all micro-batches without gradients first, then
    re-embed one micro-batch at a time with gradients, splicing its features into the cached ones. Each backward then
    gives the gradient of the full loss through that micro-batch. DDP all-reduces only on the last one (no_sync).
    Gradients through the other ranks' features arrive via DDP's average, hence the factor world_size.
    The logit scale is the exception: every rank and every micro-batch sees all of it, so its gradient is divided.
    keeps: each micro-batch's (B, K) kept patches or None; text_keeps: its (B, L) kept text positions or None.
    """
    n = len(micro_batches)
    steps = list(zip(micro_batches, keeps, text_keeps or [None] * n))
    cached = None
    if n > 1:
        with torch.no_grad(), autocast:
            cached = [model(images, tokens, keep, positions)[:2] for (images, tokens), keep, positions in steps]
    for j, ((images, tokens), keep, positions) in enumerate(steps):
        sync = nullcontext() if j == n - 1 or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with autocast:
                image_features, text_features, scale = model(images, tokens, keep, positions)
            if n > 1:
                image_features = torch.cat([c[0] for c in cached[:j]] + [image_features] + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [text_features] + [c[1] for c in cached[j + 1:]])
            if scale.requires_grad:  # each rank and micro-batch sees all of the temperature: count its gradient once
                scale.register_hook(lambda grad: grad / (n * world_size))
            loss = M.clip_loss(gather_features(image_features.float()), gather_features(text_features.float()), scale)
            (loss * world_size).backward()
    return loss.detach()


# ----------------------------------------------------------------------------- the phases of a run


def prepare_data(args, local_rank, world_size, say):
    """(shard pattern, test folder or None). The built-in dataset is generated once per machine (cached); the shards
    are checked here, before anything is written: missing, empty or unreadable data is one line, never a hang."""
    test_dir = None
    if args.train_data is None:
        say("no --train-data: training on the built-in 'photographer' dataset (python photographer.py --help);")
        say("  for real data pass e.g. --train-data '/data/cc12m/cc12m-train-{0000..2175}.tar' "
            "--train-num-samples 10968539 --imagenet-val /data/imagenet/val --model ViT-B-16")
        if local_rank != 0:
            dist.barrier()  # local rank 0 generates it (deterministic, cached), then the others read the same files
        builtin = photographer.builtin_dataset(layout=args.builtin_layout, num_train=args.builtin_samples, seed=0)
        if local_rank == 0 and world_size > 1:
            dist.barrier()
        args.train_data, test_dir = builtin["train"], builtin["test"]
        args.train_num_samples = args.train_num_samples or args.builtin_samples
        say(f"  built-in training shards {args.train_data}\n  built-in test split {test_dir}")
    try:
        data.check_train_data(args.train_data)  # shards that exist and hold a readable sample, or one line now
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    return args.train_data, test_dir


def build_model_and_tokenizer(args, checkpoint, master):
    """(model on the CPU, tokenizer), from --pretrained's weights, a --resume checkpoint, or fresh from the preset.
    A tokenizer trained here is trained on rank 0 and sent to the others."""
    if args.pretrained:
        try:
            model, tokenizer = zeroshot.load_checkpoint(args.pretrained, args.model, args.tokenizer, device="cpu",
                                                        image_size=args.image_size)
        except (FileNotFoundError, ValueError) as e:
            fail(e)
        return model.train(), tokenizer
    cfg = M.CLIPConfig(**checkpoint["config"]) if checkpoint else M.PRESETS[args.model]
    if checkpoint and args.image_size not in (None, cfg.image_size):
        fail(f"--resume continues at the checkpoint's {cfg.image_size} px, not --image-size {args.image_size}; to "
             "start from its weights at another resolution use --pretrained")
    spec = checkpoint["tokenizer"] if checkpoint else args.tokenizer
    if spec is None:  # train a BPE on the captions
        spec = tokenizers.train_tokenizer(data.read_captions(args.train_data), args.vocab_size or cfg.vocab_size,
                                          cfg.context_length).to_json() if master else None
        spec = from_rank_zero(spec)
    try:
        tokenizer = tokenizers.load_tokenizer(spec, cfg.context_length)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    size = {} if args.image_size is None else {"image_size": args.image_size}
    model = M.CLIP(cfg) if checkpoint else M.create_model(args.model, vocab_size=tokenizer.vocab_size, **size)
    return model, tokenizer


def read_resume_checkpoint(args):
    """The checkpoint dict to resume from, or None. Only data (weights_only): a checkpoint is never code to run."""
    path = os.path.join(args.log_dir, args.name, "checkpoints", "epoch_latest.pt") if args.resume == "latest" \
        else args.resume
    if not path:
        return None
    if not os.path.isfile(path):
        fail(f"no checkpoint to resume at {path}")
    try:
        checkpoint = zeroshot.read_checkpoint(path)
    except ValueError as e:
        fail(e)
    missing = {"state_dict", "config", "tokenizer", "optimizer", "epoch", "step"} - set(checkpoint)
    if missing:
        fail(f"{path} is not a train.py checkpoint (no {', '.join(sorted(missing))}); to start from its weights "
             "use --pretrained")
    return checkpoint | {"path": path}


def run_name(args):
    size = [] if args.image_size is None else [f"{args.image_size}px"]
    return "-".join([time.strftime("%Y_%m_%d-%H_%M_%S"), args.model, *size, args.mask if args.mask == "none" else
                     f"{args.mask}{args.ratio:g}", f"b{args.batch_size}", f"lr{args.lr:g}", f"s{args.seed}"])


def open_run_folder(args, master, resuming):
    """<log-dir>/<name>, named on rank 0; made, locked and tested for writing before any training. Returns its path."""
    error = None
    if master:
        args.name = args.name or run_name(args)
        try:
            run_dir = os.path.join(args.log_dir, args.name)
            if not resuming and os.path.exists(os.path.join(run_dir, "checkpoints", "epoch_latest.pt")):
                raise ValueError(f"{run_dir} already has checkpoints; pass --resume latest or another --name")
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            take_lock(run_dir)
            for folder in (run_dir, os.path.join(run_dir, "checkpoints")):  # fail now, not after an epoch
                probe = os.path.join(folder, f".write-test-{os.getpid()}")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
        except (OSError, ValueError) as e:
            error = str(e)
    args.name, error = from_rank_zero((args.name, error))
    if error:
        fail(error)
    return os.path.join(args.log_dir, args.name)


def take_lock(run_dir):
    """A run folder is held by one live run: `lock` holds the owner's pid and host. A lock whose process is dead (same
    host) is taken over with a message; a live one, or one of another host, is an error."""
    path, me = os.path.join(run_dir, "lock"), {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            with open(path) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") != me["host"] or pid_alive(owner.get("pid")):
            raise ValueError(f"{run_dir} is in use by pid {owner.get('pid')} on {owner.get('host')} (its lock file "
                             f"{path}); stop that run, or delete the lock if it is dead, or pass another --name")
        print(f"train.py: taking over {path} from pid {owner.get('pid')}, which is no longer running")
        os.remove(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)


def pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def release_lock(run_dir):
    try:
        os.remove(os.path.join(run_dir, "lock"))
    except FileNotFoundError:
        pass


def continue_metrics(path, step):
    """On resume, keep metrics.jsonl's records up to the checkpoint's step: what the interrupted run logged after its
    last checkpoint is trained again and would otherwise appear twice."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # blank, or the line a kill cut short
                continue
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(state, ckpt_dir, epoch, numbered=True, delete_previous=False):
    """epoch_latest.pt always; epoch_K.pt too when `numbered` (the same bytes under a second name, by a hard link,
    where the file system allows one). delete_previous removes the last numbered one before it (OpenCLIP's rule)."""
    latest = os.path.join(ckpt_dir, "epoch_latest.pt")
    if not numbered:
        save_atomic(state, latest)
        return
    path = os.path.join(ckpt_dir, f"epoch_{epoch}.pt")
    save_atomic(state, path)
    tmp = os.path.join(ckpt_dir, f"latest.tmp{os.getpid()}")
    try:
        os.link(path, tmp)
        os.replace(tmp, latest)
    except OSError:
        save_atomic(state, latest)
    if delete_previous:
        keep = ("epoch_latest.pt", f"epoch_{epoch}.pt")
        for name in os.listdir(ckpt_dir):
            if name.startswith("epoch_") and name.endswith(".pt") and name not in keep:
                os.remove(os.path.join(ckpt_dir, name))


def log_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class LogWindow:
    """The steps since the last log line. Losses stay on the device until the window closes: one host-device sync
    per window, not per step. `waited` is the time spent blocked on the loader: near all of it means data-bound."""

    def __init__(self, samples_per_step, flops_per_step, peak_flops, total_steps, steps_per_epoch):
        self.samples_per_step, self.flops_per_step, self.peak = samples_per_step, flops_per_step, peak_flops
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.reset()

    def reset(self):
        self.losses, self.start, self.waited = [], time.time(), 0.0

    def close(self, step, lr, logit_scale, skipped, elapsed):
        """The window's record for metrics.jsonl and its log line; stops the run on a non-finite loss."""
        losses = torch.stack(self.losses).tolist()
        if bad := [i for i, v in enumerate(losses) if not math.isfinite(v)]:
            fail(f"loss is {losses[bad[0]]} at step {step - len(losses) + bad[0] + 1}; stopping without saving")
        dt, n = time.time() - self.start, len(losses)
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 3), "loss": sum(losses) / n, "lr": lr,
                  "logit_scale": logit_scale, "samples_per_s": n * self.samples_per_step / dt,
                  "mfu": self.flops_per_step * n / dt / self.peak if self.peak else None,
                  "data_wait": self.waited / dt, "skipped": skipped, "time": elapsed}
        line = (f"step {step}/{self.total_steps} epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                f"scale {logit_scale:.1f} | {record['samples_per_s']:.0f} samples/s"
                + (f" | mfu {100 * record['mfu']:.1f}%" if record["mfu"] else "")
                + f" | data wait {100 * record['data_wait']:.0f}% | skipped {skipped}"
                + f" | eta {(self.total_steps - step) * dt / n / 60:.1f} min")
        self.reset()
        return record, line


def evaluate(model, tokenizer, args, root, device, step, epoch, elapsed):
    """Zero-shot top-1/top-5 with inference unmasking (all patches) and, for masked runs, with the training mask. Every
    rank encodes its slice of the images and gets the whole set's figures."""
    record = {"step": step, "epoch": epoch}
    settings = [("zeroshot", "none")] + ([("zeroshot_masked", args.mask)] if args.mask != "none" else [])
    for prefix, mask in settings:
        try:
            result = zeroshot.evaluate_folder(model, tokenizer, root, batch_size=max(args.batch_size, 256),
                                              workers=args.workers, device=device, mask=mask, ratio=args.ratio,
                                              sigma=args.sigma, imagenet=bool(args.imagenet_val))
        except ValueError as e:  # e.g. most images of the folder unreadable
            fail(f"zero-shot evaluation on {root}: {e}")
        record |= {f"{prefix}_top1": result["acc1"], f"{prefix}_top5": result["acc5"],
                   f"{prefix}_mean_per_class_recall": result["mean_per_class_recall"],
                   "zeroshot_unreadable": result["unreadable"]}
    return record | {"time": elapsed}


def make_optimizer(args, model, checkpoint, metrics_path, say):
    """(AdamW, first epoch, first step, t0): fresh, or the whole state of a --resume checkpoint. On resume the wall
    time counts on from the checkpoint's, and metrics.jsonl drops what was logged after it."""
    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps, fused=next(model.parameters()).is_cuda)
    if not checkpoint:
        return optimizer, 0, 0, time.time()
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_state"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        continue_metrics(metrics_path, checkpoint["step"])
    say(f"resumed from {checkpoint['path']} at epoch {checkpoint['epoch']}, step {checkpoint['step']}")
    return optimizer, checkpoint["epoch"], checkpoint["step"], time.time() - checkpoint.get("time", 0.0)


def encoded_tokens(cfg, ratio, text_length):
    """(image patches, text tokens) one training sample encodes: the patches kept at `ratio` (every one at 0) and the
    --text-length tokens (the whole context without it)."""
    return masking.num_kept(cfg.grid_size, ratio), min(text_length or cfg.context_length, cfg.context_length)


def train_flops_per_sample(cfg, ratio, text_length):
    """Training FLOPs per image-text pair, as MFU and visualize.py's compute curves count them: forward + backward
    (2x forward) of the tokens it encodes."""
    return 3 * M.flops_per_sample(cfg, *encoded_tokens(cfg, ratio, text_length))


def plan_run(args, model, tokenizer, loader, world_size, device, run_dir, checkpoint, say):
    """(steps per epoch, total steps, warmup, LogWindow); prints the arithmetic and writes args.json (rank 0)."""
    cfg = model.config
    steps_per_epoch = loader.num_batches // args.accum_freq
    total_steps = steps_per_epoch * args.epochs
    warmup = args.warmup if args.warmup is not None else default_warmup(total_steps)
    grid = cfg.grid_size
    kept, text = encoded_tokens(cfg, args.ratio, args.text_length)
    train_flops = train_flops_per_sample(cfg, args.ratio, args.text_length)
    global_batch = args.batch_size * args.accum_freq * world_size
    log = LogWindow(global_batch, train_flops * args.batch_size * args.accum_freq, M.peak_flops(device), total_steps,
                    steps_per_epoch)
    say(f"run {run_dir}: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
        f"mask {args.mask}, ratio {args.ratio:g}, sigma {args.sigma:g}: {kept} of {grid * grid} patches encoded, "
        f"{text} of {cfg.context_length} text tokens" + (f" ({args.text_mask})" if text < cfg.context_length else ""))
    say(f"global batch {args.batch_size} x {args.accum_freq} accum x {world_size} ranks = {global_batch}; "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; warmup {warmup} steps"
        + ("" if args.warmup is not None else f" (OpenCLIP's {OPENCLIP_WARMUP}, or 5% of a run under "
                                              f"{20 * OPENCLIP_WARMUP} steps; --warmup to set)")
        + f"; {train_flops / 1e9:.2f} GFLOPs per sample per step; {device}, {args.precision}, compile {args.compile}, "
        f"{args.workers} workers")
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args) | {"config": asdict(cfg), "world_size": world_size}, f, indent=1)
        if not args.tokenizer and not checkpoint and not args.pretrained:  # the tokenizer trained here, for other tools
            with open(os.path.join(run_dir, "tokenizer.json"), "w") as f:
                f.write(tokenizer.to_json())
    return steps_per_epoch, total_steps, warmup, log


def next_step_batches(batches, args, cfg, device, mask_gen, log):
    """The accum_freq micro-batches of one step on the device, their image masks (None for CLIP) and text masks (None
    for whole captions), and the bad samples the loader skipped for them. Time blocked on the loader goes to the log
    window."""
    micro, keeps, text_keeps, skipped = [], [], [], 0
    for _ in range(args.accum_freq):
        t = time.time()
        images, tokens, n_bad = next(batches)
        log.waited += time.time() - t
        skipped += n_bad
        images = data.normalize(images.to(device, non_blocking=True))  # uint8 -> float on the device
        tokens = tokens.to(device, non_blocking=True)  # (B, T)
        keeps.append(None if args.mask == "none" else masking.keep_indices(
            images.shape[0], cfg.grid_size, args.ratio, args.mask, args.sigma, device=device, generator=mask_gen))
        positions = None
        if args.text_length is not None and args.text_length < tokens.shape[1]:  # FLIP's text masking
            positions = masking.text_keep_indices(tokens, args.text_length, args.text_mask, generator=mask_gen)
            tokens = tokens.gather(1, positions)  # (B, L), encoded at their own positions
        micro.append((images, tokens))
        text_keeps.append(positions)
    return micro, keeps, text_keeps, skipped


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, world_size, device = setup_distributed()
    master, on_gpu = rank == 0, device.type == "cuda"
    say = print if master else (lambda *a, **k: None)
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.compile = on_gpu if args.compile is None else args.compile
    args.workers = data.default_workers(on_gpu) if args.workers is None else args.workers
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = M.autocast(device, args.precision)  # bf16 autocast, or a no-op for fp32

    train_data, test_dir = prepare_data(args, local_rank, world_size, say)
    checkpoint = read_resume_checkpoint(args)
    orig_model, tokenizer = build_model_and_tokenizer(args, checkpoint, master)
    cfg = orig_model.config
    loader = data.make_train_loader(train_data, args.batch_size, args.train_num_samples, cfg.image_size, tokenizer,
                                    workers=args.workers, seed=args.seed, rank=rank, world_size=world_size,
                                    scale=tuple(args.crop_scale), resampled=args.dataset_resampled)
    run_dir = open_run_folder(args, master, resuming=checkpoint is not None)
    ckpt_dir, metrics_path = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "metrics.jsonl")
    if master:
        atexit.register(release_lock, run_dir)
    orig_model.to(device)
    optimizer, start_epoch, step, t0 = make_optimizer(args, orig_model, checkpoint, metrics_path, say)
    model = torch.compile(orig_model) if args.compile else orig_model  # orig_model stays for saving and evaluation
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if on_gpu else None)
    steps_per_epoch, total_steps, warmup, log = plan_run(args, orig_model, tokenizer, loader, world_size, device,
                                                         run_dir, checkpoint, say)

    skipped = torch.zeros((), dtype=torch.long)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader.set_epoch(epoch)
        # an epoch's masks are a function of (seed, epoch, rank): a resumed run draws what the uninterrupted one drew
        mask_gen = torch.Generator(device).manual_seed(data.derived_seed(args.seed, "masks", epoch, rank))
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            micro, keeps, text_keeps, n_bad = next_step_batches(batches, args, cfg, device, mask_gen, log)
            skipped += n_bad
            lr = lr_at(step, args.lr, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            log.losses.append(forward_backward(model, micro, keeps, autocast, world_size, text_keeps))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                orig_model.logit_scale.clamp_(0, math.log(100))  # temperature no lower than 0.01, as CLIP
            step += 1
            if step % args.log_every == 0 or step % steps_per_epoch == 0:
                record, line = log.close(step, lr, orig_model.logit_scale.exp().item(), int(skipped), time.time() - t0)
                say(line)
                if master:
                    log_metrics(metrics_path, record)

        done, eval_root = epoch + 1, args.imagenet_val or args.zeroshot_data or test_dir  # own shards: none
        if eval_root and (done % args.zeroshot_frequency == 0 or done == args.epochs):  # each rank a slice
            record = evaluate(orig_model, tokenizer, args, eval_root, device, step, done, time.time() - t0)
            say("zero-shot " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if "top" in k))
            if master:
                log_metrics(metrics_path, record)
        if master:
            state = {"state_dict": orig_model.state_dict(), "config": asdict(cfg), "model": args.model,
                     "tokenizer": tokenizer.to_json(), "optimizer": optimizer.state_dict(), "epoch": done,
                     "step": step, "time": time.time() - t0, "args": vars(args), "rng_state": torch.get_rng_state()}
            numbered = args.save_frequency > 0 and (done % args.save_frequency == 0 or done == args.epochs)
            save_checkpoint(state, ckpt_dir, done, numbered, args.delete_previous_checkpoint)
        if world_size > 1:
            dist.barrier()  # no rank runs ahead while rank 0 evaluates and saves
    say(f"done in {(time.time() - t0) / 60:.1f} min; checkpoints and metrics.jsonl in {run_dir}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
