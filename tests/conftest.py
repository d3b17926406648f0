"""What several test files share: the top-level files importable as modules, synthetic batches, a
tiny model saved as train.py saves it, and a run's TensorBoard scalars read back."""

import os
import sys
from dataclasses import asdict

import pytest
import torch

# tests import the top-level files (masking, model, data, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402


def synthetic_batch(cfg, n, generator):
    """Random images (n, 3, S, S) and token ids (n, T) whose end-of-text (the largest id) sits at
    varied positions, zero padding after it, as CLIP's tokenizer pads."""
    S, T, V = cfg.image_size, cfg.context_length, cfg.vocab_size
    images = torch.randn(n, 3, S, S, generator=generator)
    tokens = torch.randint(1, V - 1, (n, T), generator=generator)  # ordinary words
    eot = torch.randint(1, T, (n, 1), generator=generator)  # captions of 2..T tokens
    tokens = torch.where(torch.arange(T) < eot, tokens, 0)
    return images, tokens.scatter(1, eot, V - 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, path of a checkpoint in train.py's format) of the tiny preset."""
    captions = [f"a photo of a {c} square" for c in ("red", "green", "blue")] * 4
    tok = train_tokenizer(captions, vocab_size=600, context_length=32)
    torch.manual_seed(0)
    model = M.create_model("tiny", vocab_size=tok.vocab_size).eval()
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    torch.save({"state_dict": model.state_dict(), "config": asdict(model.config), "model": "tiny",
                "tokenizer": tok.to_json(), "epoch": 1, "step": 10,
                "args": {"lr": 5e-4, "crop_scale": (0.9, 1.0)}, "rng_state": torch.get_rng_state()},
               path)
    return model, tok, path


def tensorboard_scalars(run_dir):
    """{tag: [(step, value), ...]} of a run's TensorBoard event files, read back by TensorBoard's
    own reader (tests/requirements.txt), which also applies a resumed run's purge."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def as_scalars(records):
    """What TensorBoard should hold for metrics.jsonl's records: each number but the step, under
    train/ for a log window (it has a loss) and val/ for an evaluation, as a float32."""
    scalars = {}
    for r in records:
        kind = "train" if "loss" in r else "val"
        for key, value in r.items():
            if key != "step" and value is not None:
                value = torch.tensor(value, dtype=torch.float32).item()
                scalars.setdefault(f"{kind}/{key}", []).append((r["step"], value))
    return scalars
