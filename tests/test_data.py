"""The contract of data.py: shards in, (images, tokens) out, never stopped by a bad sample;
OpenCLIP's preprocessing; class folders and retrieval shards; convert."""

import io
import itertools
import math
import os
import random
import signal
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import data
from tokenizer import train_tokenizer

MEAN, STD = torch.tensor(data.OPENAI_MEAN), torch.tensor(data.OPENAI_STD)


# --------------------------------------------------------------------------------------------------
# helpers
def jpeg(size=(24, 20), seed=0):
    """A JPEG with some structure (a gradient plus noise), so crops and resizes are visible."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * [1, 0.5, 0.2]
    pixels = np.clip(x + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_header(width, height):
    """A PNG that claims width x height pixels but holds (almost) no data: a decompression bomb's
    header."""
    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def write_shard(path, samples):
    """samples: list of dicts {"__key__": ..., ext: bytes}."""
    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write(s)
    return str(path)


def good(i, size=(24, 20)):
    return {"__key__": f"{i:06d}", "jpg": jpeg(size, seed=i), "txt": f"sample {i}".encode()}


@pytest.fixture(autouse=True)
def fresh_warning_limit(monkeypatch):
    """Each test starts with the bad-sample warnings' rate limit unspent."""
    monkeypatch.setattr(data, "_bad", {"count": 0, "last_warning": -math.inf})


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"sample {i}" for i in range(200)] + ["a photo of a red star"], 600, 16)


def sample_ids(tok, tokens):
    """The i of each "sample i" caption in a (B, T) token batch (CLIP's pre-split makes each digit a
    word)."""
    return [int("".join(tok.decode(row).split()[1:])) for row in tokens]


# --------------------------------------------------------------------------------------------------
# shards
def test_shard_round_trip(tmp_path):
    samples = [good(i) for i in range(5)]
    # png ext, caption stripped
    samples[3] = {"__key__": "000003", "png": samples[3]["jpg"], "txt": b"  sample 3\n"}
    path = write_shard(tmp_path / "s-0.tar", samples)
    assert [s["__key__"] for s in data.read_shard(path)] == [f"{i:06d}" for i in range(5)]
    t = data.eval_transform(16)
    out = list(data.image_text_dataset(path, t))
    assert [c for _, c in out] == [f"sample {i}" for i in range(5)]
    for i, (x, _) in enumerate(out):
        assert torch.equal(x, t(Image.open(io.BytesIO(jpeg(seed=i)))))


def test_expand_urls_braces_double_colon_and_folders(tmp_path, capsys):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar", "b-7.tar"]:
        write_shard(tmp_path / name, [good(0)])
    d = str(tmp_path)
    assert data.expand_urls(f"{d}/a-{{000..002}}.tar::{d}/b-{{7,8}}.tar") == [
        f"{d}/a-000.tar", f"{d}/a-001.tar", f"{d}/a-002.tar", f"{d}/b-7.tar"]
    # b-8 is missing: a warning, the others are used
    assert "1 of 2 shards" in capsys.readouterr().err
    names = ["a-000.tar", "a-001.tar", "a-002.tar", "b-7.tar"]
    assert data.expand_urls(d) == sorted(f"{d}/{n}" for n in names)


def test_missing_data_is_a_clear_error_before_training(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.make_train_loader(f"{tmp_path}/nope/x-{{0..3}}.tar", 4, 16, 16, tok)
    with pytest.raises(FileNotFoundError, match="no matching file"):
        data.expand_urls(f"{tmp_path}/x-{{0..3}}.tar")
    write_shard(tmp_path / "ok.tar", [good(0)])
    with pytest.raises(FileNotFoundError, match="no matching file"):  # the second of two patterns
        data.expand_urls(f"{tmp_path}/ok.tar::{tmp_path}/y.tar")


# split by shard, and by sample when there are too few shards
@pytest.mark.parametrize("num_shards", [4, 1])
def test_image_text_dataset_split_across_ranks_and_workers_without_duplicates(tmp_path, num_shards):
    n = 12
    for k in range(num_shards):
        write_shard(tmp_path / f"s-{k}.tar", [good(i, (8, 8)) for i in range(k, n, num_shards)])
    pattern = f"{tmp_path}/s-{{0..{num_shards - 1}}}.tar"
    seen = []
    for rank in range(2):
        ds = data.image_text_dataset(pattern, data.eval_transform(8), rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        part = [c for _, c in loader]
        assert 0 < len(part) < n
        seen += part
    assert sorted(seen) == sorted(f"sample {i}" for i in range(n))  # every sample exactly once


# --------------------------------------------------------------------------------------------------
# bad input
def bad_samples():
    truncated = jpeg((64, 64))
    return {
        "corrupt image": {"jpg": b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(200),
                          "txt": b"bad"},
        "truncated image": {"jpg": truncated[: len(truncated) // 2], "txt": b"bad"},
        "non-image file": {"jpg": b"<html>404 not found</html>", "txt": b"bad"},
        "missing caption": {"jpg": jpeg()},
        "empty caption": {"jpg": jpeg(), "txt": b"  \n"},
        "non-UTF-8 caption": {"jpg": jpeg(), "txt": b"caf\xe9 \xff\xfe"},
        "no image": {"txt": b"bad", "json": b"{}"},
        "decompression bomb": {"png": png_header(12_000, 12_000), "txt": b"bad"},
        # Pillow itself refuses this one
        "huge bomb": {"png": png_header(30_000, 30_000), "txt": b"bad"},
    }


def shard_with_bad_samples(tmp_path):
    """s-0.tar: a good sample before each kind of bad one; s-1.tar: 10 good samples, cut inside the
    7th image."""
    samples = []
    for i, (what, s) in enumerate(bad_samples().items()):
        samples += [good(2 * i), {"__key__": f"bad{i:03d}", **s}]
    write_shard(tmp_path / "s-0.tar", samples)
    whole = write_shard(tmp_path / "whole.tar", [good(i) for i in range(100, 110)])
    cut = next(m.offset_data for m in tarfile.open(whole).getmembers()
               if m.name == "000106.jpg") + 100
    with open(tmp_path / "s-1.tar", "wb") as f:
        f.write(open(whole, "rb").read()[:cut])
    good_captions = ([f"sample {2 * i}" for i in range(len(bad_samples()))]
                     + [f"sample {i}" for i in range(100, 106)])
    return f"{tmp_path}/s-{{0..1}}.tar", good_captions


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, capsys):
    pattern, good_captions = shard_with_bad_samples(tmp_path)
    ds = data.image_text_dataset(pattern, data.eval_transform(16))
    # in order, and the truncated tar up to its last whole sample
    assert [c for _, c in ds] == good_captions
    assert ds.skipped == len(bad_samples()) + 1  # + the rest of the truncated tar
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: skipped" in line]
    assert len(warnings) == data.WARN_FIRST  # rate-limited: not one per bad sample
    assert "once a minute" in warnings[-1]


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(data.BadSample, match="pixel limit"):
        data.open_image(png_header(12_000, 12_000))  # over our limit; Pillow would only warn
    assert data.open_image(png_header(1000, 1000)).size == (1000, 1000)


def test_train_loader_keeps_going_over_bad_samples(tmp_path, tok):
    pattern, good_captions = shard_with_bad_samples(tmp_path)
    loader = data.make_train_loader(pattern, 4, 40, 16, tok, workers=0)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 10
    seen = {f"sample {i}" for _, tokens, _ in batches for i in sample_ids(tok, tokens)}
    assert seen <= set(good_captions)
    assert sum(int(skipped) for _, _, skipped in batches) > 0


class Spinning(BaseException):
    """Not an Exception: the loader's handlers for bad files must not take it for one."""


@pytest.fixture
def deadline():
    """Fails a test that runs past 20 s (a spinning loader) instead of letting it hang."""
    def too_slow(signum, frame):
        raise Spinning("over 20 s: the loader spins")
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def shards_without_samples(tmp_path, kind):
    """Two shards of `kind` data: tars with no members, members with no extension, or bytes that are
    no tar."""
    for k in range(2):
        path = tmp_path / f"s-{k}.tar"
        if kind == "corrupt":
            path.write_bytes(np.random.default_rng(k).bytes(3000))
            continue
        with tarfile.open(path, "w") as tar:
            for key in (["000001", "000002"] if kind == "no extension" else []):
                info = tarfile.TarInfo(key)
                info.size = 5
                tar.addfile(info, io.BytesIO(b"hello"))
    return f"{tmp_path}/s-{{0..1}}.tar"


@pytest.mark.parametrize("kind", ["empty", "no extension", "corrupt"])
def test_data_without_samples_is_a_one_line_error_before_training(tmp_path, tok, kind):
    pattern = shards_without_samples(tmp_path, kind)
    with pytest.raises(ValueError, match="no readable sample in its 2 shards") as error:
        # in this process, before any worker starts
        data.make_train_loader(pattern, 4, 16, 8, tok, workers=2)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no captions in its 2 shards"):
        data.read_captions(pattern)  # the tokenizer is never trained on nothing


def test_a_worker_whose_shards_hold_no_sample_raises_instead_of_spinning(tmp_path, tok, deadline,
                                                                         monkeypatch):
    write_shard(tmp_path / "s-0.tar", [good(i) for i in range(8)])
    write_shard(tmp_path / "s-1.tar", [])  # the other worker's share: a valid tar, empty
    # s-0 passes the check
    loader = data.make_train_loader(f"{tmp_path}/s-{{0..1}}.tar", 4, 16, 8, tok, workers=0)
    errors = []
    for w in range(2):
        monkeypatch.setattr(data, "worker_split", lambda w=w: (w, 2))
        try:
            assert len(list(loader)) == 2
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "no sample in part" in errors[0]
    # past the check: only s-1
    for resampled, error in [(False, "no sample in part"), (True, "without a sample")]:
        stream = data.TrainStream([str(tmp_path / "s-1.tar")], 4, 2, 8, tok, (0.9, 1), 0, 0, 1,
                                  resampled, workers=0)
        with pytest.raises(ValueError, match=error):
            next(iter(stream))


# --------------------------------------------------------------------------------------------------
# train loader
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    for k in range(4):
        write_shard(d / f"s-{k}.tar", [good(i, (12, 10)) for i in range(25 * k, 25 * k + 25)])
    return f"{d}/s-{{0..3}}.tar"


def stream(shards, tok, epoch=0, seed=0, rank=0, workers=0, num_samples=48):
    loader = data.make_train_loader(shards, 8, num_samples, 8, tok, workers=workers, seed=seed,
                                    rank=rank, scale=(0.5, 1.0))
    loader.set_epoch(epoch)
    return [(images, sample_ids(tok, tokens)) for images, tokens, _ in loader]


def test_train_batches_shapes_and_epoch_length(shards, tok):
    loader = data.make_train_loader(shards, 8, 100, 8, tok, workers=0, world_size=2)
    assert loader.num_batches == len(loader) == 100 // (8 * 2)
    batches = list(loader)
    assert len(batches) == 6
    images, tokens, skipped = batches[0]
    # normalised later, on the device
    assert images.shape == (8, 3, 8, 8) and images.dtype == torch.uint8
    assert images.float().std() > 0  # real pixels, not a blank
    assert data.normalize(images).dtype == torch.float32
    assert tokens.shape == (8, 16) and tokens.dtype == torch.long and skipped.dtype == torch.long
    assert int(skipped) == 0


def test_train_stream_is_a_function_of_seed_epoch_rank(shards, tok):
    a = stream(shards, tok, epoch=1)
    b = stream(shards, tok, epoch=1)  # e.g. a run resumed at the start of epoch 1
    # same samples, same crops
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    for other in (stream(shards, tok, epoch=2), stream(shards, tok, seed=1, epoch=1),
                  stream(shards, tok, rank=1, epoch=1)):
        assert [ids for _, ids in other] != [ids for _, ids in a]


def test_worker_processes_draw_distinct_streams_and_resume_matches(shards, tok):
    a = stream(shards, tok, epoch=3, workers=2, num_samples=64)
    assert len(a) == 8
    # the loader alternates workers
    worker0, worker1 = [ids for _, ids in a[0::2]], [ids for _, ids in a[1::2]]
    assert worker0 != worker1
    # persistent workers picking up set_epoch == fresh workers started at that epoch (a resumed run)
    loader = data.make_train_loader(shards, 8, 64, 8, tok, workers=2, scale=(0.5, 1.0))
    for epoch in range(4):
        loader.set_epoch(epoch)
        got = [(images, sample_ids(tok, tokens)) for images, tokens, _ in loader]
    assert len(got) == len(a) == 8  # every epoch's workers still make all their batches
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, got))


def test_worker_split_sums_to_the_epoch_and_streams_differ(shards, tok, monkeypatch):
    loader = data.make_train_loader(shards, 4, 28, 8, tok, workers=0)
    per_worker = []
    for w in range(3):
        monkeypatch.setattr(data, "worker_split", lambda w=w: (w, 3))
        per_worker.append([sample_ids(tok, tokens) for _, tokens, _ in loader])
    assert [len(b) for b in per_worker] == [3, 2, 2]  # 7 batches
    assert len({str(b[0]) for b in per_worker}) == 3


def epoch_parts(shards, tok, monkeypatch, epoch=0, batch_size=5, num_samples=100, world_size=2,
                workers=2, seed=0, resampled=False):
    """{(rank, worker): the sample ids it yields in `epoch`}, each worker run in this process."""
    parts = {}
    for rank in range(world_size):
        loader = data.make_train_loader(shards, batch_size, num_samples, 8, tok, workers=0,
                                        seed=seed, rank=rank, world_size=world_size,
                                        resampled=resampled)
        loader.set_epoch(epoch)
        for w in range(workers):
            monkeypatch.setattr(data, "worker_split", lambda w=w: (w, workers))
            parts[rank, w] = [i for _, tokens, _ in loader for i in sample_ids(tok, tokens)]
    return parts


def test_an_epoch_reads_every_shard_once_across_ranks_and_workers(shards, tok, monkeypatch):
    # 4 shards of 25 samples (shard k holds 25k .. 25k + 24), 2 ranks x 2 workers, 100 samples an
    # epoch
    epochs = [epoch_parts(shards, tok, monkeypatch, epoch) for epoch in range(3)]
    for parts in epochs:
        # each sample exactly once
        assert sorted(i for ids in parts.values() for i in ids) == list(range(100))
        for ids in parts.values():
            # split by shard: each part reads one whole shard
            assert len({i // 25 for i in ids}) == 1
    shard_of = [{part: ids[0] // 25 for part, ids in parts.items()} for parts in epochs]
    assert shard_of[0] != shard_of[1] != shard_of[2]  # a fresh permutation of the shards each epoch
    # a function of (seed, epoch): resumes exactly
    assert epoch_parts(shards, tok, monkeypatch, 1) == epochs[1]
    assert epoch_parts(shards, tok, monkeypatch, 1, seed=1) != epochs[1]


def test_a_part_whose_shards_run_out_reads_them_again_in_a_new_order(shards, tok, monkeypatch):
    # twice what the shards hold
    for ids in epoch_parts(shards, tok, monkeypatch, num_samples=200).values():
        shard = ids[0] // 25
        # its own shard, twice
        assert sorted(ids) == sorted(2 * list(range(25 * shard, 25 * shard + 25)))
        assert ids[:25] != ids[25:]  # through a fresh shuffle


def test_fewer_shards_than_parts_splits_by_sample(shards, tok, monkeypatch):
    # 6 parts, 4 shards
    parts = epoch_parts(shards, tok, monkeypatch, batch_size=4, num_samples=96, workers=3)
    ids = [i for part in parts.values() for i in part]
    assert len(ids) == 96 and len(set(ids)) == 96  # no sample twice
    # every part reads from every shard
    assert all(len({i // 25 for i in part}) > 1 for part in parts.values())


def test_resampled_draws_shards_with_replacement(shards, tok, monkeypatch):
    parts = epoch_parts(shards, tok, monkeypatch, resampled=True)
    ids = [i for part in parts.values() for i in part]
    assert len(ids) == 100 and len(set(ids)) < 100  # some shard read twice, another not at all
    assert epoch_parts(shards, tok, monkeypatch, resampled=True) == parts
    assert epoch_parts(shards, tok, monkeypatch, 1, resampled=True) != parts


# --------------------------------------------------------------------------------------------------
# transforms
def test_eval_transform_hand_computed_crop_and_normalisation():
    # 4 x 2, left half red, right half blue: no resize (short side is already 2), centre crop =
    # columns 1 and 2
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.paste((0, 0, 255), (2, 0, 4, 2))
    x = data.eval_transform(2)(img)
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    assert (torch.allclose(x[:, 0, 0], (red - MEAN) / STD)
            and torch.allclose(x[:, 1, 1], (blue - MEAN) / STD))
    # 2 x 7 with a different grey per row: crop top = round((7 - 2) / 2) = round(2.5) = 2 (Python
    # rounds half to even)
    rows = Image.fromarray(np.repeat(np.arange(0, 70, 10, dtype=np.uint8)[:, None], 2, axis=1), "L")
    x = data.eval_transform(2)(rows)
    grey = torch.tensor([20.0, 30.0]) / 255
    assert torch.allclose(x[:, :, 0], (grey - MEAN[:, None]) / STD[:, None])  # (3, rows)


def test_batch_normalisation_on_the_device_equals_the_per_image_one():
    # training normalises uint8 batches after the copy to the GPU; it must give the numbers of
    # ToTensor + Normalize
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)) for _ in range(3)]
    # (3, 3, 5, 6) uint8, as the loader yields
    batch = torch.stack([data.to_uint8_tensor(p) for p in pictures])
    assert batch.dtype == torch.uint8
    assert torch.equal(batch[1, :, 2, 4], torch.tensor(np.array(pictures[1])[2, 4]))
    # ToTensor, then Normalize, per image
    expected = torch.stack([(torch.tensor(np.array(p)).permute(2, 0, 1) / 255
                             - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1) for p in pictures])
    assert torch.equal(data.normalize(batch), expected)


def test_eval_transform_resizes_the_shortest_side_then_crops_the_middle():
    # 4 x 40: green, a grey middle band (rows 12-27), green. Resized to 2 x 20, the centre crop
    # keeps rows 9-10 whose bicubic footprint (rows 15-24 of the original) is all grey; a squash or
    # a corner crop would show green
    pixels = np.zeros((40, 4, 3), np.uint8)
    pixels[:, :, 1] = 200
    pixels[12:28] = 128
    for img in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0].copy(), "L")):
        x = data.eval_transform(2)(img)
        assert x.shape == (3, 2, 2)  # grey 128 in every channel, normalised
        grey = ((128 / 255 - MEAN) / STD).view(3, 1, 1).expand(3, 2, 2)
        assert torch.allclose(x, grey, atol=1e-6)


def torchvision_resize_size(w, h, size):
    """torchvision Resize(int) on (h, w): short side -> size, long side -> int(size * long /
    short)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def test_eval_transform_matches_a_reference_pipeline_on_odd_sizes():
    rng = random.Random(0)
    for _ in range(20):
        w, h, s = rng.randint(5, 300), rng.randint(5, 300), rng.choice([7, 16, 224])
        assert data.shortest_side_size(w, h, s) == torchvision_resize_size(w, h, s)
    # resize, then CenterCrop's rounding, then RGB, ToTensor, Normalize
    img = Image.open(io.BytesIO(jpeg((301, 203))))
    nw, nh = torchvision_resize_size(301, 203, 64)
    ref = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - 64) / 2.0)), int(round((nw - 64) / 2.0))
    ref = ref.crop((left, top, left + 64, top + 64)).convert("RGB")
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
    # what eval.py's loaders yield: uint8, normalised later on the device
    crop = data.eval_crop(64)(img)
    assert crop.dtype == torch.uint8 and torch.equal(crop, ref)
    normalised = (ref.float() / 255 - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)
    assert torch.equal(data.eval_transform(64)(img), normalised)


def test_random_resized_crop_box_follows_torchvision_rule():
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = data.random_resized_crop_box(400, 300, (0.5, 1.0), rng)
        assert 0 <= left <= 400 - w and 0 <= top <= 300 - h
        assert 0.5 * 120_000 * 0.9 <= w * h <= 120_000 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # fallback: centred, ratio 4:3
    assert data.random_resized_crop_box(1000, 10, (0.9, 1.0), rng) == (493, 0, 13, 10)


def test_train_transform_draft_decodes_the_same_crop():
    img_bytes = jpeg((800, 600))  # big JPEG: libjpeg decodes at 1/4 size for a 64 px output
    t = data.train_transform(64, scale=(0.3, 0.5), generator=random.Random(0))
    fast = t(Image.open(io.BytesIO(img_bytes)))
    box = data.random_resized_crop_box(800, 600, (0.3, 0.5), random.Random(0))  # the crop t drew
    assert box[2] < 600 and box[0] > 0
    full = Image.open(io.BytesIO(img_bytes)).convert("RGB")
    crop = (box[0], box[1], box[0] + box[2], box[1] + box[3])
    slow = data.to_uint8_tensor(full.resize((64, 64), Image.BICUBIC, box=crop))
    assert fast.shape == (3, 64, 64) and fast.dtype == torch.uint8
    # draft decoding differs a little, a misplaced crop a lot
    assert (fast.float() - slow.float()).abs().mean() < 3
    t = data.train_transform(64, (0.3, 0.5), generator=random.Random(0))
    again = t(Image.open(io.BytesIO(img_bytes)))
    assert torch.equal(fast, again)


# --------------------------------------------------------------------------------------------------
# eval data
def test_image_folder(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        data.ImageFolder(str(tmp_path / "nope"), data.eval_transform(8))
    with pytest.raises(ValueError, match="no class folders"):
        data.ImageFolder(str(tmp_path), data.eval_transform(8))
    for cls in ["n02", "n01"]:
        os.makedirs(tmp_path / cls)
        (tmp_path / cls / "a.JPEG").write_bytes(jpeg())
    (tmp_path / "n02" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "classnames.txt").write_text("x\ny\n")  # files beside the class folders are ignored
    ds = data.ImageFolder(str(tmp_path), data.eval_transform(8))
    assert ds.classes == ["n01", "n02"] and [label for _, label in ds.samples] == [0, 1, 1]
    assert ds[0][1:] == (0, True)
    # broken.jpg: a blank mean-colour image, with its label, flagged, and a warning
    x, label, readable = ds[2]
    assert label == 1 and not readable and x.shape == (3, 8, 8) and x.abs().max() < 0.01
    assert "broken.jpg" in capsys.readouterr().err


def test_convert_class_folders_and_captioned_folders(tmp_path):
    for cls in ["tabby_cat", "dog"]:
        os.makedirs(tmp_path / "classes" / cls)
        for i in range(3):
            (tmp_path / "classes" / cls / f"{i}.jpg").write_bytes(jpeg(seed=i))
    pattern = data.convert(str(tmp_path / "classes"), str(tmp_path / "out1"), "a photo of a {}.",
                           shard_size=4)
    assert len(data.expand_urls(pattern)) == 2
    assert (sorted(data.read_captions(pattern))
            == ["a photo of a dog."] * 3 + ["a photo of a tabby cat."] * 3)
    assert (tmp_path / "out1" / "classnames.txt").read_text() == "dog\ntabby cat\n"
    os.makedirs(tmp_path / "captioned")
    for i in range(3):
        (tmp_path / "captioned" / f"k{i}.jpg").write_bytes(jpeg(seed=i))
        (tmp_path / "captioned" / f"k{i}.txt").write_text(f"caption {i}")
    pattern = data.convert(str(tmp_path / "captioned"), str(tmp_path / "out2"))
    assert sorted(data.read_captions(pattern)) == ["caption 0", "caption 1", "caption 2"]


def shard_texts(pattern):
    """{caption text: image bytes} of every sample in the shards (a caption text holds all the
    sample's captions, one a line)."""
    return {s["txt"].decode(): s["jpg"] for url in data.expand_urls(pattern)
            for s in data.read_shard(url)}


def test_convert_a_captions_file_one_sample_per_image_with_all_its_captions(tmp_path, capsys):
    images = tmp_path / "images"
    os.makedirs(images / "sub")
    for i, name in enumerate(["a.jpg", "b.jpg", "sub/c.jpg"]):
        (images / name).write_bytes(jpeg(seed=i))
    (images / "broken.jpg").write_bytes(b"not an image")
    # OpenCLIP's CSV: its default columns, commas and quotes inside captions, the rows of an image
    # anywhere in the file, one bad row of each kind
    (tmp_path / "train.csv").write_text(
        'filepath,title\n'
        'a.jpg,"A dog, running."\n'
        'sub/c.jpg,a   cat\n'
        'a.jpg,"The dog says ""hi""."\n'
        'b.jpg,\n'  # empty caption: b has no other, so it is not written
        'a.jpg,a third,extra field\n'  # a row that does not parse
        'missing.jpg,a caption of no image\n'
        'broken.jpg,a caption of a broken image\n'
        '\n')  # a blank line is no row
    pattern = data.convert(str(images), str(tmp_path / "out"), captions=str(tmp_path / "train.csv"))
    texts = shard_texts(pattern)
    assert sorted(texts) == ['A dog, running.\nThe dog says "hi".', "a cat"]
    assert texts["a cat"] == (images / "sub" / "c.jpg").read_bytes()  # the original bytes
    out = capsys.readouterr()
    assert ("wrote 2 samples (4 skipped: 1 empty caption, 1 image that does not decode, "
            "1 missing image, 1 row that does not parse)") in out.out
    for named in ("row 5 of", "row 6 of", "missing.jpg", "broken.jpg"):  # each named, a line each
        assert named in out.err
    assert not (tmp_path / "out" / "classnames.txt").exists()  # captions, not classes


def test_convert_a_tsv_with_its_own_columns_restricted_to_a_split(tmp_path, capsys):
    # Flickr8k's layout: images/KEY.jpg, captions.tsv (image<TAB>caption, five rows an image),
    # split_train.txt naming one image a line
    os.makedirs(tmp_path / "images")
    rows = ["image\tcaption"]
    for i in range(4):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg(seed=i))
        rows += [f'{i}.jpg\t"quoted" caption {j} of {i}' for j in range(5)]  # TSV: no quoting
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "split_train.txt").write_text("2.jpg\n0.jpg\n5.jpg\n")
    assert data.main(["convert", str(tmp_path / "images"), str(tmp_path / "out"), "--captions",
                      str(tmp_path / "captions.tsv"), "--csv-img-key", "image",
                      "--csv-caption-key", "caption", "--files",
                      str(tmp_path / "split_train.txt")]) is None
    texts = shard_texts(str(tmp_path / "out"))
    assert sorted(texts) == ["\n".join(f'"quoted" caption {j} of {i}' for j in range(5))
                             for i in (0, 2)]
    assert "wrote 2 samples (1 skipped: 1 missing image)" in capsys.readouterr().out  # 5.jpg
    # the wrong column names: one line that names them, nothing written
    with pytest.raises(SystemExit, match="no column 'filepath' \\(--csv-img-key\\)"):
        data.main(["convert", str(tmp_path / "images"), str(tmp_path / "out2"), "--captions",
                   str(tmp_path / "captions.tsv")])
    assert not (tmp_path / "out2").exists()


def test_convert_class_folders_restricted_to_a_split(tmp_path):
    # Caltech-101's layout: CLASS/image.jpg, and train.txt naming CLASS/image.jpg a line
    for cls in ["Faces_easy", "ant", "chair"]:
        os.makedirs(tmp_path / "src" / cls)
        for i in range(3):
            (tmp_path / "src" / cls / f"image_{i}.jpg").write_bytes(jpeg(seed=i))
    (tmp_path / "train.txt").write_text("ant/image_0.jpg\nFaces_easy/image_2.jpg\n"
                                        "ant/image_2.jpg\n")
    pattern = data.convert(str(tmp_path / "src"), str(tmp_path / "out"),
                           files=str(tmp_path / "train.txt"))
    assert sorted(data.read_captions(pattern)) == ["a photo of a Faces easy.",
                                                   "a photo of a ant.", "a photo of a ant."]
    # every class of the folders, also one the split leaves out: the test split's labels
    assert (tmp_path / "out" / "classnames.txt").read_text() == "Faces easy\nant\nchair\n"


def test_a_sample_with_several_captions_trains_on_one_drawn_per_epoch(tmp_path, tok):
    """One caption of a sample per epoch, drawn from (seed, epoch, sample): another one in
    another epoch, all of them over epochs, the same ones in a run resumed mid-epoch."""
    captions = {i: [f"sample {10 * i + j}" for j in range(3)] for i in range(16)}
    write_shard(tmp_path / "s-0.tar", [{"__key__": f"{i:04d}", "jpg": jpeg((12, 10), seed=i),
                                        "txt": "\n".join(c).encode()} for i, c in captions.items()])
    pattern = str(tmp_path / "s-0.tar")

    def epoch_ids(epoch, seed=0, start=None):
        loader = data.make_train_loader(pattern, 4, 16, 8, tok, workers=0, seed=seed)
        loader.set_epoch(epoch, start)
        return [i for _, tokens, _ in loader for i in sample_ids(tok, tokens)]

    seen = {e: epoch_ids(e) for e in range(10)}
    for ids in seen.values():  # one of its own captions for each of the 16 samples
        assert sorted(i // 10 for i in ids) == list(range(16))
    drawn = {i: {c for ids in seen.values() for c in ids if c // 10 == i} for i in range(16)}
    # a uniform draw per epoch: each sample's 10 draws hit 2 or 3 of its captions (1 for a fixed
    # line, or a draw that ignores the epoch)
    assert all(len(c) >= 2 for c in drawn.values())
    assert sum(map(len, drawn.values())) > 40  # most of the 48
    assert sorted(epoch_ids(2, seed=1)) != sorted(seen[2])  # and with the seed
    # resumed after two of the epoch's four batches, in a fresh loader
    loader = data.make_train_loader(pattern, 4, 16, 8, tok, workers=0)
    loader.set_epoch(2)
    first = [sample_ids(tok, tokens) for _, tokens, _ in itertools.islice(iter(loader), 2)]
    resumed = epoch_ids(2, start={"batches": 2, "read": loader.position()["read"]})
    assert sum(first, []) + resumed == seen[2]


def test_default_workers_share_the_cores_between_the_gpus_of_a_machine(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)))
    # one GPU, 16 cores: all but the training process's own
    assert data.default_workers(on_gpu=True, ranks_here=1) == 15
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(96)))
    assert data.default_workers(on_gpu=True, ranks_here=8) == 11  # 96 cores over 8 ranks
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert data.default_workers(on_gpu=True, ranks_here=8) == 1  # never none
    assert data.default_workers(on_gpu=False) == 1
