"""train.py end to end on tiny shards written by the tests: learning, DDP equivalence, resume,
tuning, bad input."""

import fcntl
import glob
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import nullcontext

import pytest
import torch
from PIL import Image

import checkpoint as ckpt
import masking
import distributed as D
import model as M
import photographer
import train
from eval import evaluate_folder
from conftest import as_scalars, synthetic_batch, tensorboard_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 30)}


def write_shard(path, n, corrupt=0, seed=0):
    """n image-caption samples ("a photo of a red square", ...) in img2dataset's layout, the first
    `corrupt` broken."""
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
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--batch-size", "16",
           "--workers", "0", "--log-every", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fixed_batch(n=16):
    return synthetic_batch(M.PRESETS["tiny"], n, torch.Generator().manual_seed(0))


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = M.create_model("tiny")
    # small: one step must not overshoot
    opt = torch.optim.AdamW(M.param_groups(model, 0.2), lr=1e-4)
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
        masks = list(keep.chunk(micro))
        losses.append(train.forward_backward(model, chunks, masks, nullcontext(), 1))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5), (grads[0] - grads[1]).abs().max()


def test_text_masking_trains_on_the_kept_tokens_at_their_own_positions():
    torch.manual_seed(0)
    model = M.create_model("tiny")
    images, tokens = fixed_batch()
    g = torch.Generator().manual_seed(0)
    positions = masking.text_keep_indices(tokens, 8, "prioritized", generator=g)
    short = tokens.gather(1, positions)  # (16, 8)
    loss = train.forward_backward(model, [(images, short)], [None], nullcontext(), 1, [positions])
    with torch.no_grad():
        assert loss == pytest.approx(M.clip_loss(*model(images, short, None, positions)).item(),
                                     abs=1e-6)
        # not positions 0..7
        assert loss != pytest.approx(M.clip_loss(*model(images, short)).item(), abs=1e-4)


def test_the_step_clamps_the_temperature_at_a_hundredth():
    torch.manual_seed(0)
    model = M.create_model("tiny")
    optimizer = M.configure_optimizer(model, lr=1e-3, weight_decay=0.2)
    images, tokens = fixed_batch()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # exp(5) = 148: above CLIP's ceiling of 100
    train.train_step(model, model, optimizer, [(images, tokens)], [None], [None],
                     nullcontext(), 1e-3)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)  # and no negative scale (a temperature above 1)
    train.train_step(model, model, optimizer, [(images, tokens)], [None], [None],
                     nullcontext(), 1e-3)
    assert model.logit_scale.item() == 0.0


def test_warmup_is_openclips_for_long_runs_and_5_percent_of_short_ones():
    # the paper's run: OpenCLIP's
    assert train.default_warmup(257_000) == train.default_warmup(200_000) == 10_000
    assert (train.default_warmup(199_999) == 9_999 and train.default_warmup(500) == 25
            and train.default_warmup(10) == 1)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [train.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def test_the_first_step_counts_in_the_loss_but_not_in_the_speed():
    log = train.LogWindow(samples_per_step=100, flops_per_step=1.0, peak_flops=None, total_steps=10,
                          per_epoch=10)
    log.losses.append(torch.tensor(4.0))  # the first step: compiles, slow
    time.sleep(0.5)
    log.start_clock()
    log.losses += [torch.tensor(2.0), torch.tensor(3.0)]
    record, line = log.close(step=3, lr=1e-3, logit_scale=14.3, elapsed=1.0)
    assert record["loss"] == pytest.approx(3.0)  # all three steps
    assert record["samples_per_s"] > 2 * 100 / 0.5  # two timed steps, the sleep not among them
    log.losses.append(torch.tensor(1.0))
    log.start_clock()  # a window of the first step alone: nothing timed
    record, line = log.close(step=4, lr=1e-3, logit_scale=14.3, elapsed=1.0)
    assert record["samples_per_s"] is None and "samples/s" not in line


def test_a_run_times_its_windows_from_the_second_step(shards, tmp_path):
    run_train("--train-data", shards / "train-{0..1}.tar", "--train-num-samples", "32", "--epochs",
              "1", "--log-every", "1", "--log-dir", tmp_path, "--name", "timed")
    first, second = [r for r in read_metrics(tmp_path / "timed") if "loss" in r]
    assert first["samples_per_s"] is None and first["data_wait"] is None  # the step that compiles
    assert second["samples_per_s"] > 0 and 0 <= second["data_wait"] <= 1


def test_sigma_auto_is_settled_from_the_ratio_and_the_grid():
    high = train.parse_args(["--mask", "gaussian", "--ratio", "0.918", "--sigma", "auto"])
    assert high.sigma == masking.auto_sigma(8, 0.918) and high.sigma_auto  # tiny: 8 x 8
    assert train.parse_args(["--mask", "gaussian", "--sigma", "auto"]).sigma == 0.2  # 50%
    big = train.parse_args(["--mask", "gaussian", "--ratio", "0.918", "--sigma", "auto",
                            "--image-size", "112"])
    assert big.sigma == masking.auto_sigma(14, 0.918)  # 112 px in 8 px patches


def test_sync_debug_needs_cuda_and_raises_only_inside_its_block(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--sync-debug", "--log-dir", str(tmp_path / "logs")])
    assert e.value.code == 2 and "--sync-debug needs a CUDA device" in capsys.readouterr().err
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.raises(RuntimeError):
        with D.syncs_raise(True):
            raise RuntimeError("a step that failed")
    with D.syncs_raise(False):
        pass
    assert modes == ["error", "default"]  # set for the step, and set back even when it raised


@pytest.fixture(scope="module")
def two_gloo_ranks(tmp_path_factory):
    """tests/ddp_check.py's results: each case's differences from one process's loss and
    gradients on 2 gloo ranks."""
    out = tmp_path_factory.mktemp("ddp") / "ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "tests", "ddp_check.py"),
                           str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["global", "global, accum 2"])
def test_two_gloo_ranks_equal_one_process(two_gloo_ranks, case):
    result = two_gloo_ranks[case]
    assert result["loss_diff"] < 1e-5
    assert result["grad_diff"] < 1e-5 * max(1.0, result["grad_scale"]), result


@pytest.mark.parametrize("case", ["local", "local, accum 2"])
def test_local_loss_has_the_global_loss_and_gradients_with_logits_over_world_size(two_gloo_ranks,
                                                                                  case):
    result = two_gloo_ranks[case]
    assert result["loss_diff"] < 1e-5  # the mean of the two ranks' shares
    assert result["grad_diff"] < 1e-5 * max(1.0, result["grad_scale"]), result
    # each rank's 4 images against all 8 texts: (4, 8), where the global loss makes (8, 8)
    assert result["logits"] == two_gloo_ranks["global"]["logits"] / 2 == 4 * 8


def test_resume_follows_the_uninterrupted_run(shards, tmp_path):
    data_args = ["--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "64",
                 "--log-dir", tmp_path]
    common = data_args + ["--epochs", "2", "--mask", "gaussian", "--ratio", "0.5", "--warmup", "2"]
    run_train(*common, "--name", "full")
    full = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    # an interrupted run leaves epoch_1.pt as its latest checkpoint: continue from exactly that
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copy(tmp_path / "full" / "checkpoints" / "epoch_1.pt",
                tmp_path / "resumed" / "checkpoints" / "epoch_latest.pt")
    proc = run_train(*common, "--name", "resumed", "--resume", "latest")
    assert "resumed from" in proc.stdout
    resumed = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    second_epoch = [r for r in full if r["step"] > 4]
    assert [r["step"] for r in resumed] == [r["step"] for r in second_epoch] == [6, 8]
    for a, b in zip(resumed, second_epoch):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)

    # the checkpoint carries what evaluation needs: it loads in eval.py and embeds
    model, tokenizer = ckpt.load_checkpoint(str(tmp_path / "full" / "checkpoints" / "epoch_2.pt"))
    with torch.no_grad():
        features = model.encode_text(tokenizer(["a photo of a red square"]))
    assert features.shape == (1, model.config.embed_dim)

    # unmasked tuning takes the weights only: with lr 0 they stay as loaded, and the optimizer
    # starts afresh
    pretrained = tmp_path / "full" / "checkpoints" / "epoch_2.pt"
    run_train(*data_args, "--name", "tuned", "--pretrained", pretrained, "--mask", "none",
              "--epochs", "1", "--lr", "0", "--warmup", "1")
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "epoch_1.pt", weights_only=False)
    source = torch.load(pretrained, weights_only=False)
    assert tuned["epoch"] == 1 and tuned["step"] == 4
    assert tuned["optimizer"]["state"][0]["step"].item() == 4  # 4 steps of its own, not 8 + 4
    for key, value in source["state_dict"].items():
        assert torch.equal(tuned["state_dict"][key], value), key


def test_the_crop_scale_and_resampling_flags_reach_the_loader(shards, tmp_path, monkeypatch):
    seen = {}

    def loader_of_nothing(*args, scale, resampled):  # stands in for data.make_train_loader
        seen.update(scale=scale, resampled=resampled)
        raise SystemExit("made the loader")

    monkeypatch.setattr(train.data, "make_train_loader", loader_of_nothing)
    with pytest.raises(SystemExit, match="made the loader"):
        train.main(start_args(shards, tmp_path, "--crop-scale", "0.5", "1.0",
                              "--dataset-resampled"))
    assert seen == {"scale": (0.5, 1.0), "resampled": True}


def test_grad_checkpointing_and_local_loss_reach_every_training_step(shards, tmp_path,
                                                                     monkeypatch):
    checkpointed, shares = [], []

    def counted(*args, **kwargs):  # torch.utils.checkpoint.checkpoint, as model.run_blocks calls it
        checkpointed.append(args[0])
        return checkpoint(*args, **kwargs)

    def share(image_features, *args):  # distributed.local_clip_loss
        shares.append(len(image_features))
        return local_clip_loss(image_features, *args)

    checkpoint, local_clip_loss = M.checkpoint, D.local_clip_loss
    monkeypatch.setattr(M, "checkpoint", counted)
    monkeypatch.setattr(D, "local_clip_loss", share)
    train.main(start_args(shards, tmp_path, "--mask", "gaussian", "--grad-checkpointing",
                          "--local-loss", "--name", "scaled"))
    # 2 steps (32 samples, batch 16) x the 4 + 4 blocks of tiny; the loss and gradients are those
    # of the blocks run plainly (tests/test_model.py) and of the global loss (ddp_check.py)
    assert len(checkpointed) == 2 * 8 and len(set(map(id, checkpointed))) == 8
    assert shares == [16, 16]  # one process: its share is the whole batch
    assert [r["step"] for r in read_metrics(tmp_path / "scaled") if "loss" in r] == [2]


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path):
    run_train("--train-data", str(shards / "corrupt-0.tar"), "--train-num-samples", "32",
              "--epochs", "1", "--mask", "random", "--log-dir", tmp_path, "--name", "corrupt")
    metrics = [r for r in read_metrics(tmp_path / "corrupt") if "loss" in r]
    assert metrics[-1]["step"] == 2 and metrics[-1]["skipped"] > 0
    # the share of the window's time spent waiting for batches
    assert all(0 < r["data_wait"] <= 1 for r in metrics)
    assert os.path.exists(tmp_path / "corrupt" / "checkpoints" / "epoch_1.pt")


def test_reclip_pretrained_at_32_px_is_tuned_at_64_px(shards, class_folder, tmp_path):
    data_args = ["--train-data", shards / "train-{0..1}.tar", "--train-num-samples", "128",
                 "--zeroshot-data", class_folder, "--log-dir", tmp_path]
    low = run_train(*data_args, "--image-size", "32", "--epochs", "2", "--name", "low")
    assert "16 of 16 patches encoded" in low.stdout  # a 4 x 4 grid at 32 px
    checkpoint = tmp_path / "low" / "checkpoints" / "epoch_latest.pt"
    resume = run_train(*data_args, "--resume", checkpoint, "--image-size", "64", "--name", "other",
                       check=False)
    assert resume.returncode == 1 and "--pretrained" in resume.stderr.strip().splitlines()[-1]
    run_train(*data_args, "--pretrained", checkpoint, "--image-size", "64", "--epochs", "1",
              "--lr", "1e-4", "--name", "tuned")
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert (tuned["config"]["image_size"] == 64
            and tuned["state_dict"]["visual.positional_embedding"].shape[0] == 65)
    record = [r for r in read_metrics(tmp_path / "tuned") if "zeroshot_top1" in r][-1]
    assert record["zeroshot_top1"] > 0.25  # above chance on the 4 colours


def test_a_run_with_text_masking_reports_the_tokens_it_encodes(shards, tmp_path):
    proc = run_train("--train-data", shards / "train-{0..1}.tar", "--train-num-samples", "32",
                     "--epochs", "1", "--mask", "random", "--ratio", "0.75", "--text-length", "8",
                     "--text-mask", "random", "--log-dir", tmp_path, "--name", "text")
    assert "16 of 64 patches encoded, 8 of 32 text tokens (random)" in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "text") if "loss" in r] == [2]


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """A zero-shot test split of one's own: 3 images of each colour's square, one folder per
    class."""
    root = tmp_path_factory.mktemp("test")
    for name, colour in COLOURS.items():
        os.makedirs(root / name)
        for i in range(3):
            img = Image.new("RGB", (80, 72), (128, 128, 128))
            img.paste(colour, (20 + i, 16, 60 + i, 56))
            img.save(root / name / f"{i}.png")
    (root / "templates.txt").write_text("a photo of a {} square\n")
    return root


def test_zeroshot_columns_are_eval_pys_unmasked_and_masked_passes(shards, class_folder, tmp_path):
    run_train("--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "32",
              "--epochs", "1", "--mask", "gaussian", "--ratio", "0.9", "--zeroshot-data",
              class_folder, "--log-dir", tmp_path, "--name", "own")
    record = [r for r in read_metrics(tmp_path / "own") if "zeroshot_top1" in r][-1]
    assert record["epoch"] == 1 and record["zeroshot_unreadable"] == 0
    # the same checkpoint through eval.py: inference unmasking, then the training mask (6 of 64
    # patches)
    model, tokenizer = ckpt.load_checkpoint(str(tmp_path / "own" / "checkpoints" / "epoch_1.pt"))
    folder = str(class_folder)
    passes = {prefix: evaluate_folder(model, tokenizer, folder, workers=0, quiet=True, **kw)
              for prefix, kw in [("zeroshot", {}),
                                 ("zeroshot_masked", {"mask": "gaussian", "ratio": 0.9})]}
    assert passes["zeroshot"] != passes["zeroshot_masked"]  # 6 of 64 patches: other figures
    for prefix, result in passes.items():
        for metric in ("top1", "top5", "mean_per_class_recall"):
            key = {"top1": "acc1", "top5": "acc5"}.get(metric, metric)
            assert record[f"{prefix}_{metric}"] == pytest.approx(result[key]), (prefix, metric)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_zero_shot_passes_run_in_the_precision_training_ran_in(shards, class_folder, tmp_path,
                                                                    monkeypatch, precision):
    asked, autocast = [], D.autocast
    monkeypatch.setattr(D, "autocast",
                        lambda device, p=None: asked.append(p) or autocast(device, p))
    train.main(start_args(shards, tmp_path, "--zeroshot-data", class_folder, "--precision",
                          precision, "--name", precision))
    assert len(asked) > 1 and set(asked) == {precision}  # training's, then each pass's


def test_report_to_tensorboard_gets_every_record_of_metrics_jsonl(shards, class_folder, tmp_path):
    train.main(start_args(shards, tmp_path, "--zeroshot-data", class_folder, "--log-every", "1",
                          "--report-to", "tensorboard", "--name", "tb"))
    records = read_metrics(tmp_path / "tb")
    assert [r["step"] for r in records] == [1, 2, 2]  # two log windows, then the evaluation
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert scalars == as_scalars(records) and {"train/loss", "val/zeroshot_top1"} <= set(scalars)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_report_to_wandb_offline_logs_every_record_of_metrics_jsonl(shards, tmp_path,
                                                                     monkeypatch):
    import wandb

    logged, log = [], wandb.Run.log

    def spy(run, data, step=None, **kwargs):
        logged.append((step, data))
        return log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(start_args(shards, tmp_path, "--report-to", "wandb", "--name", "wb"))
    records = read_metrics(tmp_path / "wb")
    assert [step for step, _ in logged] == [r["step"] for r in records] == [2]
    assert logged[0][1] == {f"train/{k}": v for k, v in records[0].items()
                            if k != "step" and v is not None}
    offline_runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*-wb" / "run-wb.wandb"))
    assert len(offline_runs) == 1 and b"train/loss" in open(offline_runs[0], "rb").read()


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_report_to_a_missing_package_is_one_line_before_anything_is_made(package, monkeypatch,
                                                                         tmp_path, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        train.main(["--report-to", f"{package}", "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"--report-to {package} needs the {package} package" in err and "pip install" in err
    assert not (tmp_path / "logs").exists()


def test_two_ranks_share_one_run_folder_and_tokenizer_when_their_clocks_differ(
        shards, class_folder, tmp_path):
    # rank 1's clock runs 1.5 s ahead: the run name and the trained tokenizer must still be rank
    # 0's; both ranks evaluate, each on a slice of the class folder
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "tests", "skewed_clock.py"),
                           "--model", "tiny", "--batch-size", "8", "--workers", "0",
                           "--train-data", str(shards / "train-{0..1}.tar"),
                           "--train-num-samples", "32", "--epochs", "1",
                           "--zeroshot-data", str(class_folder), "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = os.listdir(tmp_path)
    assert len(runs) == 1, runs
    checkpoints = tmp_path / runs[0] / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["epoch_1.pt", "epoch_latest.pt"]
    record = [r for r in read_metrics(tmp_path / runs[0]) if "zeroshot_top1" in r]
    # the whole folder, 4 classes, written once
    assert len(record) == 1 and record[0]["zeroshot_top5"] == 1.0


def test_kill_9_then_resume_logs_every_step_exactly_once(shards, tmp_path):
    # 8 steps an epoch
    common = ["--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "128",
              "--epochs", "3", "--mask", "random", "--log-every", "1", "--log-dir", tmp_path,
              "--name", "killed"]
    run = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--batch-size", "16",
           "--workers", "0", *map(str, common)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill it in epoch 2, after epoch_1.pt and a few steps
    while first.poll() is None and time.time() < deadline:
        if ((run / "checkpoints" / "epoch_1.pt").exists()
                and max(logged_steps(run), default=0) >= 10):
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    latest = torch.load(run / "checkpoints" / "epoch_latest.pt", weights_only=True)["step"]
    assert max(logged_steps(run)) > latest and not (run / "checkpoints" / "epoch_3.pt").exists()
    assert (run / "lock").exists()  # the killed run's lock file, no longer locked
    resumed = run_train(*common, "--resume", "latest")
    assert "resumed from" in resumed.stdout  # not refused: the kernel released the dead run's lock
    records = read_metrics(run)
    assert logged_steps(run) == list(range(1, 25))  # each step once, in order
    # wall time never jumps back
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)
    assert lock_is_free(run / "lock")


def logged_steps(run_dir):
    try:
        return [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    # not written yet, or a line half-written as we read
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def start_args(shards, tmp_path, *extra):
    return ["--model", "tiny", "--batch-size", "16", "--workers", "0",
            "--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "32",
            "--epochs", "1", "--log-dir", str(tmp_path), *map(str, extra)]


def lock_is_free(path):
    """No other process holds the run folder's lock (a POSIX lock, as train.py takes it)."""
    with open(path, "r+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False


def test_a_run_folder_is_held_by_one_live_run(shards, tmp_path):
    os.makedirs(tmp_path / "busy" / "checkpoints")
    ckpt.take_lock(str(tmp_path / "busy"))  # this test process: a live run holding the folder
    try:
        with pytest.raises(SystemExit) as e:
            train.main(start_args(shards, tmp_path, "--name", "busy"))
    finally:
        ckpt.release_lock(str(tmp_path / "busy"))
    message = str(e.value.code)
    assert f"in use by a live run (pid {os.getpid()} on " in message and "\n" not in message
    assert os.listdir(tmp_path / "busy" / "checkpoints") == []


@pytest.mark.parametrize("flag", ["--pretrained", "--resume"])
@pytest.mark.parametrize("content", [b"", b"a text file, not a checkpoint\n", None])
def test_files_that_are_not_checkpoints_are_one_line(flag, content, shards, tmp_path):
    path = tmp_path / "bad.pt"
    if content is None:  # a torch file, but not a checkpoint
        torch.save({"hello": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        train.main(start_args(shards, tmp_path, flag, path, "--name", "x"))
    message = str(e.value.code)
    assert message.startswith("train.py: error:") and "bad.pt" in message and "\n" not in message
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_folder_that_cannot_be_written_fails_before_training(shards, tmp_path):
    os.makedirs(tmp_path / "ro")
    (tmp_path / "ro" / "checkpoints").write_text("a file where the checkpoint folder goes")
    with pytest.raises(SystemExit) as e:
        train.main(start_args(shards, tmp_path, "--name", "ro"))
    assert "checkpoints" in str(e.value.code) and not (tmp_path / "ro" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags, kept", [
    ([], ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"]),
    (["--delete-previous-checkpoint", "--save-most-recent"], ["epoch_3.pt", "epoch_latest.pt"]),
    # and always the last epoch
    (["--save-frequency", "2"], ["epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"]),
    (["--save-frequency", "0"], ["epoch_latest.pt"]),
])
def test_which_checkpoints_are_kept(flags, kept, shards, tmp_path):
    run_train("--train-data", shards / "train-{0..1}.tar", "--train-num-samples", "32",
              "--epochs", "3", "--log-dir", tmp_path, "--name", "run", *flags)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == kept
    latest = torch.load(tmp_path / "run" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    # epoch_latest.pt is always the newest, loadable
    assert latest["epoch"] == 3 and latest["step"] == 6


@pytest.mark.parametrize("args,words", [
    (["--mask", "gaussian", "--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["--mask", "gaussian", "--sigma", "0"], "--sigma must be > 0 or auto"),
    (["--mask", "centre"], "--mask"),
    (["--text-length", "1"], "--text-length must be in [2, 32]"),
    (["--text-length", "33"], "--text-length must be in [2, 32]"),
    (["--text-mask", "block"], "--text-mask"),
    (["--image-size", "60"], "--image-size must be a multiple of tiny's patch size 8"),
    (["--save-frequency", "-1"], "--save-frequency must be >= 0"),
    (["--train-data", "x.tar"], "--train-num-samples"),
    (["--zeroshot-data", "/nonexistent/val"], "/nonexistent/val"),
    (["--imagenet-val", ROOT, "--zeroshot-data", ROOT], "not both"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "-4"], "--batch-size must be >= 1"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--accum-freq", "0"], "--accum-freq must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--zeroshot-frequency", "0"], "--zeroshot-frequency must be >= 1"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--crop-scale", "0", "0"], "--crop-scale must be"),
    (["--train-data", "x.tar", "--train-num-samples", "8", "--batch-size", "16"],
     "smaller than one global batch"),
    (["--pretrained", "/nonexistent/epoch_1.pt"], "no such file"),
    (["--resume", "latest"], "--name"),
    (["--report-to", "tensorboard,mlflow"], "--report-to must be tensorboard, wandb or both"),
])
def test_bad_flags_exit_2_with_one_line_before_anything_is_made(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "logs").exists()


def test_a_log_dir_that_is_a_file_or_under_one_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for log_dir in (tmp_path / "file", tmp_path / "file" / "under"):
        with pytest.raises(SystemExit) as e:
            train.main(["--log-dir", str(log_dir)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is a file" in err, err


def test_the_built_in_dataset_is_the_same_whichever_command_makes_it_and_its_paths_are_printed(
        tmp_path, monkeypatch, capsys):
    # train.py, photographer.py and repro.py
    assert train.parse_args([]).builtin_samples == photographer.NUM_TRAIN
    monkeypatch.setenv("GDMFLIP_DATA", str(tmp_path))
    args = train.parse_args(["--builtin-samples", "64", "--batch-size", "16"])
    train_data, test_dir = train.prepare_data(args, 0, 1, print)
    # what `python photographer.py --num-train 64` makes
    made = photographer.builtin_dataset(num_train=64)
    assert ((train_data, test_dir) == (made["train"], made["test"])
            and len(os.listdir(tmp_path)) == 1)
    out = capsys.readouterr().out
    assert (f"built-in training shards {train_data}" in out
            and f"built-in test split {test_dir}" in out)


@pytest.mark.parametrize("what", ["missing", "empty", "corrupt"])
def test_missing_empty_or_unreadable_shards_are_one_line_before_any_folder(what, tmp_path):
    pattern = str(tmp_path / "shard-{0..1}.tar")
    for i in range(2) if what != "missing" else []:
        # a valid empty tar, or all bad
        write_shard(tmp_path / f"shard-{i}.tar", 0 if what == "empty" else 8, corrupt=8)
    proc = run_train("--train-data", pattern, "--train-num-samples", "32",
                     "--log-dir", tmp_path / "logs", check=False)
    # bad samples are warned about, at most 5 lines, then limited
    *warnings, error = proc.stderr.strip().splitlines()
    assert (proc.returncode == 1 and error.startswith("train.py: error:")
            and str(tmp_path) in error), proc.stderr
    assert len(warnings) <= 5 and all("warning: skipped" in w for w in warnings), proc.stderr
    assert not (tmp_path / "logs").exists()


def test_the_default_precision_is_bf16_where_its_matmuls_are_fast(monkeypatch):
    def settled(argv):
        args = train.parse_args(argv)
        train.settle_defaults(args)
        return args.precision

    assert D.default_precision("cuda") == "bf16"
    for amx, avx512_bf16 in [(True, False), (False, True)]:  # either makes bf16 matmuls fast
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert D.default_precision("cpu") == "bf16"
        assert isinstance(D.autocast("cpu"), torch.autocast)
        assert settled([]) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # neither: fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert D.default_precision("cpu") == "fp32"
    assert not isinstance(D.autocast("cpu"), torch.autocast)
    assert settled([]) == "fp32"
    assert settled(["--precision", "bf16"]) == "bf16"
