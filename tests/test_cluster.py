"""Runs where users train: launched by SLURM, preempted and requeued (an exact mid-epoch resume),
shards behind pipes and URLs, a run folder's lock, a full disk, damaged checkpoints, and images as
users have them."""

import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as ckpt
import data
import distributed as D
import model as M
from test_train import COLOURS, lock_is_free, read_metrics, write_shard
from tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--batch-size", "16", "--log-every", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for s in range(2):
        write_shard(d / f"train-{s}.tar", 64, seed=s)
    return d


def train_cmd(shards, tmp_path, name, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--train-data",
            str(shards / "train-{0..1}.tar"), "--train-num-samples", "128", "--epochs", "2",
            "--mask", "gaussian", "--log-dir", str(tmp_path), "--name", name, *map(str, extra)]


def records(run_dir):
    """(step, loss, lr, logit scale) of every log window: what must not change across a resume."""
    return [(r["step"], r["loss"], r["lr"], r["logit_scale"]) for r in read_metrics(run_dir)
            if "loss" in r]


def same_records(a, b):
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b):
        assert x[1:] == pytest.approx(y[1:], rel=1e-5, abs=1e-7), (x, y)


def weights(run_dir, name="epoch_2.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["state_dict"]


def wait_for_step(run_dir, step, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        try:
            if max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not yet, or a line half-written
            pass
        time.sleep(0.02)
    raise AssertionError(f"never reached step {step}: " + procs[0].stderr.read()[-2000:])


# ----------------------------------------------------------------------------- SLURM


def test_launch_env_reads_torchrun_then_slurm_then_defaults(monkeypatch):
    for k in ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]:
        monkeypatch.delenv(k, raising=False)
    assert D.launch_env() == (0, 0, 1, 1)  # plain python
    # srun, 2 nodes x 4 tasks: task 6 is the third on the second node
    monkeypatch.setenv("SLURM_PROCID", "6")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    assert D.launch_env() == (6, 2, 8, 4)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert D.launch_env() == (6, 2, 8, 4)
    # torchrun inside a SLURM allocation: torchrun's variables win
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    for k, v in torchrun.items():
        monkeypatch.setenv(k, v)
    assert D.launch_env() == (1, 1, 2, 2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_tasks(cmds):
    """Start one process per command as `srun` would: SLURM's variables only, no RANK etc."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env |= {"SLURM_NTASKS": str(len(cmds)), "SLURM_NTASKS_PER_NODE": str(len(cmds)),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT}
    return [subprocess.Popen(cmd, env=env | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r, cmd in enumerate(cmds)]


def finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outs


def test_two_slurm_tasks_train_as_one_run_and_a_sigterm_to_one_stops_both_at_one_step(
        shards, tmp_path):
    common = ["--workers", "0", "--batch-size", "8"]  # 8 steps an epoch on each of 2 ranks
    codes, outs = finish(slurm_tasks([train_cmd(shards, tmp_path, "whole", *common)] * 2))
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    whole = records(tmp_path / "whole")
    assert [r[0] for r in whole] == list(range(1, 17))  # one run of 2 ranks, not two of one
    assert json.loads((tmp_path / "whole" / "args.json").read_text())["world_size"] == 2

    procs = slurm_tasks([train_cmd(shards, tmp_path, "cut", *common)] * 2)
    wait_for_step(tmp_path / "cut", 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # one rank only: both must stop at the same step
    codes, outs = finish(procs)
    assert codes == [ckpt.PREEMPTED] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    for _, err in outs:
        assert "preempted by SIGTERM at step" in err.strip().splitlines()[-1]
    at = torch.load(tmp_path / "cut" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert at["position"] is not None and 3 <= at["step"] < 8  # mid-epoch, epoch 1

    cmd = train_cmd(shards, tmp_path, "cut", *common, "--resume", "latest")
    codes, outs = finish(slurm_tasks([cmd] * 2))
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    same_records(records(tmp_path / "cut"), whole)
    for key, value in weights(tmp_path / "whole").items():
        assert torch.allclose(weights(tmp_path / "cut")[key], value, atol=1e-6), key


def test_eval_py_under_two_slurm_tasks_gives_one_process_figures(tiny, tmp_path):
    _, _, path = tiny  # conftest: a tiny model saved as train.py saves it
    folder = tmp_path / "folder"
    for i, name in enumerate(COLOURS):
        os.makedirs(folder / name)
        for j in range(3):
            Image.new("RGB", (64, 64), COLOURS[name]).save(folder / name / f"{j}.png")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", str(path), "--dataset",
           str(folder), "--workers", "0", "--device", "cpu", "--mask", "random"]
    single = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    codes, outs = finish(slurm_tasks([cmd] * 2))
    assert codes == [0, 0], outs[0][1][-2000:]
    assert json.loads(outs[0][0]) == json.loads(single.stdout) and outs[1][0] == ""  # rank 0 prints


def test_ranks_that_do_not_share_the_run_folder_stop_before_training(shards, tmp_path):
    cmds = [train_cmd(shards, tmp_path / f"node{r}", "run", "--workers", "0", "--batch-size", "8")
            for r in range(2)]  # each rank's --log-dir on its own disk, as on two nodes
    codes, outs = finish(slurm_tasks(cmds))
    assert codes == [1, 1]
    for _, err in outs:
        assert "not on a file system every node shares" in err.strip().splitlines()[-1]
    assert not (tmp_path / "node0" / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- preemption


def test_sigterm_mid_epoch_then_resume_latest_equals_the_uninterrupted_run(shards, tmp_path):
    workers = ["--workers", "2"]  # each worker's stream resumes where it stood
    whole = subprocess.run(train_cmd(shards, tmp_path, "whole", *workers), capture_output=True,
                           text=True, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cmd = train_cmd(shards, tmp_path, "cut", *workers, "--resume", "latest")  # first start too
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for_step(tmp_path / "cut", 10, [first])  # in the second epoch
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == ckpt.PREEMPTED, err[-2000:]
    assert "holds no checkpoint yet; starting fresh" in out
    assert "preempted by SIGTERM" in err.strip().splitlines()[-1]
    assert lock_is_free(tmp_path / "cut" / "lock")
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # the same command
    assert resumed.returncode == 0 and "in the middle of the epoch" in resumed.stdout
    same_records(records(tmp_path / "cut"), records(tmp_path / "whole"))
    for key, value in weights(tmp_path / "whole").items():
        assert torch.allclose(weights(tmp_path / "cut")[key], value, atol=1e-6), key


def test_save_every_n_steps_writes_the_step_and_kill_9_resumes_from_it(shards, tmp_path):
    whole = subprocess.run(train_cmd(shards, tmp_path, "whole", "--workers", "0"),
                           capture_output=True, text=True, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cmd = train_cmd(shards, tmp_path, "cut", "--workers", "0", "--save-every-n-steps", "3")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    wait_for_step(tmp_path / "cut", 5, [first])
    first.kill()  # no chance to save: the run goes on from the last step that was saved
    first.wait()
    at = torch.load(tmp_path / "cut" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert at["step"] == 3 and at["epoch"] == 0 and at["position"]["ranks"][0]["loader"][
        "batches"] == 3
    resumed = subprocess.run(cmd + ["--resume", "latest"], capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_records(records(tmp_path / "cut"), records(tmp_path / "whole"))


# ----------------------------------------------------------------------------- a mid-epoch loader


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"a photo of a {c} square" for c in COLOURS] * 4, 600, 32)


def batches_of(loader, epoch, position=None, count=None):
    loader.set_epoch(epoch, position)
    out = []
    for images, tokens, _ in loader:
        out.append((images, tokens))
        if count is not None and len(out) == count:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_mid_epoch_gives_the_rest_of_the_epoch(shards, tok, workers):
    make = functools.partial(data.make_train_loader, str(shards / "train-{0..1}.tar"), 8, 128, 32,
                             tok, workers=workers, scale=(0.5, 1.0))
    whole = batches_of(make(), 1)
    loader = make()
    head = batches_of(loader, 1, count=5)
    position = loader.position()
    assert position["batches"] == 5 and sum(position["read"]) == 5 * 8  # no bad samples here
    tail = batches_of(make(), 1, position)
    assert len(head) + len(tail) == len(whole) == 16
    for (a, b), (c, d) in zip(head + tail, whole):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_resuming_mid_epoch_reads_past_without_decoding(shards, tok, monkeypatch):
    loader = data.make_train_loader(str(shards / "train-{0..1}.tar"), 8, 128, 32, tok, workers=0)
    batches_of(loader, 0, count=12)
    position, decoded, decode = loader.position(), [], data.decode_sample
    monkeypatch.setattr(data, "decode_sample", lambda *a: decoded.append(1) or decode(*a))
    assert len(batches_of(loader, 0, position)) == 4
    assert len(decoded) == 4 * 8  # the 96 samples it read past were not decoded


def test_a_position_of_another_number_of_workers_is_one_line(shards, tok):
    loader = data.make_train_loader(str(shards / "train-{0..1}.tar"), 8, 128, 32, tok, workers=0)
    with pytest.raises(ValueError, match="resume it with --workers 2"):
        loader.set_epoch(0, {"batches": 4, "read": [16, 16]})


# ----------------------------------------------------------------------------- shards anywhere


def test_shards_through_pipes_and_http_give_the_local_samples(shards, tok):
    local = str(shards / "train-{0..1}.tar")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        http_url = f"http://127.0.0.1:{server.server_port}/train-{{0..1}}.tar"
        patterns = [local, f"pipe:cat {local}", http_url, f"{shards / 'train-0.tar'}::"
                    f"pipe:cat {shards / 'train-1.tar'}"]
        keys = [[s["__key__"] for url in data.expand_urls(p) for s in data.read_shard(url)]
                for p in patterns]
        assert keys[0] == keys[1] == keys[2] == keys[3] and len(keys[0]) == 128
        loaders = [data.make_train_loader(p, 8, 32, 32, tok, workers=0) for p in patterns[:3]]
        first = [batches_of(loader, 0)[0][0] for loader in loaders]
        assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])
    finally:
        server.shutdown()


def test_a_shard_that_stalls_or_fails_is_skipped_and_counted(shards, monkeypatch):
    monkeypatch.setattr(data, "SHARD_STALL_S", 0.5)
    before = data._bad["count"]
    t0 = time.time()
    stalled = list(data.read_shard(f"pipe:sleep 30; cat {shards / 'train-0.tar'}"))
    assert stalled == [None] and time.time() - t0 < 10  # given up after 0.5 s, the pipe killed
    failed = list(data.read_shard("pipe:cat /nonexistent/shard.tar"))
    assert failed == [None] and data._bad["count"] == before + 2
    assert data.expand_urls("pipe:cat /x-{0..2}.tar") == [f"pipe:cat /x-{i}.tar" for i in range(3)]


# ------------------------------------------------------------------------ the run folder's lock


def hold_lock_in_child(run_dir, then="time.sleep(60)"):
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import checkpoint; "
            f"checkpoint.take_lock({str(run_dir)!r}); print('locked', flush=True); {then}")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def take_and_free(run_dir):
    ckpt.take_lock(str(run_dir))
    ckpt.release_lock(str(run_dir))


def test_a_live_run_holds_its_folder_and_a_dead_one_never_does(tmp_path):
    live = hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(ValueError, match=f"in use by a live run \\(pid {live.pid} on "):
            ckpt.take_lock(str(tmp_path))
    finally:
        live.kill()
        live.wait()
    take_and_free(tmp_path)  # killed: the kernel let its lock go
    zombie = hold_lock_in_child(tmp_path, then="sys.exit(0)")
    while open(f"/proc/{zombie.pid}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.05)  # exited, not reaped: a zombie, its pid still taken
    take_and_free(tmp_path)
    zombie.wait()
    for content in [f"pid {os.getpid()} on {socket.gethostname()}",  # our own pid, a dead owner's
                    "pid 1 on a-node-that-died", ""]:  # another host's; an empty file
        (tmp_path / "lock").write_text(content)
        take_and_free(tmp_path)


def descendants(pid):
    """{pid: parent pid} of every live process below pid, from /proc."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except (FileNotFoundError, ProcessLookupError):  # ended as we looked
            continue
        state, ppid = stat.rsplit(") ", 1)[1].split()[:2]
        if state != "Z":
            parents[int(entry)] = int(ppid)
    below, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p:
                below[child] = p
                frontier.append(child)
    return below


def alive(pid):
    """Whether any thread of process `pid` still runs. A killed process's main thread turns zombie
    first; its other threads (gloo's, OpenMP's) exit after it, and its locks go with the last."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(") ", 1)[1][0] not in "ZX":
                    return True
        except FileNotFoundError:  # exited while we looked
            pass
    return False


def torchrun(script, *args, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", script, *TINY, *map(str, args)]


def two_ranks_args(shards, tmp_path, name):
    return ["--train-data", str(shards / "train-{0..1}.tar"), "--train-num-samples", "128",
            "--epochs", "2", "--mask", "gaussian", "--workers", "1", "--save-every-n-steps", "3",
            "--log-dir", str(tmp_path), "--name", name, "--resume", "latest"]


ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_killed_ranks_leave_workers_that_do_not_hold_the_folder(shards, tmp_path):
    # kill -9 of torchrun and its ranks, not their dataloader workers: orphans that live on for
    # a few seconds, until they notice their parent is gone. The folder is free at once.
    cmd = torchrun(os.path.join(ROOT, "train.py"), *two_ranks_args(shards, tmp_path, "run"),
                   "--epochs", "4")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=ONE_THREAD)
    wait_for_step(tmp_path / "run", 4, [first])  # step 3 saved, workers running
    tree = descendants(first.pid)
    ranks = [p for p, parent in tree.items() if parent == first.pid]
    workers = [p for p, parent in tree.items() if parent in ranks]
    assert len(ranks) == 2 and len(workers) == 2, tree
    for pid in [first.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    first.wait()
    while any(map(alive, ranks)):  # SIGKILL takes a moment to end a process
        time.sleep(0.01)
    assert any(map(alive, workers))  # orphaned workers, still there
    ckpt.take_lock(str(tmp_path / "run"))  # not refused: only a live rank holds the folder
    ckpt.release_lock(str(tmp_path / "run"))
    assert any(map(alive, workers))  # it was free while they lived
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout


def test_a_second_live_run_is_told_which_process_holds_the_folder(tmp_path):
    live = hold_lock_in_child(tmp_path)
    try:
        (tmp_path / "lock").write_text("pid 123 on a-node")  # the file names another owner
        with pytest.raises(ValueError) as e:
            ckpt.take_lock(str(tmp_path))
    finally:
        live.kill()
        live.wait()
    message = str(e.value)
    assert f"pid {live.pid} holds it now; the file names pid 123 on a-node" in message
    assert "\n" not in message
    ckpt.take_lock(str(tmp_path))  # this process now: a second take here is refused too
    try:
        with pytest.raises(ValueError, match=f"live run \\(pid {os.getpid()} on .*, this process"):
            ckpt.take_lock(str(tmp_path))
    finally:
        ckpt.release_lock(str(tmp_path))


def test_torchrun_restarts_a_rank_that_died_and_the_run_ends_as_the_uninterrupted_one(
        shards, tmp_path):
    # 4 steps an epoch on 2 ranks, saved at step 3 and 6; rank 1 dies in step 7, the restart
    # resumes from step 6, in the middle of epoch 2, at once (the dead ranks' workers still up)
    whole = subprocess.run(torchrun(os.path.join(ROOT, "train.py"),
                                    *two_ranks_args(shards, tmp_path, "whole")),
                           capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    marker = tmp_path / "died"
    cut = subprocess.run(torchrun(os.path.join(ROOT, "tests", "die_once.py"),
                                  *two_ranks_args(shards, tmp_path, "cut"), restarts=1),
                         capture_output=True, text=True, cwd=ROOT,
                         env=ONE_THREAD | {"DIE_MARKER": str(marker), "DIE_AT": "7"}, timeout=180)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert marker.exists() and "resumed from" in cut.stdout and "middle of the epoch" in cut.stdout
    same_records(records(tmp_path / "cut"), records(tmp_path / "whole"))
    assert records(tmp_path / "cut")[-1][0] == 8


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_nothing_half_made(tmp_path, monkeypatch):
    state = {"state_dict": {"w": torch.zeros(1000)}, "epoch": 1}
    ckpt.save_checkpoint(state, str(tmp_path), 1)
    before = (tmp_path / "epoch_latest.pt").read_bytes()

    def full_disk(obj, path):  # what torch.save does when the disk fills: a part, then this
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04" + b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 10302080 "
                           "vs 10301968")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("u", (), {"free": 104})())
    with pytest.raises(OSError) as e:
        ckpt.save_checkpoint(state | {"epoch": 2}, str(tmp_path), 2)
    message = str(e.value)
    assert "no space left on device" in message and str(tmp_path) in message
    assert "it needs about" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "epoch_latest.pt"]  # no .tmp left
    assert (tmp_path / "epoch_latest.pt").read_bytes() == before


# ----------------------------------------------------------------------------- damaged checkpoints


def test_a_truncated_checkpoint_is_one_whole_line_and_latest_falls_back(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoints"
    os.makedirs(folder)
    state = {"state_dict": {"w": torch.zeros(3)}, "config": {}, "tokenizer": "{}",
             "optimizer": {}, "epoch": 1, "step": 4}
    torch.save(state, folder / "epoch_1.pt")
    torch.save(state | {"epoch": 2, "step": 8}, folder / "epoch_latest.pt")  # a copy, not a link
    size = (folder / "epoch_latest.pt").stat().st_size
    (folder / "epoch_latest.pt").write_bytes((folder / "epoch_latest.pt").read_bytes()[:size // 2])
    with pytest.raises(ValueError) as e:
        ckpt.read_checkpoint(str(folder / "epoch_latest.pt"))
    message = str(e.value)
    assert "truncated" in message and f"{size // 2} bytes" in message and "\n" not in message
    assert "expected a torch.save file" not in message  # it is one
    resumed = ckpt.resume_state("latest", str(tmp_path / "run"))
    assert resumed["epoch"] == 1 and resumed["path"].endswith("epoch_1.pt")
    assert "resuming from" in capsys.readouterr().out
    (folder / "epoch_1.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        ckpt.resume_state("latest", str(tmp_path / "run"))


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    assert ckpt.resume_state("latest", str(tmp_path / "new-run")) is None
    assert "starting fresh" in capsys.readouterr().out
    assert ckpt.resume_state(None, str(tmp_path)) is None


# ------------------------------------------------------------------- images as users have them


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_images_are_scaled_to_8_bits_and_float_ones_skipped():
    grey = np.full((32, 32), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    img = data.open_image(png(grey))
    assert img.mode in ("I;16", "I")  # as Pillow reads a 16-bit PNG
    out = data.train_transform(16, (1.0, 1.0))(img)
    assert out.dtype == torch.uint8 and (out == 128).all()  # not clipped to white
    assert (data.to_uint8_tensor(img.convert("RGB")) == 255).all()  # what a plain convert gives
    with pytest.raises(data.BadSample, match="mode F"):
        data.to_rgb(Image.fromarray(np.zeros((4, 4), dtype=np.float32)))
    sample = {"__key__": "x", "png": png(grey), "txt": b"grey"}
    assert data.decode_sample(sample, data.train_transform(16))[1] == "grey"


def test_exif_orientation_turns_training_images_upright_but_not_evaluation_ones():
    pixels = np.zeros((40, 20, 3), dtype=np.uint8)  # stored 20 wide, 40 high: sideways
    pixels[:20] = (255, 0, 0)  # red at the stored top
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 6  # "rotate 90 clockwise to view": upright it is 40 wide
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif, quality=95)
    img = lambda: data.open_image(buf.getvalue())  # noqa: E731
    upright = data.train_transform(20, (1.0, 1.0))(img())  # the whole photo, squashed to 20x20
    # rotated clockwise, the stored top (red) is on the right
    assert upright[0, :, -3:].float().mean() > 200 and upright[0, :, :3].float().mean() < 60
    as_stored = data.eval_crop(20)(img())  # OpenCLIP's evaluation preprocessing: no EXIF
    assert as_stored[0, :3].float().mean() > 200  # red stays at the top
