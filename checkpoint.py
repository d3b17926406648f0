"""
Checkpoints and run folders: everything train.py writes besides the model's output, everything
train.py and eval.py read back (ours, OpenCLIP's, OpenAI's, and Hugging Face CLIPModel folders).

    model, tokenizer = load_checkpoint("logs/RUN/checkpoints/epoch_30.pt")  # or OpenCLIP's
    metrics = open_run_folder("logs/my-run", None, rank=0)  # made, locked, tested for writing
    metrics.append({"step": 10, "loss": 4.1}, "train")  # metrics.jsonl (and --report-to's)
    save_checkpoint(training_state(...), "logs/my-run/checkpoints", epoch=3)  # epoch_3.pt + latest

    python checkpoint.py export CKPT OUT --format open_clip|hf   # the same as python export.py ...

A checkpoint is one torch.save dict (docs/reference.md#checkpoints). It is written to a temporary
file and renamed, so no crash leaves a half-written one, and read with weights_only=True: a
checkpoint is data, never code to run. OpenCLIP's and OpenAI's state dicts load after a renaming of
their keys, and a checkpoint trained on another grid of patches (RECLIP) gets its positional
embedding resized.

Writing OpenCLIP's and Hugging Face's formats is export.py's (its own command).
"""

import argparse
import contextlib
import errno
import fcntl
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

import distributed as D
import model as M
from tokenizer import load_tokenizer

# torch.save's zip archive; a pickle (torch.save before PyTorch 1.6)
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")
EXPECTED = ("expected a torch.save file: a train.py checkpoint, an OpenCLIP checkpoint or a state "
            "dict")
RESUME_KEYS = {"state_dict", "config", "tokenizer", "optimizer", "epoch", "step"}
HELD_LOCKS = {}  # run folder lock file (real path) -> the descriptor that holds it, this process's


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path):
    """The dict a checkpoint file holds, read as data only. A file that is not one is a one-line
    ValueError saying what it is."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        start = f.read(16)
    if not start:
        raise ValueError(f"{path} is an empty file; {EXPECTED}")
    if not start.startswith(TORCH_FILE_STARTS):
        raise ValueError(f"{path} is not a torch file (it starts {start[:12]!r}); {EXPECTED}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated archive, a pickle of code rather than tensors, ...
        words = " ".join(str(e).split())
        if "central directory" in words or "zip archive" in words:  # torch.save's zip, cut short
            raise ValueError(f"{path} is a torch.save file that is truncated or damaged (its zip "
                             f"archive has no end: {os.path.getsize(path)} bytes); it cannot be "
                             "read") from None
        reason = words.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        reason = reason.split(". ")[0].strip(" .") or type(e).__name__  # torch's first sentence
        raise ValueError(f"{path}: torch.load cannot read it as weights ({reason}); "
                         f"{EXPECTED}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a dict; {EXPECTED}")
    return ckpt


def convert_openclip_state_dict(state_dict):
    """An OpenCLIP (or OpenAI CLIP) ViT state dict -> this model's keys. Accepts DDP's `module.`."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("attn_mask"):  # the causal mask is a buffer there; we use is_causal=True
            continue
        if key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archives: config
            continue
        key = key.replace("transformer.resblocks.", "blocks.")
        key = key.replace("attn.in_proj_weight", "attn.in_proj.weight")
        key = key.replace("attn.in_proj_bias", "attn.in_proj.bias")
        if key == "text_projection":
            key = "text.proj"
        elif not key.startswith("visual.") and key != "logit_scale":
            key = "text." + key  # OpenCLIP keeps the text tower's parameters at the top level
        out[key] = value
    return out


def checkpoint_weights(ckpt, path):
    """A checkpoint's tensors in this model's keys: wrapper prefixes (DDP's `module.`,
    torch.compile's `_orig_mod.`) dropped, OpenCLIP's / OpenAI's names converted unless the keys are
    already ours."""
    weights = ckpt.get("state_dict", ckpt)
    weights = weights if isinstance(weights, dict) else {}
    tensors = {k: v for k, v in weights.items() if torch.is_tensor(v)}
    if not tensors:
        keys = sorted(map(str, ckpt))[:5]
        raise ValueError(f"{path} holds a dict without weights (keys {keys}); "
                         "expected a state dict or a checkpoint with one under 'state_dict'")
    state_dict = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in tensors.items()}
    if "text.token_embedding.weight" not in state_dict:
        state_dict = convert_openclip_state_dict(state_dict)
    if "visual.conv1.weight" not in state_dict:
        raise ValueError(f"{path} holds tensors, but not a CLIP ViT's (keys "
                         f"{sorted(tensors)[:3]}); expected this project's, OpenCLIP's or OpenAI's "
                         "CLIP weights")
    return state_dict


def resize_pos_embed(positional_embedding, grid_size):
    """(1 + G0*G0, D) -> (1 + G*G, D): the class token's row kept, the G0 x G0 grid of position rows
    resampled to G x G. RECLIP trains at a low resolution (fewer patches) and evaluates or tunes at
    a higher one; resampling is OpenCLIP's (bicubic, antialiased, align_corners=False), so its
    checkpoints and ours load the same way."""
    n, width = positional_embedding.shape
    old = math.isqrt(n - 1)
    if old * old != n - 1:
        raise ValueError(f"positional embedding has {n} rows, not 1 + G*G for a square grid of "
                         "patches")
    if old == grid_size:
        return positional_embedding
    cls, grid = positional_embedding[:1], positional_embedding[1:]
    grid = grid.reshape(1, old, old, width).permute(0, 3, 1, 2)  # (1, D, G0, G0), rows row-major
    # in fp32: the antialiased kernel has no bf16 / fp16 version on the CPU
    grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode="bicubic", antialias=True,
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, width)
    return torch.cat([cls, grid.to(positional_embedding.dtype)])  # (1 + G*G, D)


def fit_state_dict_to(model, state_dict):
    """A state dict in this model's keys with `visual.positional_embedding` resized to `model`'s
    grid of patches; the other tensors are shared, not copied. Load with model.load_state_dict."""
    key = "visual.positional_embedding"
    return state_dict | {key: resize_pos_embed(state_dict[key], model.visual.grid_size)}


def weights_and_config(path, model_name, tokenizer):
    """(state dict in this model's keys, CLIPConfig, the model's name for messages, tokenizer spec)
    of any file or folder load_checkpoint reads; a checkpoint's own config and tokenizer win over
    `model_name` and `tokenizer`."""
    if os.path.isdir(path):  # a Hugging Face CLIPModel folder
        state_dict, config, folder_tokenizer = read_hf_folder(path)
        return state_dict, config, "from config.json", folder_tokenizer or tokenizer
    ckpt = read_checkpoint(path)
    state_dict = checkpoint_weights(ckpt, path)
    if "config" in ckpt:  # ours
        try:
            config = M.CLIPConfig(**ckpt["config"])
        except TypeError as e:  # a config field this model.py does not know
            raise ValueError(f"{path}: config does not fit this model.py ({e})") from None
        model_name = ckpt.get("model", "from the config")
        tokenizer = ckpt.get("tokenizer") or tokenizer  # the model was trained with this vocabulary
        return state_dict, config, model_name, tokenizer
    if model_name not in M.PRESETS:
        raise ValueError(f"unknown model {model_name!r}; presets are {', '.join(M.PRESETS)}")
    rows = {"vocab_size": "text.token_embedding.weight",
            "context_length": "text.positional_embedding"}
    config = replace(M.PRESETS[model_name],
                     **{f: state_dict[k].shape[0] for f, k in rows.items() if k in state_dict})
    return state_dict, config, model_name, tokenizer


def load_checkpoint(path, model_name="ViT-B-16", tokenizer=None, device="cpu", image_size=None):
    """(model in eval mode on `device`, tokenizer) from one of these files:

    - this project's checkpoint (train.py): {"state_dict", "config", "tokenizer", ...},
      self-contained;
    - a state dict of this project's model, an OpenCLIP training checkpoint {"state_dict": ...}, or
      a plain OpenCLIP / OpenAI state dict. These need `model_name` and a `tokenizer` spec (e.g.
      CLIP's BPE vocab); the vocabulary size and context length are read off the weights;
    - a Hugging Face CLIPModel folder (`python export.py --format hf`): config.json,
      model.safetensors and, when there, its CLIPTokenizer files.

    image_size: build the model for this resolution (default: the checkpoint's config, else the
    preset's). A checkpoint of another grid of patches gets its positional embedding resized.
    """
    state_dict, config, model_name, tokenizer = weights_and_config(path, model_name, tokenizer)
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer: pass one (e.g. --tokenizer "
                         "bpe_simple_vocab_16e6.txt.gz)")
    if image_size is not None:
        if image_size < config.patch_size or image_size % config.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the model's "
                             f"{config.patch_size} px patches")
        config = replace(config, image_size=image_size)
    model = M.CLIP(config)
    missing = set(model.state_dict()) - set(state_dict)
    unexpected = set(state_dict) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path} does not fit model {model_name!r}: missing "
                         f"{sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    try:
        model.load_state_dict(fit_state_dict_to(model, state_dict))
    except (RuntimeError, ValueError) as e:  # shapes differ: a different preset or vocabulary
        last = str(e).splitlines()[-1].strip()
        raise ValueError(f"{path} does not fit model {model_name!r}: {last}") from None
    tokenizer = load_tokenizer(tokenizer, config.context_length)
    if tokenizer.vocab_size > config.vocab_size:  # its highest ids would index past the embedding
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, {path}'s token embedding "
                         f"{config.vocab_size}")
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- the training state


def training_state(model, optimizer, tokenizer, args, epoch, step, elapsed, position=None):
    """What a checkpoint holds: the weights and what evaluation needs to use them (config, preset
    name, tokenizer), and what --resume needs to continue exactly (optimizer, epochs done, step,
    time, RNG). position: for a checkpoint in the middle of an epoch, each rank's loader position
    and mask generator, and the log window so far (train.py's `position`). Every rank calls it (a
    sharded model is gathered from all, full_state); rank 0 gets the dict, the others None."""
    weights, optimizer_state = full_state(model, optimizer)
    if D.rank_and_world()[0] != 0:
        return None
    return {"state_dict": weights, "config": asdict(model.config), "model": args.model,
            "tokenizer": tokenizer.to_json(), "optimizer": optimizer_state, "epoch": epoch,
            "step": step, "time": elapsed, "args": vars(args), "rng_state": torch.get_rng_state(),
            "position": position}


def resume_state(resume, run_dir):
    """The checkpoint dict to --resume from, or None to start fresh: None without --resume, and
    for "latest" when the run has no checkpoint yet (so one command line serves the first start
    and every restart). "latest" is run_dir's epoch_latest.pt or, when that cannot be read, the
    newest readable epoch_K.pt, with a line saying so. ValueError (one line) otherwise."""
    if resume is None:
        return None
    folder = os.path.join(run_dir, "checkpoints")
    candidates = [resume]
    if resume == "latest":
        numbered = [f for f in os.listdir(folder) if re.fullmatch(r"epoch_\d+\.pt", f)] \
            if os.path.isdir(folder) else []
        newest_first = sorted(numbered, key=lambda f: -int(f[6:-3]))
        candidates = [os.path.join(folder, f) for f in ["epoch_latest.pt", *newest_first]
                      if os.path.isfile(os.path.join(folder, f))]
        if not candidates:
            print(f"train.py: --resume latest: {folder} holds no checkpoint yet; starting fresh")
            return None
    errors = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except (FileNotFoundError, ValueError) as e:
            errors.append(str(e))
            continue
        if missing := RESUME_KEYS - set(checkpoint):
            raise ValueError(f"{path} is not a train.py checkpoint (no "
                             f"{', '.join(sorted(missing))}); to start from its weights use "
                             "--pretrained")
        if errors:
            print(f"train.py: warning: {errors[0]}; resuming from {path} instead")
        return checkpoint | {"path": path}
    raise ValueError(errors[0] + ("" if len(errors) == 1 else
                                  f"; and none of the {len(errors) - 1} epoch_K.pt beside it can "
                                  "be read either"))


def restore_training_state(checkpoint, model, optimizer):
    """Load a resume_state checkpoint into model and optimizer, whichever of DDP or FSDP wrote it
    and whichever runs now (load_full_state); returns (epoch, step, time)."""
    load_full_state(model, optimizer, checkpoint["state_dict"], checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_state"])
    return checkpoint["epoch"], checkpoint["step"], checkpoint.get("time", 0.0)


# ------------------------------------------------------------------------- one format, DDP or FSDP
# A checkpoint holds what one process's model and torch.optim.AdamW hold: the whole state dict, and
# the optimizer's state keyed by parameter number (0, 1, ... through the param groups in order). An
# FSDP2 model's state is gathered into that (full_state) and scattered back from it
# (load_full_state), so DDP and FSDP runs read each other's checkpoints, and eval.py, export.py and
# --pretrained read them all. Gathered, not sharded with torch.distributed.checkpoint: rank 0's CPU
# holds the whole state for a moment (16 bytes a parameter: 41 GB for ViT-bigG-14), as DDP's
# checkpoints already need, and no conversion step stands between a run and its checkpoint.

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # to rank 0's CPU only


def full_state(model, optimizer):
    """(model state dict, optimizer state dict) as one process holds them. A sharded (FSDP2) model's
    are gathered to rank 0's CPU from every rank, a collective: every rank calls it, and the others
    get two empty dicts."""
    if not D.is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    weights = get_model_state_dict(model, options=GATHERED)
    by_name = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if not weights:  # not rank 0
        return {}, {}
    return weights, numbered(by_name)


def numbered(by_name):
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) -> keyed by
    parameter number, as torch.optim.Optimizer.state_dict writes it: the params of group 0 first,
    in order, then group 1's."""
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    return {"state": {number[name]: by_name["state"][name] for name in names
                      if name in by_name["state"]},
            "param_groups": [group | {"params": [number[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_full_state(model, optimizer, weights, optimizer_state):
    """Load a checkpoint's whole state dict and numbered optimizer state, on every rank, into a
    model and its optimizer: as they are, or, for a sharded (FSDP2) model, each rank keeping its
    shard of them."""
    if not D.is_sharded(model):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    whole = StateDictOptions(full_state_dict=True)  # every rank has all of it: no broadcast
    set_model_state_dict(model, weights, options=whole)
    name_of = {param: name for name, param in model.named_parameters()}
    names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
    by_name = {"state": {names[i]: state for i, state in optimizer_state["state"].items()},
               "param_groups": [group | {"params": [names[i] for i in group["params"]]}
                                for group in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)


def evaluation_model(model):
    """The model zero-shot evaluation runs: `model` itself, or for a sharded (FSDP2) one a whole
    copy on every rank (gathered, on its device), since eval.py gives each rank its own share of
    the images and prompts, a different number of forwards than FSDP's gathers could follow."""
    if not D.is_sharded(model):
        return model
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):  # shapes only; the gathered tensors become its parameters
        copy = M.CLIP(model.config)
    copy.load_state_dict(weights, assign=True)
    return copy.eval()


# ----------------------------------------------------------------------------- writing


def write_atomic(path, write, needed=0):
    """write(temporary path), then rename it to `path`: a crash never leaves a half-written file at
    `path`. When the write fails (a full disk: torch.save says "unexpected pos ..."), the temporary
    file is removed, the file at `path` is left as it was, and the error is one line (OSError)
    naming the folder, its free bytes and the `needed` ones."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free
        why = "no space left on device" if free < needed else " ".join(str(e).split())[:200]
        raise OSError(f"cannot write {path}: {why} ({folder} has {free / 1e6:.0f} MB free"
                      + (f"; it needs about {needed / 1e6:.0f} MB)" if needed else ")")) from None


def save_atomic(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp), tensor_bytes(obj))


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write, len(text.encode()))


def tensor_bytes(obj):
    """The bytes of the tensors in a (nested) checkpoint: about what torch.save writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state, ckpt_dir, epoch, numbered=True, delete_previous=False):
    """epoch_latest.pt always; epoch_K.pt too when `numbered` (the same bytes under a second name,
    by a hard link where the file system allows one). delete_previous removes the numbered ones
    before it (OpenCLIP's --delete-previous-checkpoint)."""
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


# ----------------------------------------------------------------------------- preemption


def mid_epoch_position(loader, mask_gen, window, skipped):
    """What a checkpoint in the middle of an epoch needs to go on exactly: every rank's loader
    position and mask generator (gathered on every rank), and the open log window's losses and
    bad-sample count."""
    ranks = D.all_ranks({"loader": loader.position(), "masks": mask_gen.get_state()})
    return {"ranks": ranks, "window": [float(v) for v in window], "skipped": int(skipped)}

PREEMPTED = 75  # the exit status of a preempted run (sysexits' EX_TEMPFAIL: run it again)


class Preemption:
    """SIGTERM (what SLURM sends before a time limit or a preemption, Kubernetes before an
    eviction, torchrun when it stops) and SIGUSR1 (sbatch --signal=USR1@120) are noted, not acted
    on at once: the training loop asks `requested()` after every step, and every rank gets the same
    answer at the same step, so all stop together at a step boundary and rank 0 can save it."""

    def __init__(self, world_size):
        self.signal, self.pid = 0, os.getpid()
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self.note)
        # one CPU collective per step; on NCCL a gloo group keeps it off the GPU and its stream
        self.group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        self.world_size = world_size

    def note(self, signum, frame):
        if os.getpid() != self.pid:  # a forked child (a dataloader worker): end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum

    def stop(self, signum, step, rank, run_dir):
        """Exit, preempted: one line, and a status (75) that requeue logic tells from a crash's."""
        print(f"train.py: preempted by {signal.Signals(signum).name} at step {step} (rank {rank});"
              f" {run_dir}/checkpoints/epoch_latest.pt holds it: run the same command with "
              "--resume latest to continue", file=sys.stderr)
        sys.exit(PREEMPTED)

    def requested(self):
        """The signal any rank got (its number; 0: none), the same on every rank."""
        if self.world_size == 1:
            return self.signal
        flag = torch.tensor([self.signal])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)


# ----------------------------------------------------------------------------- run folders


def open_run_folder(run_dir, resume_step, rank, report_to=(), config=None):
    """<log-dir>/<name>: on rank 0 made, locked for this run and tested for writing, before any
    training, and its MetricsLog opened (returned; None on the other ranks); then every rank must
    see it (a folder on a file system all nodes share: resuming needs rank 0's checkpoints on every
    node). resume_step: the step of the checkpoint a resumed run continues from, None for a new
    run. Every rank raises the same one-line ValueError when any of this fails."""
    error, metrics, token = None, None, os.urandom(8).hex()
    if rank == 0:
        try:
            latest = os.path.join(run_dir, "checkpoints", "epoch_latest.pt")
            if resume_step is None and os.path.exists(latest):
                raise ValueError(f"{run_dir} already has checkpoints; pass --resume latest or "
                                 "another --name")
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            take_lock(run_dir)
            # fail now, not after an epoch; the probe is what the other ranks look for
            for folder in (os.path.join(run_dir, "checkpoints"), run_dir):
                write_text_atomic(os.path.join(folder, ".write-test"), token)
            os.remove(os.path.join(run_dir, "checkpoints", ".write-test"))
            metrics = MetricsLog(run_dir, report_to, resume_step, config)
        except (OSError, ValueError) as e:
            error = str(e)
    if error := D.from_rank_zero(error):
        raise ValueError(error)
    probe, token = os.path.join(run_dir, ".write-test"), D.from_rank_zero(token)
    seen = os.path.isfile(probe) and open(probe).read() == token
    blind = [r for r, ok in enumerate(D.all_ranks(seen)) if not ok]
    D.barrier()  # every rank has looked before rank 0 removes it
    if rank == 0:
        os.remove(probe)
    if blind:
        raise ValueError(f"{run_dir} is not on a file system every node shares: rank {blind[0]} "
                         f"(of {len(blind)} that cannot see it) does not find rank 0's files "
                         "there; put --log-dir on a shared file system (resume reads rank 0's "
                         "checkpoints on every node)")
    return metrics


def take_lock(run_dir):
    """Hold `lock` in run_dir for as long as this process lives, so that two live runs never share
    a folder and a dead run never holds one. The lock is a POSIX record lock (fcntl.lockf), which
    belongs to this process alone: the kernel releases it when the process ends, however it ends
    (kill -9 too), and a forked child does not inherit it, so a killed run's dataloader workers,
    alive for a few seconds after it, do not hold its folder (an flock would live on in them). The
    file names its owner, for the message. POSIX locks hold on local disks, NFS and the cluster
    file systems that lock at all (Lustre with -o flock, GPFS, CephFS)."""
    path = os.path.realpath(os.path.join(run_dir, "lock"))
    if path in HELD_LOCKS:  # a process does not conflict with its own POSIX locks: ask here
        raise ValueError(f"{run_dir} is in use by a live run (pid {os.getpid()} on "
                         f"{socket.gethostname()}, this process; its lock {path}): stop it or "
                         "pass another --name")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        holder = lock_holder(fd)
        os.close(fd)  # this process held no lock on the file: closing it frees nothing
        if holder and not owner.startswith(f"pid {holder} "):
            owner = f"pid {holder} holds it now; the file names {owner}"
        raise ValueError(f"{run_dir} is in use by a live run ({owner}; its lock {path}): stop it "
                         "or pass another --name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    # open until this process exits or release_lock: closing any descriptor of a file drops this
    # process's POSIX lock on it, so nothing here opens the lock file again
    HELD_LOCKS[path] = fd


def lock_holder(fd):
    """The pid of the process whose lock on fd's file is in the way (fcntl F_GETLK), or None where
    the kernel does not say (a pid in another pid namespace reads as 0; other systems' struct)."""
    if sys.platform != "linux":
        return None
    flock = "hh4xqqi4x"  # Linux's struct flock: l_type, l_whence, l_start, l_len, l_pid
    query = struct.pack(flock, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    kind, _, _, _, pid = struct.unpack(flock, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def release_lock(run_dir):
    """Let go of a run folder this process holds (the end of a run in a process that goes on)."""
    path = os.path.realpath(os.path.join(run_dir, "lock"))
    if (fd := HELD_LOCKS.pop(path, None)) is not None:
        os.close(fd)


def write_run_config(run_dir, args, config, world_size, tokenizer=None):
    """args.json: every flag as settled, the model config and the world size; tokenizer.json when
    the run trained its own tokenizer, for other tools."""
    settings = vars(args) | {"config": asdict(config), "world_size": world_size}
    write_text_atomic(os.path.join(run_dir, "args.json"), json.dumps(settings, indent=1))
    if tokenizer is not None:
        write_text_atomic(os.path.join(run_dir, "tokenizer.json"), tokenizer.to_json())


# --report-to: the package each writer needs
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def report_to(text):
    """An argparse type for --report-to (OpenCLIP's names): "tensorboard", "wandb", or both joined
    by a comma. Each one's package must be installed; that is checked now, before any folder is
    made, without importing it (a few seconds each)."""
    names = [name for name in text.split(",") if name]
    for name in names:
        if name not in REPORTERS:
            raise argparse.ArgumentTypeError(f"must be tensorboard, wandb or both, got {name!r}")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise argparse.ArgumentTypeError(f"{name} needs the {REPORTERS[name]} package, which "
                                             f"is not installed: pip install {REPORTERS[name]}")
    return names


class MetricsLog:
    """metrics.jsonl, and the same records to TensorBoard (<run>/tensorboard) and Weights & Biases
    (<run>/wandb; project gdm-flip, the run's name) when report_to names them. A record's numbers,
    but its step, go to both as scalars "train/<field>" (a log window) or "val/<field>" (an
    evaluation) at its step. On resume, what an interrupted run logged after the checkpoint's step
    is dropped from metrics.jsonl (continue_metrics) and by TensorBoard (purge_step); a W&B run of
    the same name is continued."""

    def __init__(self, run_dir, report_to=(), resume_step=None, config=None):
        self.path, self.tensorboard, self.wandb = os.path.join(run_dir, "metrics.jsonl"), None, None
        if resume_step is not None:
            continue_metrics(self.path, resume_step)
        name = os.path.basename(os.path.normpath(run_dir))
        try:
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(
                    os.path.join(run_dir, "tensorboard"),
                    purge_step=None if resume_step is None else resume_step + 1)
            if "wandb" in report_to:
                import wandb
                self.wandb = wandb.init(project="gdm-flip", name=name, id=name, dir=run_dir,
                                        config=config,
                                        resume=None if resume_step is None else "allow")
        except Exception as e:  # e.g. W&B online without a login
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--report-to: {first_line}") from None

    def append(self, record, kind):
        """One record (kind "train" or "val") to every writer."""
        append_metrics(self.path, record)
        scalars = {f"{kind}/{key}": value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float))}  # not the None ones
        if self.tensorboard:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, record["step"])
            self.tensorboard.flush()  # records are rare: each is on disk at once
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def continue_metrics(path, step):
    """On resume, keep metrics.jsonl's records up to the checkpoint's step: what the interrupted run
    logged after its last checkpoint is trained again and would otherwise appear twice."""
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


# ----------------------------------------------------------------------------- Hugging Face folders, read
# A transformers CLIPModel folder (what export.py --format hf writes) loads as a checkpoint.

# ours -> transformers' CLIPModel, whole dot-separated parts of a key; q, k and v are split from
# in_proj first, and the projections transposed
HF_NAMES = {
    "visual.conv1": "vision_model.embeddings.patch_embedding",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm",  # sic: transformers' spelling
    "visual.blocks": "vision_model.encoder.layers",
    "visual.ln_post": "vision_model.post_layernorm",
    "visual.proj": "visual_projection.weight",
    "text.token_embedding": "text_model.embeddings.token_embedding",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.blocks": "text_model.encoder.layers",
    "text.ln_final": "text_model.final_layer_norm",
    "text.proj": "text_projection.weight",
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.out_proj",
}
PROJECTIONS = ("visual.proj", "text.proj")  # x @ proj here; nn.Linear computes x @ weight.T


def rename(key, names):
    """`key` with every whole dot-separated run of parts that is a key of `names` replaced by its
    value, in one pass (longest first)."""
    runs = sorted(names, key=len, reverse=True)
    pattern = "|".join(rf"(?<![^.]){re.escape(run)}(?![^.])" for run in runs)
    return re.sub(pattern, lambda m: names[m[0]], key)


def from_hf_state_dict(hf_state_dict):
    """transformers' CLIPModel keys -> this model's: the inverse of to_hf_state_dict. position_ids,
    a buffer older transformers saved, is dropped."""
    names = {hf: ours for ours, hf in HF_NAMES.items()}
    out, qkv = {}, {}
    for key, value in hf_state_dict.items():
        if key.endswith("position_ids"):
            continue
        key = rename(key, names)
        if m := re.fullmatch(r"(.+\.attn\.)([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"{m[1]}in_proj.{m[3]}", {})[m[2]] = value
        else:
            out[key] = value.T.contiguous() if key in PROJECTIONS else value
    for key, parts in qkv.items():
        if len(parts) < 3:
            raise ValueError(f"{key}: transformers' weights lack {set('qkv') - set(parts)} of q, k "
                             "and v")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # (3D, ...)
    return out


LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.LayerNorm keeps


def config_from_hf(hf, path):
    """The CLIPConfig of a transformers CLIPConfig dict; one-line ValueError for one that model.py
    does not build."""
    try:
        text, vision = hf["text_config"], hf["vision_config"]
        acts = {text["hidden_act"], vision["hidden_act"]}
        ratios = {t["intermediate_size"] / t["hidden_size"] for t in (text, vision)}
        eps = {text["layer_norm_eps"], vision["layer_norm_eps"]}
        config = M.CLIPConfig(
            embed_dim=hf["projection_dim"], image_size=vision["image_size"],
            patch_size=vision["patch_size"], vision_width=vision["hidden_size"],
            vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
            context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"],
            text_width=text["hidden_size"], text_layers=text["num_hidden_layers"],
            text_heads=text["num_attention_heads"], mlp_ratio=max(ratios),
            quick_gelu="quick_gelu" in acts)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}/config.json is not a CLIPModel's config (no {e})") from None
    if acts not in ({"gelu"}, {"quick_gelu"}) or len(ratios) > 1 or eps != {LAYER_NORM_EPS}:
        raise ValueError(f"{path}/config.json is a CLIP model.py does not build: it needs one "
                         f"activation, gelu or quick_gelu (has {sorted(acts)}), one MLP ratio "
                         f"(has {sorted(ratios)}) and LayerNorm eps {LAYER_NORM_EPS} (has "
                         f"{sorted(eps)})")
    return config


def safetensors_torch():
    """safetensors.torch, which the Hugging Face format needs; an optional package, not in
    requirements.txt."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("the Hugging Face format keeps its weights in model.safetensors: pip "
                          "install safetensors") from None
    return safetensors.torch


def read_hf_folder(path):
    """(state dict in this model's keys, CLIPConfig, Tokenizer or None) of a transformers CLIPModel
    folder: config.json, model.safetensors and, when there, CLIPTokenizer files."""
    config_path = os.path.join(path, "config.json")
    weights_path = os.path.join(path, "model.safetensors")
    for file in (config_path, weights_path):
        if not os.path.isfile(file):
            raise ValueError(f"{path} is a folder without {os.path.basename(file)}; expected a "
                             "checkpoint file or a Hugging Face CLIPModel folder (config.json, "
                             "model.safetensors)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = config_from_hf(json.load(f), path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{config_path} is not JSON ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not JSON ({e})") from None
    load_file = safetensors_torch().load_file
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors' own error: a truncated file, or not one of its files
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ValueError(f"{weights_path}: safetensors cannot read it ({reason})") from None
    tokenizer = None
    if all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
        tokenizer = load_tokenizer(path, config.context_length)
    return from_hf_state_dict(tensors), config, tokenizer


def main(argv=None):
    """`python checkpoint.py export ARGS` is `python export.py ARGS`, the spelling kept working."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["export"]:
        sys.exit("usage: checkpoint.py export CKPT OUT --format {open_clip,hf} [--model M] "
                 "[--tokenizer T]\n(the same as python export.py; see python export.py --help)")
    # export.py's own process in place of this one: it imports this file, never the other way round
    here = os.path.dirname(os.path.abspath(__file__))
    os.execv(sys.executable, [sys.executable, os.path.join(here, "export.py")] + argv[1:])


if __name__ == "__main__":
    main()
