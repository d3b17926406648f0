"""repro.py: the paper-format table, Fashion-MNIST preparation, finished-run detection, and the
share of the subject that centred masking keeps per layout."""

import gzip
import importlib.util
import json
import os
import re
import subprocess
import tarfile

import numpy as np
import pytest
import torch

import data
import photographer
import eval as zeroshot
import masking
import repro


def test_table_has_the_papers_columns_and_seed_statistics():
    rows = {"CLIP": [(None, 0.5, None), (None, 0.7, None)],
            "GDM-FLIP 50%": [(0.40, 0.50, 0.55), (0.60, 0.70, 0.75)]}
    lines = repro.table(rows).splitlines()
    assert lines[0] == "| method | masked inference | unmasked inference | after tuning |"
    assert lines[2] == "| CLIP | - | 60.0 +- 14.1 | - |"
    assert lines[3] == "| GDM-FLIP 50% | 50.0 +- 14.1 | 60.0 +- 14.1 | 65.0 +- 14.1 |"


def test_a_single_seed_has_no_spread():
    assert repro.mean_std([0.123]) == "12.3"


def write_idx(path, array):
    """MNIST's IDX format, gzipped: zero, zero, dtype 0x08 (uint8), ndim, the big-endian sizes, the
    bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_becomes_captioned_shards_and_a_test_folder(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 30), ("t10k", 20)]:
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        assert np.array_equal(repro.read_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), images)
    out = repro.prepare_fashion_mnist(str(tmp_path), str(tmp_path / "cache"))
    captions = {}
    for shard in data.expand_urls(out["train"]):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    captions[member.name] = tar.extractfile(member).read().decode()
    assert (len(captions) == 30
            and set(captions.values()) == {f"a photo of a {c}." for c in repro.FASHION_CLASSES})
    test = data.ImageFolder(out["test"], data.eval_transform(64))
    assert len(test) == 20 and len(test.classes) == 10
    assert zeroshot.folder_classnames(out["test"], test.classes) == sorted(repro.FASHION_CLASSES)
    assert repro.prepare_fashion_mnist(str(tmp_path), str(tmp_path / "cache")) == out  # cached

    probe = repro.fashion_mnist_probe_split(2, str(tmp_path), str(tmp_path / "cache"))
    train = data.ImageFolder(probe, data.eval_transform(64))
    # 3 images of each class in the file, the first 2 kept
    assert len(train) == 20 and len(train.classes) == 10
    assert sorted(os.listdir(os.path.join(probe, "bag"))) == ["00008.png", "00018.png"]


def test_a_run_is_finished_only_once_its_last_epochs_checkpoint_is_written(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"epochs": 2}))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch_1.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "epoch_latest.pt").write_bytes(b"")
    assert not repro.finished(tmp_path)
    # train.py evaluates after an epoch, then saves: the last checkpoint comes after the last record
    (tmp_path / "checkpoints" / "epoch_2.pt").write_bytes(b"")
    assert repro.finished(tmp_path)


def fake_subprocesses(monkeypatch, tmp_path):
    """repro's train.py and eval.py subprocesses replaced by stand-ins that write what the real
    ones would (args.json, the last checkpoint, an evaluation record, eval.py's JSON) with scores
    that say which run and which pass made them; returns the commands, in order."""
    commands = []

    def run(cmd, stdout=None, stderr=None, env=None):
        commands.append(cmd)
        flags = dict(zip(cmd[2::2], cmd[3::2])) if cmd[1].endswith("train.py") else {}
        if cmd[1].endswith("train.py"):
            run_dir = os.path.join(flags["--log-dir"], flags["--name"])
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            epochs = int(flags["--epochs"])
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump({"epochs": epochs, "mask": flags["--mask"],
                           "ratio": float(flags.get("--ratio", 0)), "sigma": 0.2}, f)
            open(os.path.join(run_dir, "checkpoints", f"epoch_{epochs}.pt"), "w").close()
            score = 0.5 if flags["--mask"] == "none" else float(flags["--ratio"])
            if "--zeroshot-data" in flags:
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"epoch": epochs, "zeroshot_top1": score,
                                        "zeroshot_mean_per_class_recall": score / 2,
                                        "zeroshot_masked_top1": score / 4,
                                        "zeroshot_masked_mean_per_class_recall": score / 8}) + "\n")
        elif "--retrieval" in cmd:  # eval.py: recall@k = k / 100, divided by 10 with a mask
            out = cmd[cmd.index("--output") + 1]
            scale = 0.1 if "--mask" in cmd else 1.0
            with open(out, "w") as f:
                json.dump({"metrics": {m: scale * int(m.split("@")[1]) / 100
                                       for m in repro.RETRIEVAL}}, f)
        else:  # eval.py's zero-shot classification, all its metrics: top-1 0.6 at 64 px
            with open(cmd[cmd.index("--output") + 1], "w") as f:
                json.dump({"metrics": {"acc1": 0.6, "acc5": 0.9, "mean_per_class_recall": 0.3}},
                          f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(repro.subprocess, "run", run)
    return commands


def test_repro_on_any_shards_with_retrieval_evaluates_each_run_masked_unmasked_and_tuned(
        tmp_path, monkeypatch, capsys):
    commands = fake_subprocesses(monkeypatch, tmp_path)
    repro.main(["--dataset", "photos", "--train-data", "train-{0..1}.tar", "--train-num-samples",
                "600", "--retrieval-data", "test.tar", "--ratios", "0.5", "--reclip-sizes", "32",
                "--seeds", "0", "1", "--epochs", "3", "--log-dir", str(tmp_path)])
    trains = [c for c in commands if c[1].endswith("train.py")]
    evals = [c for c in commands if c[1].endswith("eval.py")]
    names = [c[c.index("--name") + 1] for c in trains]
    assert sorted(names) == sorted([f"photos-{run}-s{s}{tuned}" for s in (0, 1)
                                    for run in ["flip-0.5", "gdmflip-0.5", "reclip-32px"]
                                    for tuned in ("", "-tuned")]
                                   + ["photos-clip-0-s0", "photos-clip-0-s1"])
    for c in trains:
        assert c[c.index("--train-data") + 1] == "train-{0..1}.tar"
        tuning = "--pretrained" in c  # one epoch of the data, as the paper tuned
        assert c[c.index("--train-num-samples") + 1] == "600"
        assert c[c.index("--epochs") + 1] == ("1" if tuning else "3")
    # retrieval: eval.py on each pre-trained run, unmasked, and masked with the run's own mask;
    # RECLIP at 64 px; each tuned run unmasked
    assert all(c[c.index("--retrieval") + 1] == "test.tar" for c in evals)
    masked = [c for c in evals if "--mask" in c]
    assert sorted(c[c.index("--mask") + 1] for c in masked) == ["gaussian"] * 2 + ["random"] * 2
    assert all(c[c.index("--ratio") + 1] == "0.5" for c in masked)
    assert len(evals) == 2 * (1 + 2 * 3 + 2)
    assert sum("--image-size" in c for c in evals) == 2  # RECLIP at 64 px, once per seed
    table = (tmp_path / "photos-table.md").read_text()
    assert table.startswith("zero-shot retrieval (%) on the photos test split, seeds [0, 1], 3 "
                            "epochs of 600 samples")
    assert "image_retrieval_recall@5:" in table and "text_retrieval_recall@10:" in table
    rows = table.split("image_retrieval_recall@10:")[1].split("\n\n")[1].splitlines()
    assert rows[2:] == ["| CLIP | - | 10.0 +- 0.0 | - |",  # the stand-ins score seeds alike
                        "| FLIP 50% | 1.0 +- 0.0 | 10.0 +- 0.0 | 10.0 +- 0.0 |",
                        "| GDM-FLIP 50% | 1.0 +- 0.0 | 10.0 +- 0.0 | 10.0 +- 0.0 |",
                        "| RECLIP 32 px (16 patches) | - | 10.0 +- 0.0 | 10.0 +- 0.0 |"]


def test_repro_on_any_shards_with_a_zeroshot_folder_reads_trainings_own_evaluation(
        tmp_path, monkeypatch):
    commands = fake_subprocesses(monkeypatch, tmp_path)
    repro.main(["--dataset", "objects", "--train-data", "train.tar", "--train-num-samples", "600",
                "--zeroshot-data", str(tmp_path), "--ratios", "0.75", "--reclip-sizes", "32",
                "--seeds", "0", "--epochs", "10", "--log-dir", str(tmp_path)])
    evals = [c for c in commands if c[1].endswith("eval.py")]  # RECLIP's at 64 px alone
    assert len(evals) == 1 and evals[0][evals[0].index("--image-size") + 1] == "64"
    trains = [c for c in commands if c[1].endswith("train.py")]
    # evaluated every fifth of the run and at the end
    assert all(c[c.index("--zeroshot-frequency") + 1] == "2" for c in trains)
    table = (tmp_path / "objects-table.md").read_text()
    acc1 = table.split("acc1:")[1].split("mean_per_class_recall:")[0]
    assert "| CLIP | - | 50.0 | - |" in acc1
    assert "| FLIP 75% | 18.8 | 75.0 | 50.0 |" in acc1  # masked, unmasked, tuned (mask none)
    assert "| RECLIP 32 px (16 patches) | - | 60.0 | 50.0 |" in acc1  # eval.py at 64 px; tuned
    assert "| FLIP 75% | 9.4 | 37.5 | 25.0 |" in table.split("mean_per_class_recall:")[1]


def centred_test_split(root, per_class=6):
    """Two class folders of discs, each with half its discs at the centre and half in a corner of
    a plain ground, + templates.txt: a zero-shot split whose images range from centred to not."""
    from PIL import Image

    for c, colour in [("red", (220, 30, 30)), ("blue", (30, 30, 220))]:
        os.makedirs(root / c)
        for i in range(per_class):
            image = np.full((64, 64, 3), 128, np.uint8)
            cx = 32 if i % 2 else 10 + i
            yy, xx = np.mgrid[:64, :64]
            image[(xx - cx) ** 2 + (yy - cx) ** 2 < 64] = colour
            Image.fromarray(image).save(root / c / f"{i}.png")
    (root / "templates.txt").write_text("a photo of a {}.\n")
    return str(root)


def test_by_centredness_cuts_the_split_from_least_to_most_centred_and_scores_each_part(
        tiny, tmp_path, monkeypatch):
    import visualize

    test_dir = centred_test_split(tmp_path / "test")
    parts = repro.centred_parts(test_dir, str(tmp_path / "parts"))
    kept = {name: k for name, (_, k) in visualize.measure_set(test_dir)["edge energy"][0].items()}
    images = [sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                     for f in fs if f.endswith(".png")) for folder, _ in parts]
    assert [len(i) for i in images] == [4, 4, 4] and sorted(sum(images, [])) == sorted(kept)
    for (folder, (low, high)), names in zip(parts, images):
        assert sorted(os.listdir(folder)) == ["blue", "red", "templates.txt"]  # every class
        assert low == min(kept[n] for n in names) and high == max(kept[n] for n in names)
    assert parts[0][1][1] <= parts[1][1][0] and parts[1][1][1] <= parts[2][1][0]
    assert all(kept[n] > 0.5 for n in images[2]) and all(kept[n] < 0.5 for n in images[0])

    _, _, path = tiny
    runs = []
    for seed in (0, 1):  # two seeds of one masked configuration (the same weights)
        run = tmp_path / f"objects-gdmflip-0.5-s{seed}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "epoch_latest.pt").write_bytes(path.read_bytes())
        (run / "args.json").write_text(json.dumps({"mask": "gaussian", "ratio": 0.5,
                                                   "sigma": 0.2}))
        runs.append(str(run))
    calls = []

    def evaluate_folder(model, tokenizer, folder, mask="none", ratio=0.0, sigma=0.2, **settings):
        """A stand-in whose top-1 says which part (0.1, 0.2, 0.3) and pass (+0.05 masked)."""
        calls.append((folder, mask, ratio, sigma))
        part = [f for f, _ in parts].index(folder) + 1
        return {"acc1": part / 10 + 0.05 * (mask != "none")}

    monkeypatch.setattr(repro.zeroshot, "evaluate_folder", evaluate_folder)
    lines = repro.by_centredness(runs, test_dir, str(tmp_path / "parts")).splitlines()
    assert lines[0].startswith("| run, inference | part 1: ") and len(lines) == 4
    assert lines[2:] == ["| objects-gdmflip-0.5, unmasked | 10.0 +- 0.0 | 20.0 +- 0.0 | 30.0 +- "
                         "0.0 | 2 |",
                         "| objects-gdmflip-0.5, masked | 15.0 +- 0.0 | 25.0 +- 0.0 | 35.0 +- 0.0 "
                         "| 2 |"]
    assert {c[1:] for c in calls if c[1] != "none"} == {("gaussian", 0.5, 0.2)}  # the run's mask


def test_peer_without_openclip_is_one_line(tmp_path, capsys):
    # this interpreter has no OpenCLIP, as CI's has not: the line says where to install it
    if importlib.util.find_spec("open_clip") is not None:
        pytest.skip("OpenCLIP is installed here")
    with pytest.raises(SystemExit) as e:
        repro.main(["--peer", "openclip", "--dataset", "toy", "--train-data", "x.tar",
                    "--train-num-samples", "8", "--zeroshot-data", str(tmp_path),
                    "--log-dir", str(tmp_path)])
    assert "--peer openclip needs OpenCLIP in" in str(e.value)
    assert "pip install 'open_clip_torch[training]'" in str(e.value)


def test_peer_openclip_trains_both_and_openclips_own_classifier_agrees(tmp_path):
    """OpenCLIP's trainer beside ours on a few steps (run where OpenCLIP imports: python -m pytest
    with the Python that has open_clip_torch[training])."""
    pytest.importorskip("open_clip_train.main")
    import data

    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 220, 30),
               "grey": (128, 128, 128)}
    for c, colour in colours.items():  # so noisy that two steps leave the top-1 far from 100%
        for split, n in [("train", 4), ("test", 6)]:
            os.makedirs(tmp_path / split / c)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 150, (72, 80, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.jpg")
    (tmp_path / "test" / "templates.txt").write_text("a photo of a {}.\n")
    shards = data.convert(str(tmp_path / "train"), str(tmp_path / "shards"), shard_size=8)
    repro.main(["--peer", "openclip", "--dataset", "toy", "--train-data", shards,
                "--train-num-samples", "16", "--zeroshot-data", str(tmp_path / "test"),
                "--batch-size", "8", "--epochs", "1", "--seeds", "0", "--ratios", "0.5",
                "--log-dir", str(tmp_path / "runs")])
    table = (tmp_path / "runs" / "toy-peer-table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:7]] == [
        "| OpenCLIP, CLIP", "| OpenCLIP, FLIP 50% (--force-patch-dropout)", "| ours, CLIP",
        "| ours, FLIP 50%", "| ours, GDM-FLIP 50%"]
    theirs, ours = re.findall(r": (\d\.\d{4})", table[-1])
    # OpenCLIP's preprocessing and classifier, and eval.py's: one figure
    assert theirs == ours and float(ours) < 1
    # both trainers ran the recipe: 2 steps of 8, the same seed, warmup and precision
    peer = tmp_path / "runs" / "peer"
    params = (peer / "toy-openclip-none-0-s0" / "params.txt").read_text()
    assert "precision: fp32" in params and "warmup: 1" in params and "seed: 0" in params
    ours_args = json.loads((peer / "toy-ours-gaussian-0.5-s0" / "args.json").read_text())
    assert (ours_args["precision"], ours_args["warmup"], ours_args["seed"]) == ("fp32", 1, 0)
    assert ours_args["tokenizer"].endswith("bpe_simple_vocab_16e6.txt.gz")


@pytest.mark.parametrize("argv, error", [
    (["--train-data", "x.tar", "--train-num-samples", "9", "--retrieval-data", "y.tar"],
     "give it a name of its own"),
    (["--dataset", "photos", "--train-data", "x.tar", "--retrieval-data", "y.tar"],
     "needs --train-num-samples"),
    (["--dataset", "photos"], "--dataset must be one of"),
    (["--reclip-sizes", "30"], "--reclip-sizes must be multiples of 8 under 64"),
    (["--by-centredness", "run"], "--by-centredness needs the --zeroshot-data"),
])
def test_repro_flags_that_do_not_fit_together_are_one_line(argv, error, capsys):
    with pytest.raises(SystemExit):
        repro.main(argv)
    assert error in capsys.readouterr().err


def test_centring_keeps_more_of_the_subject_the_more_central_the_layout():
    kept = {layout: repro.subject_kept(layout, 0.5, n=300) for layout in photographer.LAYOUTS}
    # random masking keeps 0.5 of anything
    assert kept["centered"] > kept["uniform"] > kept["edge"] > 0.5
    assert repro.subject_kept("centered", 0.9, n=300) < kept["centered"]


def test_reclip_sizes_have_as_many_patches_as_the_masking_they_face():
    ratios = [repro.budget_ratio(size) for size in repro.RECLIP_SIZES]
    assert ratios == [0.4375, 0.75, 0.859375]  # exact in binary: no off-by-one in num_kept
    for size, ratio in zip(repro.RECLIP_SIZES, ratios):
        assert masking.num_kept(8, ratio) == (size // 8) ** 2  # 36, 16, 9 of tiny's 64 patches
    # the paper's 91.8%: 16 of ViT-B/16's 196, a 64 px image's patches
    assert masking.num_kept(14, 0.918) == 16


def test_patch_sets_are_the_central_the_covered_and_the_nearest_covered_patches():
    sets, nearest = repro.patch_sets(8, 0.918, 0.2)
    assert list(sets) == ["central 5", "central 16", "central 36", "covered"]
    central = [set(sets[f"central {m}"].tolist()) for m in (5, 16, 36)]
    assert central[0] < central[1] < central[2]
    assert central[1] == {r * 8 + c for r in range(2, 6) for c in range(2, 6)}  # the middle 4 x 4
    p = masking.keep_probability(8, 0.918, "gaussian", 0.2).flatten()
    covered = set(sets["covered"].tolist())
    assert covered == {i for i in range(64) if p[i] >= 0.01} and 0 < len(covered) < 64
    assert set(nearest) == set(range(64)) - covered
    for i, j in nearest.items():  # the covered patch at the least grid distance
        dist = lambda a: (a // 8 - i // 8) ** 2 + (a % 8 - i % 8) ** 2  # noqa: E731
        assert j in covered and dist(j) == min(map(dist, covered))
    sets, nearest = repro.patch_sets(8, 0.75, 0.2)  # at 75% every patch is covered
    assert "covered" not in sets and nearest == {}


def test_inference_breakdown_feeds_each_patch_set_then_the_nearest_covered_positions(
        tiny, tmp_path, monkeypatch):
    model, _, path = tiny
    run = tmp_path / "centered-gdmflip-0.918-s0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "epoch_latest.pt").write_bytes(path.read_bytes())
    (run / "args.json").write_text(json.dumps({"mask": "gaussian", "ratio": 0.918, "sigma": 0.2}))
    test_dir = photographer.builtin_dataset(root=str(tmp_path / "data"), num_train=1,
                                            num_test=72)["test"]
    fed, score = [], zeroshot.zero_shot_classification

    def spy(model, classifier, loader, device, keep=None, *rest, **kw):
        fed.append((None if keep is None else keep[0].tolist(),
                    model.visual.positional_embedding.detach().clone()))
        return score(model, classifier, loader, device, keep, *rest, **kw)

    monkeypatch.setattr(zeroshot, "zero_shot_classification", spy)
    result = repro.inference_breakdown(str(run), test_dir)
    sets, nearest = repro.patch_sets(8, 0.918, 0.2)
    assert list(result) == ["every patch", *sets, "every patch, nearest covered position"]
    assert [keep for keep, _ in fed] == [None, *(s.tolist() for s in sets.values()), None]
    trained = model.visual.positional_embedding.detach()
    assert all(torch.equal(pos, trained) for _, pos in fed[:-1])
    moved = fed[-1][1]
    for i, j in nearest.items():  # each uncovered position wears its nearest covered neighbour's
        assert torch.equal(moved[1 + i], trained[1 + j])
    assert torch.equal(moved[0], trained[0])
    monkeypatch.undo()
    assert result["every patch"] == zeroshot.evaluate_folder(
        *repro.checkpoint.load_checkpoint(str(run / "checkpoints" / "epoch_latest.pt")), test_dir,
        workers=1, quiet=True)["acc1"]


def test_breakdown_table_groups_seeds_and_puts_trainings_count_in_its_own_column(monkeypatch):
    results = {"a-0.918-s0": {"every patch": 0.1, "central 5": 0.3, "central 16": 0.2,
                              "central 36": 0.15, "covered": 0.25,
                              "every patch, nearest covered position": 0.12},
               "a-0.918-s1": {"every patch": 0.2, "central 5": 0.5, "central 16": 0.3,
                              "central 36": 0.25, "covered": 0.35,
                              "every patch, nearest covered position": 0.14},
               "b-0.75-s0": {"every patch": 0.4, "central 16": 0.6, "central 36": 0.5},
               "b-0.75-s1": {"every patch": 0.2, "central 16": 0.6, "central 36": 0.5}}
    monkeypatch.setattr(repro, "inference_breakdown", lambda run, test_dir: results[run])
    lines = repro.breakdown_table(list(results), [None] * 4).splitlines()
    assert lines[2] == ("| a-0.918 | 15.0 +- 7.1 | 40.0 +- 14.1 | 25.0 +- 7.1 | 20.0 +- 7.1 | "
                        "30.0 +- 7.1 | 13.0 +- 1.4 | 2 |")
    # at 75% training's count is 16 of 64, and every patch is covered
    assert lines[3] == ("| b-0.75 | 30.0 +- 14.1 | 60.0 +- 0.0 | 60.0 +- 0.0 | 50.0 +- 0.0 | "
                        "30.0 +- 14.1 | - | 2 |")


def test_breakdown_refuses_runs_not_on_the_builtin_dataset(tmp_path, capsys):
    real = tmp_path / "real-data-run"  # train.py records the default layout for these too
    real.mkdir()
    (real / "args.json").write_text(json.dumps({"train_data": "/data/cc12m/{0000..0001}.tar",
                                                "builtin_layout": "centered"}))
    for run in (real, tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            repro.main(["--breakdown", str(run)])
        assert "is not a run on the built-in dataset" in str(e.value)
