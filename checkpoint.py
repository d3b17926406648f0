"""
Checkpoints and run folders: everything train.py writes besides the model's output, and everything
train.py and eval.py read back.

    model, tokenizer = load_checkpoint("logs/RUN/checkpoints/epoch_30.pt")  # or OpenCLIP's
    open_run_folder("logs/my-run", resuming=False, rank=0)     # made, locked, tested for writing
    save_checkpoint(training_state(...), "logs/my-run/checkpoints", epoch=3)  # epoch_3.pt + latest

A checkpoint is one torch.save dict (docs/reference.md#checkpoints). It is written to a temporary
file and renamed, so no crash leaves a half-written one, and read with weights_only=True: a
checkpoint is data, never code to run. OpenCLIP's and OpenAI's state dicts load after a renaming of
their keys, and a checkpoint trained on another grid of patches (RECLIP) gets its positional
embedding resized.
"""

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M
from tokenizer import load_tokenizer

# torch.save's zip archive; a pickle (torch.save before PyTorch 1.6)
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")
EXPECTED = ("expected a torch.save file: a train.py checkpoint, an OpenCLIP checkpoint or a state "
            "dict")
RESUME_KEYS = {"state_dict", "config", "tokenizer", "optimizer", "epoch", "step"}
HELD_LOCKS = []  # the run folders' lock files this process holds open


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


def load_checkpoint(path, model_name="ViT-B-16", tokenizer=None, device="cpu", image_size=None):
    """(model in eval mode on `device`, tokenizer) from one of these files:

    - this project's checkpoint (train.py): {"state_dict", "config", "tokenizer", ...},
      self-contained;
    - a state dict of this project's model, an OpenCLIP training checkpoint {"state_dict": ...}, or
      a plain OpenCLIP / OpenAI state dict. These need `model_name` and a `tokenizer` spec (e.g.
      CLIP's BPE vocab); the vocabulary size and context length are read off the weights.

    image_size: build the model for this resolution (default: the checkpoint's config, else the
    preset's). A checkpoint of another grid of patches gets its positional embedding resized.
    """
    ckpt = read_checkpoint(path)
    state_dict = checkpoint_weights(ckpt, path)
    if "config" in ckpt:  # ours
        try:
            config = M.CLIPConfig(**ckpt["config"])
            model_name = ckpt.get("model", "from the config")
        except TypeError as e:  # a config field this model.py does not know
            raise ValueError(f"{path}: config does not fit this model.py ({e})") from None
        tokenizer = ckpt.get("tokenizer") or tokenizer  # the model was trained with this vocabulary
    else:
        if model_name not in M.PRESETS:
            raise ValueError(f"unknown model {model_name!r}; presets are {', '.join(M.PRESETS)}")
        rows = {"vocab_size": "text.token_embedding.weight",
                "context_length": "text.positional_embedding"}
        config = replace(M.PRESETS[model_name],
                         **{f: state_dict[k].shape[0] for f, k in rows.items() if k in state_dict})
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
    and mask generator, and the log window so far (train.py's `position`)."""
    return {"state_dict": model.state_dict(), "config": asdict(model.config), "model": args.model,
            "tokenizer": tokenizer.to_json(), "optimizer": optimizer.state_dict(), "epoch": epoch,
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
    """Load a resume_state checkpoint into model and optimizer; returns (epoch, step, time)."""
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_state"])
    return checkpoint["epoch"], checkpoint["step"], checkpoint.get("time", 0.0)


# ----------------------------------------------------------------------------- writing


def save_atomic(obj, path, write=None):
    """Write to a temporary file, then rename: a crash never leaves a half-written file at `path`.
    When the write fails (a full disk: torch.save says "unexpected pos ..."), the temporary file
    is removed, the file at `path` is left as it was, and the error is one line (OSError) naming
    the folder and the bytes it needs. write(obj, path): torch.save, or another writer."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        (write or torch.save)(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        needed, free = tensor_bytes(obj), shutil.disk_usage(folder).free
        why = "no space left on device" if free < needed else " ".join(str(e).split())[:200]
        raise OSError(f"cannot write {path}: {why} ({folder} has {free / 1e6:.0f} MB free; the "
                      f"checkpoint needs about {needed / 1e6:.0f} MB)") from None


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

    def requested(self):
        """The signal any rank got (its number; 0: none), the same on every rank."""
        if self.world_size == 1:
            return self.signal
        flag = torch.tensor([self.signal])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)


# ----------------------------------------------------------------------------- run folders


def open_run_folder(run_dir, resuming, rank):
    """<log-dir>/<name>: on rank 0 made, locked for this run and tested for writing, before any
    training; then every rank must see it (a folder on a file system all nodes share: resuming
    needs rank 0's checkpoints on every node). Every rank raises the same one-line ValueError when
    any of this fails."""
    error, token = None, os.urandom(8).hex()
    if rank == 0:
        try:
            latest = os.path.join(run_dir, "checkpoints", "epoch_latest.pt")
            if not resuming and os.path.exists(latest):
                raise ValueError(f"{run_dir} already has checkpoints; pass --resume latest or "
                                 "another --name")
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            take_lock(run_dir)
            # fail now, not after an epoch; the probe is what the other ranks look for
            for folder in (os.path.join(run_dir, "checkpoints"), run_dir):
                write_text(token, os.path.join(folder, ".write-test"))
            os.remove(os.path.join(run_dir, "checkpoints", ".write-test"))
        except (OSError, ValueError) as e:
            error = str(e)
    if error := M.from_rank_zero(error):
        raise ValueError(error)
    probe, token = os.path.join(run_dir, ".write-test"), M.from_rank_zero(token)
    seen = os.path.isfile(probe) and open(probe).read() == token
    blind = [r for r, ok in enumerate(M.all_ranks(seen)) if not ok]
    M.barrier()  # every rank has looked before rank 0 removes it
    if rank == 0:
        os.remove(probe)
    if blind:
        raise ValueError(f"{run_dir} is not on a file system every node shares: rank {blind[0]} "
                         f"(of {len(blind)} that cannot see it) does not find rank 0's files "
                         "there; put --log-dir on a shared file system (resume reads rank 0's "
                         "checkpoints on every node)")


def take_lock(run_dir):
    """Hold `lock` in run_dir for as long as this process lives: an exclusive flock, which the
    kernel releases when the process ends however it ends (kill -9 too), so a dead run's lock is
    never in the way and two live runs never share the folder. The file also names its owner, for
    the message. flock holds on local disks and, on Linux, on NFS (emulated with fcntl locks) and
    the cluster file systems that support it (Lustre mounted with -o flock, GPFS, CephFS)."""
    path = os.path.join(run_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"{run_dir} is in use by a live run ({owner}; its lock {path}): stop it "
                         "or pass another --name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    HELD_LOCKS.append(fd)  # open, so locked, until this process exits


def write_run_config(run_dir, args, config, world_size, tokenizer=None):
    """args.json: every flag as settled, the model config and the world size; tokenizer.json when
    the run trained its own tokenizer, for other tools."""
    settings = vars(args) | {"config": asdict(config), "world_size": world_size}
    save_atomic(json.dumps(settings, indent=1), os.path.join(run_dir, "args.json"), write_text)
    if tokenizer is not None:
        save_atomic(tokenizer.to_json(), os.path.join(run_dir, "tokenizer.json"), write_text)


def write_text(text, path):
    with open(path, "w") as f:
        f.write(text)


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
