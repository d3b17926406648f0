"""repro.py: the paper-format table, Fashion-MNIST preparation, finished-run detection, and the
share of the subject that centred masking keeps per layout."""

import gzip
import json
import os
import tarfile

import numpy as np

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
