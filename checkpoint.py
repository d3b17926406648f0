"""
Checkpoints and run folders: everything train.py writes besides the model's output, and everything
train.py and eval.py read back.

    model, tokenizer = load_checkpoint("logs/RUN/checkpoints/epoch_30.pt")  # or OpenCLIP's
    metrics = open_run_folder("logs/my-run", None, rank=0)  # made, locked, tested for writing
    metrics.append({"step": 10, "loss": 4.1}, "train")  # metrics.jsonl (and --report-to's)
    save_checkpoint(training_state(...), "logs/my-run/checkpoints", epoch=3)  # epoch_3.pt + latest

A checkpoint is one torch.save dict (docs/reference.md#checkpoints). It is written to a temporary
file and renamed, so no crash leaves a half-written one, and read with weights_only=True: a
checkpoint is data, never code to run. OpenCLIP's and OpenAI's state dicts load after a renaming of
their keys, and a checkpoint trained on another grid of patches (RECLIP) gets its positional
embedding resized.
"""

import argparse
import atexit
import importlib.util
import json
import math
import os
import re
import socket
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

import model as M
from tokenizer import load_tokenizer

# torch.save's zip archive; a pickle (torch.save before PyTorch 1.6)
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")
EXPECTED = ("expected a torch.save file: a train.py checkpoint, an OpenCLIP checkpoint or a state "
            "dict")
RESUME_KEYS = {"state_dict", "config", "tokenizer", "optimizer", "epoch", "step"}


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
        reason = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        reason = " ".join(reason.split())[:160] or type(e).__name__  # torch's own words
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


def training_state(model, optimizer, tokenizer, args, epoch, step, elapsed):
    """What a checkpoint holds: the weights and what evaluation needs to use them (config, preset
    name, tokenizer), and what --resume needs to continue exactly (optimizer, epoch, step, time,
    RNG)."""
    return {"state_dict": model.state_dict(), "config": asdict(model.config), "model": args.model,
            "tokenizer": tokenizer.to_json(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": step, "time": elapsed, "args": vars(args), "rng_state": torch.get_rng_state()}


def resume_state(resume, run_dir):
    """The checkpoint dict to --resume from (a path, or "latest": run_dir's epoch_latest.pt), or
    None without --resume. ValueError (one line) when it is missing or not a train.py checkpoint."""
    if resume is None:
        return None
    path = os.path.join(run_dir, "checkpoints", "epoch_latest.pt") if resume == "latest" else resume
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint to resume at {path}")
    checkpoint = read_checkpoint(path)
    if missing := RESUME_KEYS - set(checkpoint):
        raise ValueError(f"{path} is not a train.py checkpoint (no {', '.join(sorted(missing))}); "
                         "to start from its weights use --pretrained")
    return checkpoint | {"path": path}


def restore_training_state(checkpoint, model, optimizer):
    """Load a resume_state checkpoint into model and optimizer; returns (epoch, step, time)."""
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_state"])
    return checkpoint["epoch"], checkpoint["step"], checkpoint.get("time", 0.0)


# ----------------------------------------------------------------------------- writing


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file at
    `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- run folders


def open_run_folder(run_dir, resume_step, rank, report_to=(), config=None):
    """<log-dir>/<name>: on rank 0 made, locked for this run and tested for writing, before any
    training, and its MetricsLog opened (returned; None on the other ranks). resume_step: the step
    of the checkpoint a resumed run continues from, None for a new run. Every rank raises the same
    one-line ValueError when it cannot be."""
    error = metrics = None
    if rank == 0:
        try:
            latest = os.path.join(run_dir, "checkpoints", "epoch_latest.pt")
            if resume_step is None and os.path.exists(latest):
                raise ValueError(f"{run_dir} already has checkpoints; pass --resume latest or "
                                 "another --name")
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            take_lock(run_dir)
            atexit.register(release_lock, run_dir)
            # fail now, not after an epoch
            for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
                probe = os.path.join(folder, f".write-test-{os.getpid()}")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            metrics = MetricsLog(run_dir, report_to, resume_step, config)
        except (OSError, ValueError) as e:
            error = str(e)
    if error := M.from_rank_zero(error):
        raise ValueError(error)
    return metrics


def take_lock(run_dir):
    """A run folder is held by one live run: `lock` holds the owner's pid and host. A lock whose
    process is dead (same host) is taken over with a message; a live one, or another host's, is an
    error."""
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
            pid, host = owner.get("pid"), owner.get("host")
            raise ValueError(f"{run_dir} is in use by pid {pid} on {host} "
                             f"(its lock file {path}); stop that run, or delete the lock if it is "
                             "dead, or pass another --name") from None
        print(f"train.py: taking over {path} from pid {owner.get('pid')}, which is no longer "
              "running")
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


def write_run_config(run_dir, args, config, world_size, tokenizer=None):
    """args.json: every flag as settled, the model config and the world size; tokenizer.json when
    the run trained its own tokenizer, for other tools."""
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args) | {"config": asdict(config), "world_size": world_size}, f, indent=1)
    if tokenizer is not None:
        with open(os.path.join(run_dir, "tokenizer.json"), "w") as f:
            f.write(tokenizer.to_json())


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
