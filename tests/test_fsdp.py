"""--fsdp: FSDP2 (distributed.wrap_model) on 2 gloo ranks takes DDP's steps and writes DDP's
checkpoints, which eval.py and export.py read; kill -9 then --resume latest continues it to the
step; a run goes from DDP to FSDP and back through its checkpoints as if uninterrupted; unmasked
tuning starts from a DDP checkpoint."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as E
import export
from test_cluster import ONE_THREAD, alive, descendants, records, same_records, torchrun, \
    wait_for_step, weights
from test_train import class_folder, read_metrics, run_train, shards  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["global", "global, accum 2", "local", "local, accum 2", "checkpointed, accum 2"]


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def fsdp_against_ddp(tmp_path_factory):
    """tests/fsdp_check.py's results on 2 gloo ranks."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "tests", "fsdp_check.py"),
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_fsdp_steps_give_ddps_losses_and_its_checkpoint_state(fsdp_against_ddp, case):
    result = fsdp_against_ddp[case]
    # the same losses, step by step, to float32 rounding: the reductions sum in another order
    assert result["fsdp"] == pytest.approx(result["ddp"], rel=1e-6), result
    # Adam divides by the root of tiny second moments, so one rounding can move a weight by a part
    # of the step (lr 1e-3); a gradient or moment left out moves it by whole steps
    assert result["weight_diff"] < 1e-4 and result["moment_diff"] < 1e-5, result
    # the gathered state has DDP's keys, order, shapes and dtypes, weights and optimizer alike
    assert result["same_layout"]


def test_each_transformer_block_is_sharded_on_its_own(fsdp_against_ddp):
    # the block running (its forward's pre-hook) is whole, and at most the next one, prefetched
    # (on the CPU, none); the others stay shards. Sharded at the root only, all 8 would be whole
    assert fsdp_against_ddp["whole_blocks"] <= 2


def test_accumulation_reduces_gradients_on_the_last_micro_batch_only(fsdp_against_ddp):
    # a reduce-scatter per unit (8 blocks and the root) and step, whatever the micro-batches
    assert fsdp_against_ddp["reduce_scatters"] == {"1": 9, "2": 9}


def test_bf16_computes_in_bf16_from_fp32_master_weights(fsdp_against_ddp):
    assert fsdp_against_ddp["bf16"] == {"compute": "torch.bfloat16", "master": "torch.float32",
                                        "gradient": "torch.float32"}


# ----------------------------------------------------------------------------- train.py --fsdp

# 2 ranks x 8 x 2 micro-batches: 4 steps an epoch, 8 in all; what a DDP run composes with, with
# fp32 (bf16 differs between DDP's autocast and FSDP's bf16 weights by more than rounding)
COMPOSED = ["--precision", "fp32", "--batch-size", "8", "--accum-freq", "2", "--local-loss",
            "--grad-checkpointing", "--text-length", "16", "--text-mask", "random",
            "--workers", "0"]


def two_ranks(shards, class_folder, tmp_path, name, *extra, script="train.py"):
    """torchrun's command for a run of train.py (or a script that runs it) on 2 gloo ranks:
    test_cluster's with COMPOSED, a zero-shot pass at the end (epoch 2), and `extra`."""
    return torchrun(os.path.join(ROOT, script), "--train-data",
                    str(shards / "train-{0..1}.tar"), "--train-num-samples", "128", "--epochs",
                    "2", "--mask", "gaussian", "--save-every-n-steps", "3", "--zeroshot-data",
                    class_folder, "--log-dir", tmp_path, "--name", name, *COMPOSED, *extra)


def finished(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(shards, class_folder, tmp_path_factory):
    """The uninterrupted run, under DDP."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    finished(two_ranks(shards, class_folder, tmp_path, "whole"))
    return tmp_path / "whole"


def zero_shot(run_dir):
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir)
            if "zeroshot_top1" in r]


@pytest.fixture(scope="module")
def fsdp_run(shards, class_folder, tmp_path_factory):
    """An FSDP run killed (-9, torchrun and its ranks) after step 4, its last checkpoint of step
    3 (or 4, the epoch's end, if written first), then the same command again: (run folder, the
    second command's stdout)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    cmd = two_ranks(shards, class_folder, tmp_path, "cut", "--fsdp", "--resume", "latest")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=ONE_THREAD)
    wait_for_step(tmp_path / "cut", 4, [first])
    ranks = [p for p, parent in descendants(first.pid).items() if parent == first.pid]
    for pid in [first.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    first.wait()
    while any(map(alive, ranks)):  # SIGKILL takes a moment to end a process
        time.sleep(0.01)
    return tmp_path / "cut", finished(cmd).stdout


def test_fsdp_killed_and_resumed_takes_ddps_steps_to_the_end(ddp_run, fsdp_run):
    run_dir, resumed = fsdp_run
    assert "FSDP: 1/2 of the weights, gradients and AdamW state" in resumed
    # from step 3's mid-epoch checkpoint, or epoch 1's of step 4 when the kill came after it
    assert re.search(r"at epoch 0, step 3 \(in the middle of the epoch\)|at epoch 1, step 4",
                     resumed)
    same_records(records(run_dir), records(ddp_run))  # steps 1-8, each once, DDP's losses
    assert zero_shot(run_dir) == zero_shot(ddp_run)  # evaluated on a whole copy on each rank
    for key, value in weights(ddp_run).items():
        assert torch.allclose(weights(run_dir)[key], value, atol=1e-4), key


def layout(state):
    """A checkpoint's keys in order, shapes, dtypes and plain values (not the tensors' values, nor
    what differs between any two runs: the run's name, its time, its flags)."""
    if torch.is_tensor(state):
        return (tuple(state.shape), str(state.dtype))
    if isinstance(state, dict):
        return [(k, layout(v)) for k, v in state.items() if k not in ("time", "args")]
    if isinstance(state, (list, tuple)):
        return [layout(v) for v in state]
    return state


def test_a_checkpoint_fsdp_wrote_is_ddps_and_evaluates_and_exports_as_ddps(ddp_run, fsdp_run,
                                                                          class_folder, tmp_path):
    paths = {"ddp": ddp_run / "checkpoints" / "epoch_2.pt",
             "fsdp": fsdp_run[0] / "checkpoints" / "epoch_2.pt"}
    ddp, fsdp = (torch.load(p, weights_only=True) for p in paths.values())
    assert layout(fsdp) == layout(ddp)
    assert fsdp["optimizer"]["state"][0]["step"].item() == 8  # numbered, as torch.optim numbers
    results = {}
    for run, path in paths.items():
        E.main(["--checkpoint", str(path), "--dataset", str(class_folder), "--workers", "0",
                "--device", "cpu", "--precision", "fp32", "--output", str(tmp_path / run)])
        results[run] = json.loads((tmp_path / run).read_text())["metrics"]
        export.main([str(path), str(tmp_path / f"{run}.pt"), "--format", "open_clip"])
    assert results["fsdp"] == results["ddp"]
    exported = {run: torch.load(tmp_path / f"{run}.pt", weights_only=True) for run in paths}
    assert layout(exported["fsdp"]) == layout(exported["ddp"])


def test_a_run_goes_from_ddp_to_fsdp_and_back_as_if_uninterrupted(ddp_run, shards, class_folder,
                                                                tmp_path):
    # DDP's epoch_1.pt (step 4) resumed under FSDP, preempted by SIGTERM in its first step (5), its
    # mid-epoch checkpoint resumed under DDP to the end
    os.makedirs(tmp_path / "mixed" / "checkpoints")
    shutil.copy(ddp_run / "checkpoints" / "epoch_1.pt",
                tmp_path / "mixed" / "checkpoints" / "epoch_latest.pt")
    ddp = two_ranks(shards, class_folder, tmp_path, "mixed", "--resume", "latest")
    fsdp = two_ranks(shards, class_folder, tmp_path, "mixed", "--resume", "latest", "--fsdp",
                     script=os.path.join("tests", "preempt_at.py"))
    cut = subprocess.run(fsdp, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=ONE_THREAD | {"PREEMPT_AT": "1"})
    assert "preempted by SIGTERM at step 5" in cut.stderr, cut.stderr[-3000:]
    at = torch.load(tmp_path / "mixed" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert at["step"] == 5 and at["position"] is not None
    assert "at epoch 1, step 5 (in the middle of the epoch)" in finished(ddp).stdout
    same_records(records(tmp_path / "mixed"), [r for r in records(ddp_run) if r[0] > 4])
    assert zero_shot(tmp_path / "mixed") == zero_shot(ddp_run)
    for key, value in weights(ddp_run).items():
        assert torch.allclose(weights(tmp_path / "mixed")[key], value, atol=1e-4), key


def test_unmasked_tuning_under_fsdp_on_one_process_starts_from_a_ddp_checkpoint(ddp_run, shards,
                                                                             tmp_path):
    # a plain `python train.py --fsdp` (a process group of one, no launcher) tuning DDP's weights:
    # at lr 0 they come back as loaded, through the shards and the gathered save
    pretrained = ddp_run / "checkpoints" / "epoch_2.pt"
    proc = run_train("--fsdp", "--precision", "fp32", "--pretrained", pretrained, "--mask", "none",
                     "--lr", "0", "--warmup", "1", "--train-data", str(shards / "train-{0..1}.tar"),
                     "--train-num-samples", "32", "--epochs", "1", "--log-dir", tmp_path,
                     "--name", "tuned")
    assert "FSDP: 1/1 of the weights" in proc.stdout
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert tuned["optimizer"]["state"][0]["step"].item() == 2  # its own 2 steps, not 8 + 2
    for key, value in weights(ddp_run).items():
        assert torch.equal(tuned["state_dict"][key], value), key
