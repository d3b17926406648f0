"""train.py end to end on tiny shards written by the tests: learning, DDP equivalence, resume, tuning, bad input."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import nullcontext

import pytest
import torch
from PIL import Image

import masking
import model as M
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def write_shard(path, n, corrupt=0, seed=0):
    """n image-caption samples ("a photo of a red square", ...) in img2dataset's layout, the first `corrupt` broken."""
    g = torch.Generator().manual_seed(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            name = list(COLOURS)[torch.randint(len(COLOURS), (1,), generator=g).item()]
            img = Image.new("RGB", (80, 72), (128, 128, 128))
            img.paste(COLOURS[name], (20, 16, 60, 56))
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            jpg = buf.getvalue()[:50] if i < corrupt else buf.getvalue()  # a truncated JPEG
            for ext, payload in [("jpg", jpg), ("txt", f"a photo of a {name} square".encode())]:
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for s in range(2):
        write_shard(d / f"train-{s}.tar", 64, seed=s)
    write_shard(d / "corrupt-0.tar", 64, corrupt=8, seed=5)
    return d


def run_train(*args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--batch-size", "16", "--workers", "0",
           "--log-every", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fixed_batch(n=16):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1023, (n, 32), generator=g)
    tokens[:, 12] = 1023
    return torch.randn(n, 3, 64, 64, generator=g), tokens


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = M.create_model("tiny")
    opt = torch.optim.AdamW(train.param_groups(model, 0.2), lr=1e-3)
    images, tokens = fixed_batch()
    keep = masking.keep_indices(16, 8, 0.5, "gaussian", generator=torch.Generator().manual_seed(0))
    before = train.forward_backward(model, [(images, tokens)], [keep], nullcontext(), 1)
    opt.step()
    after = M.clip_loss(*model(images, tokens, keep))
    assert after < before - 1e-3


def test_gradient_accumulation_equals_the_full_batch():
    images, tokens = fixed_batch()
    keep = masking.keep_indices(16, 8, 0.5, "random", generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for micro in (1, 4):
        torch.manual_seed(0)
        model = M.create_model("tiny")
        chunks = [(i, t) for i, t in zip(images.chunk(micro), tokens.chunk(micro))]
        losses.append(train.forward_backward(model, chunks, list(keep.chunk(micro)), nullcontext(), 1))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5), (grads[0] - grads[1]).abs().max()


def test_weight_decay_skips_biases_norms_scale_and_embeddings():
    model = M.create_model("tiny")
    decay, no_decay = train.param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.class_embedding", "visual.positional_embedding", "text.positional_embedding",
            "visual.ln_pre.weight", "visual.blocks.0.attn.in_proj.bias"} <= skipped
    assert "visual.blocks.0.attn.in_proj.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [train.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "tests", "ddp_check.py"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loss_diff"] < 1e-5
    assert result["grad_diff"] < 1e-5 * max(1.0, result["grad_scale"]), result


def test_resume_follows_the_uninterrupted_run(shards, tmp_path):
    data_args = ["--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "64", "--log-dir", tmp_path]
    common = data_args + ["--epochs", "2", "--mask", "gaussian", "--ratio", "0.5", "--warmup", "2"]
    run_train(*common, "--name", "full")
    full = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    # an interrupted run leaves epoch_1.pt as its latest checkpoint: continue from exactly that
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copy(tmp_path / "full" / "checkpoints" / "epoch_1.pt", tmp_path / "resumed" / "checkpoints" / "epoch_latest.pt")
    proc = run_train(*common, "--name", "resumed", "--resume", "latest")
    assert "resumed from" in proc.stdout
    resumed = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    second_epoch = [r for r in full if r["step"] > 4]
    assert [r["step"] for r in resumed] == [r["step"] for r in second_epoch] == [6, 8]
    for a, b in zip(resumed, second_epoch):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)

    # the checkpoint carries what evaluation needs: it loads in eval.py and embeds
    import eval as zeroshot
    model, tokenizer = zeroshot.load_checkpoint(str(tmp_path / "full" / "checkpoints" / "epoch_2.pt"))
    with torch.no_grad():
        features = model.encode_text(tokenizer(["a photo of a red square"]))
    assert features.shape == (1, model.config.embed_dim)

    # unmasked tuning takes the weights only: with lr 0 they stay as loaded, and the optimizer starts afresh
    pretrained = tmp_path / "full" / "checkpoints" / "epoch_2.pt"
    run_train(*data_args, "--name", "tuned", "--pretrained", pretrained, "--mask", "none", "--epochs", "1",
              "--lr", "0", "--warmup", "1")
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "epoch_1.pt", weights_only=False)
    source = torch.load(pretrained, weights_only=False)
    assert tuned["epoch"] == 1 and tuned["step"] == 4
    assert tuned["optimizer"]["state"][0]["step"].item() == 4  # 4 steps of its own, not 8 + 4
    for key, value in source["state_dict"].items():
        assert torch.equal(tuned["state_dict"][key], value), key


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path):
    run_train("--train-data", str(shards / "corrupt-0.tar"), "--train-num-samples", "32", "--epochs", "1",
              "--mask", "random", "--log-dir", tmp_path, "--name", "corrupt")
    metrics = [r for r in read_metrics(tmp_path / "corrupt") if "loss" in r]
    assert metrics[-1]["step"] == 2 and metrics[-1]["skipped"] > 0
    assert all(0 < r["data_wait"] <= 1 for r in metrics)  # the share of the window's time spent waiting for batches
    assert os.path.exists(tmp_path / "corrupt" / "checkpoints" / "epoch_1.pt")


def test_zeroshot_on_a_class_folder_of_ones_own(shards, tmp_path):
    for name, colour in COLOURS.items():
        os.makedirs(tmp_path / "test" / name)
        for i in range(3):
            img = Image.new("RGB", (80, 72), (128, 128, 128))
            img.paste(colour, (20 + i, 16, 60 + i, 56))
            img.save(tmp_path / "test" / name / f"{i}.png")
    (tmp_path / "test" / "templates.txt").write_text("a photo of a {} square\n")
    run_train("--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "32", "--epochs", "1",
              "--mask", "gaussian", "--zeroshot-data", tmp_path / "test", "--log-dir", tmp_path, "--name", "own")
    record = [r for r in read_metrics(tmp_path / "own") if "zeroshot_top1" in r][-1]
    assert record["epoch"] == 1 and 0 <= record["zeroshot_masked_top1"] <= record["zeroshot_top5"] == 1.0  # 4 classes


@pytest.mark.parametrize("args,words", [
    (["--mask", "gaussian", "--ratio", "1.5"], "ratio"),
    (["--mask", "centre"], "--mask"),
    (["--train-data", "/nonexistent/shard-{0..3}.tar", "--train-num-samples", "10"], "/nonexistent"),
    (["--train-data", "x.tar"], "--train-num-samples"),
    (["--zeroshot-data", "/nonexistent/val"], "/nonexistent/val"),
    (["--imagenet-val", "a", "--zeroshot-data", "b"], "not both"),
])
def test_bad_flags_exit_at_once_with_one_line(args, words, tmp_path):
    proc = run_train(*args, "--log-dir", tmp_path, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
