"""repro.py: the paper-format table, Fashion-MNIST preparation, finished-run detection, and the
share of the subject that centred masking keeps per layout."""

import gzip
import json
import os
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


def test_a_run_is_finished_only_after_its_last_epoch_is_evaluated(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"epochs": 2}))
    records = [{"step": 10, "loss": 1.0}, {"epoch": 1, "zeroshot_top1": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert not repro.finished(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "zeroshot_top1": 0.4}) + "\n")
    assert repro.finished(tmp_path) and repro.evals(tmp_path)[-1]["zeroshot_top1"] == 0.4


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
