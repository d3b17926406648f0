"""
Files -> tensors: webdataset shards -> (uint8 images, token ids) batches for training, class folders
and image-caption shards for evaluation, and the image transforms with OpenCLIP's numbers.

    loader = make_train_loader("/data/cc12m/cc12m-train-{0000..2175}.tar", batch_size=256,
                               num_samples=10_968_539, image_size=224, tokenizer=tok, workers=6)
    for images, tokens, skipped in loader:  # (B, 3, 224, 224) uint8, (B, 77), bad ones skipped
        images = normalize(images.to("cuda"))  # float, normalised on the GPU

Shards are img2dataset / webdataset tars: `KEY.jpg|jpeg|png|webp` next to `KEY.txt`. A bad sample
(corrupt or truncated image, non-image, missing / empty / non-UTF-8 caption, truncated tar,
decompression-bomb-sized image) is skipped, counted and reported in a rate-limited warning: it never
stops a run.

The first section follows one training batch from the loader down to the pixels, each function
after its caller; the second (seeds, object storage, stalls, warnings) can be skipped on a first
reading.

    # a folder of KEY.jpg + KEY.txt, class folders, or images + a captions file -> shards
    python data.py convert SRC OUT [--template ...] [--captions captions.tsv] [--files split.txt]
"""

import argparse
import csv
import functools
import hashlib
import io
import math
import multiprocessing
import os
import random
import re
import select
import sys
import tarfile
import time
import warnings
import zlib

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tokenizer import read_text

# OpenAI CLIP's image statistics, used by OpenCLIP too
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# aspect-ratio range of torchvision's RandomResizedCrop, which OpenCLIP uses
CROP_RATIO = (3 / 4, 4 / 3)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes
FOLDER_IMAGE_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")  # also read from image folders
EXIF_ORIENTATION = 0x0112  # the EXIF tag phones set instead of rotating the pixels
# Pillow's decompression-bomb limit (1024 ** 3 // 4 // 3); larger is a bad sample
MAX_IMAGE_PIXELS = 89_478_485
# samples per worker, OpenCLIP's; encoded bytes: at ~70 kB (400-500 px JPEGs) ~350 MB per worker
SHUFFLE_BUFFER = 5_000
PREFETCH_BATCHES = 2  # per worker
SHARD_STALL_S = 120.0  # a shard that sends no byte for this long is skipped (curl retries for 60 s)
# bad-sample warnings: the first few, then at most one a minute per process
WARN_FIRST, WARN_EVERY_S = 5, 60
# for errors about data without samples
NAMING = f"(a sample is tar members KEY.{'|'.join(IMAGE_EXTS)} + KEY.txt)"


# --------------------------------------------------------------------------------------------------
# one training batch, top to bottom: the loader and its position in the epoch -> a rank's stream of
# batches -> its share of the shards, shuffled -> one tar shard's files -> a decoded, cropped image
# and its caption -> uint8 tensors, normalised on the device
def make_train_loader(pattern, batch_size, num_samples, image_size, tokenizer, workers=4, seed=0,
                      rank=0, world_size=1, scale=(0.9, 1.0), resampled=False):
    """This rank's TrainLoader, with `num_batches` per epoch (num_samples // (batch_size *
    world_size), the same on every rank); call set_epoch(epoch) before each epoch."""
    urls = check_train_data(pattern)
    stream = TrainStream(urls, batch_size, num_samples // (batch_size * world_size), image_size,
                         tokenizer, tuple(scale), seed, rank, world_size, resampled, workers)
    return TrainLoader(stream, workers)


class TrainLoader:
    """The DataLoader over a rank's TrainStream, and where in the epoch it is: the batches taken
    and the samples each worker's stream read for them (good and bad), which is all a checkpoint
    needs to resume in the middle of an epoch (position, then set_epoch(epoch, position))."""

    def __init__(self, stream, workers):
        self.stream, self.workers, self.num_batches = stream, workers, stream.num_batches
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers,
                                 persistent_workers=workers > 0,
                                 pin_memory=torch.cuda.is_available(),
                                 prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)
        self.set_epoch(0)

    def set_epoch(self, epoch, position=None):
        """Before each epoch; a position from a checkpoint continues that epoch where it stopped."""
        position = position or {"batches": 0, "read": [0] * max(1, self.workers)}
        if len(position["read"]) != max(1, self.workers):
            raise ValueError(f"the checkpoint stopped mid-epoch with {len(position['read'])} "
                             f"dataloader workers per rank; resume it with --workers "
                             f"{len(position['read'])} (each worker's stream is its own)")
        self.epoch, self.batches, self.read = epoch, position["batches"], list(position["read"])
        self.stream.set_epoch(epoch, self.batches, self.read)

    def position(self):
        return {"epoch": self.epoch, "batches": self.batches, "read": list(self.read)}

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for images, tokens, skipped in self.loader:
            self.read[self.batches % len(self.read)] += len(images) + int(skipped)
            self.batches += 1
            yield images, tokens, skipped


class TrainStream(IterableDataset):
    """One rank's batches of an epoch: (images (B, 3, S, S) uint8, tokens (B, T), skipped), skipped
    (a 0-d long tensor) counting the bad samples this worker passed over for the batch.

    Each epoch reads the shards in a fresh order, a permutation drawn from (seed, epoch) and so the
    same on every rank, split between all ranks' dataloader workers without overlap (split_samples);
    resampled: each worker draws shards with replacement instead. Every worker makes a fixed number
    of whole batches (DDP needs as many steps on every rank), so batches differ with the number of
    workers. Batch i of the epoch is made by worker i % W (the DataLoader takes them in turn); its
    stream (shard order, shuffle) is a function of (seed, epoch, rank, worker), and the crop of the
    n-th sample it reads is drawn from (that, n). So a run resumed in the middle of an epoch (from
    set_epoch's position) reads past what each worker had read, without decoding it, and then sees
    exactly what the uninterrupted run saw."""

    def __init__(self, urls, batch_size, num_batches, image_size, tokenizer, scale, seed, rank,
                 world_size, resampled, workers):
        self.urls, self.batch_size, self.num_batches = urls, batch_size, num_batches
        self.image_size, self.tokenizer, self.scale, self.seed = image_size, tokenizer, scale, seed
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        # shared memory, so that persistent workers see set_epoch: the epoch, the batches of it
        # already trained on, and the samples each worker's stream had read for them
        self.epoch, self.start = multiprocessing.Value("i", 0), multiprocessing.Value("q", 0)
        self.read_before = multiprocessing.Array("q", max(1, workers))

    def set_epoch(self, epoch, start=0, read_before=()):
        self.epoch.value, self.start.value = epoch, start
        for role, count in enumerate(read_before):
            self.read_before[role] = count

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        worker, num_workers = worker_split()
        epoch, start, n = self.epoch.value, self.start.value, self.num_batches
        role = (start + worker) % num_workers  # the stream of batch start + worker, start + ...
        stream_seed = derived_seed(self.seed, epoch, self.rank, role)
        rng = random.Random(stream_seed)  # shard order and shuffle; crops have their own
        transform = train_transform(self.image_size, self.scale)
        if self.resampled:
            samples = shuffled(resampled_samples(self.urls, rng), SHUFFLE_BUFFER, rng)
        else:
            shard_rng = random.Random(derived_seed(self.seed, "shards", epoch))
            order = shard_rng.sample(self.urls, len(self.urls))
            samples = shuffled_passes(order, self.rank * num_workers + role,
                                      self.world_size * num_workers, rng)
        read = self.read_before[role] if start else 0
        for _ in range(read):  # resuming mid-epoch: tar bytes only, nothing decoded
            next(samples)
        # the batches i >= start with i % W == role: its share of n, less those made before
        made = start // num_workers + (role < start % num_workers)
        for _ in range(n // num_workers + (role < n % num_workers) - made):
            batch = self.next_batch(samples, transform, f"{stream_seed}/", read, epoch)
            read += len(batch[0]) + int(batch[2])
            yield batch

    def next_batch(self, samples, transform, crop_seed, read, epoch):
        """A batch from the stream; the crop of the stream's n-th sample is drawn from crop_seed + n
        (`read` samples were read before this batch), its caption by one_caption."""
        images, captions, skipped = [], [], 0
        while len(images) < self.batch_size:
            sample, n = next(samples), read + len(images) + skipped
            crop = functools.partial(transform, rng=random.Random(f"{crop_seed}{n}"))
            decoded = None if sample is None else decode_sample(sample, crop)
            if decoded is None:
                skipped += 1
                # everything is bad: fail instead of spinning forever
                if skipped > 100 * self.batch_size + 1000:
                    raise RuntimeError(f"data.py: {skipped} bad samples while making one batch "
                                       f"from {self.urls[0]} ...: is the training data readable?")
                continue
            images.append(decoded[0])
            captions.append(one_caption(decoded[1], self.seed, epoch, sample["__key__"]))
        return torch.stack(images), self.tokenizer(captions), torch.tensor(skipped)


def one_caption(text, seed, epoch, key):
    """A sample's caption for this epoch: one line of a caption file that has several (Flickr and
    COCO have five per image), drawn from (seed, epoch, sample key), so that every epoch may see
    another one and a resumed run draws what the uninterrupted one drew. Retrieval evaluation
    keeps them all."""
    lines = [line for line in text.splitlines() if line.strip()]
    return text if len(lines) == 1 else lines[derived_seed(seed, "caption", epoch, key) % len(lines)]


def shuffled_passes(urls, part, parts, rng):
    """This part's samples of `urls` (split_samples), shuffled, pass after pass: a part whose share
    runs out before its quota of batches reads it again, through a fresh shuffle (OpenCLIP's
    with_epoch does the same)."""
    while True:
        found = 0
        for sample in shuffled(split_samples(urls, part, parts), SHUFFLE_BUFFER, rng):
            found += sample is not None
            yield sample
        if not found:  # reading the same nothing again would spin forever
            raise ValueError(f"data.py: no sample in part {part} of {parts} (one per rank and "
                             f"worker) of the {len(urls)} training shards, e.g. "
                             f"{urls[part % len(urls)]} {NAMING}; --dataset-resampled reads all")


def split_samples(urls, part, parts):
    """The samples of `urls`, in order, that belong to part `part` of `parts` (one dataloader worker
    of one rank), none in two parts: whole shards (part, part + parts, ...) when there are enough,
    else every parts-th sample (each part then reads every shard and keeps its own)."""
    by_shard = len(urls) >= parts
    mine = urls[part::parts] if by_shard else urls
    samples = (sample for url in mine for sample in read_shard(url))
    for index, sample in enumerate(samples):
        if by_shard or index % parts == part:
            yield sample


def shuffled(samples, buffer_size, rng):
    """Shuffle a stream through a buffer of buffer_size samples; None (bad-sample markers) pass
    straight through."""
    buffer = []
    for sample in samples:
        if sample is None:
            yield None
        elif len(buffer) < buffer_size:
            buffer.append(sample)
        else:
            i = rng.randrange(buffer_size)
            yield buffer[i]
            buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def read_shard(url):
    """The samples of one tar shard, in file order: {"__key__": key, ext: bytes}, files grouped by
    key as webdataset does ("a/b.c.jpg" -> key "a/b", ext "c.jpg"). A local path or any URL
    webdataset's gopen opens. A tar that is truncated, corrupt, fails to open or stalls ends early
    with a None (counted as a bad sample)."""
    sample, stream = None, None
    try:
        stream = wds.gopen(url, "rb")
        if getattr(stream, "proc", None) is not None:  # a pipe (pipe:, curl for http): can hang
            stream = StallGuard(url, stream)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # streaming: never seeks
            for member in tar:
                # streaming mode would otherwise keep every header of the shard in memory
                tar.members = []
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                # a new key: the previous sample is whole
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                sample[ext.lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        warn_bad(f"the rest of shard {url}", e)
        yield None
    finally:
        if stream is not None:
            stream.close()


def decode_sample(sample, transform):
    """{"jpg": bytes, "txt": bytes, ...} -> (image tensor, caption), or None (warned) for a bad
    sample."""
    try:
        if "txt" not in sample:
            raise BadSample("no caption (.txt)")
        caption = sample["txt"].decode("utf-8").strip()
        if not caption:
            raise BadSample("empty caption")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample(f"no image (.{'/.'.join(IMAGE_EXTS)})")
        return transform(open_image(sample[ext])), caption
    # anything a broken file can raise inside PIL: never stop a run for one sample
    except Exception as e:
        warn_bad(f"sample {sample.get('__key__')}", e)
        return None


class BadSample(ValueError):
    pass


def open_image(data):
    """Encoded bytes -> lazily decoded PIL image; a decompression bomb (more than MAX_IMAGE_PIXELS)
    is a BadSample."""
    with warnings.catch_warnings():
        # we enforce our own limit just below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise BadSample(f"{img.width}x{img.height} image is over the {MAX_IMAGE_PIXELS} "
                        "pixel limit")
    return img


def train_transform(image_size, scale=(0.9, 1.0), generator=None):
    """transform(PIL image, rng=generator) -> (3, S, S) uint8: random resized crop (OpenCLIP's
    default scale (0.9, 1); FLIP used (0.5, 1)), bicubic, RGB, drawn with `rng`, a `random.Random`
    (default: `generator`, else the global one); the loader seeds one per sample. The photo is
    turned upright first as its EXIF orientation says, and 16-bit images are scaled to 8 bits
    (`to_rgb`).

    Not normalised here: train.py normalises whole batches on the GPU (`normalize`), so that the
    dataloader workers convert, stack, share and pin a quarter of the bytes (uint8, not float32):
    20-26% more images/s (docs/speed.md#data-pipelines).

    Fast path: a big JPEG is decoded at 1/2, 1/4 or 1/8 size by libjpeg (`draft`) when the crop
    still has >= S pixels per side, and `resize(box=...)` resamples straight from the crop region
    without copying it out first."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    def transform(img, rng=None):
        rng = rng or generator or random
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # a phone photo stored sideways
            img = ImageOps.exif_transpose(img)  # decodes it whole: no draft for these few
        width, height = img.size
        left, top, w, h = random_resized_crop_box(width, height, scale, rng)
        drafted = img.draft("RGB", (math.ceil(width * image_size / w),
                                    math.ceil(height * image_size / h)))
        # draft box = the whole image in the reduced image's pixels
        f = drafted[1][2] / width if drafted else 1.0
        img = to_rgb(img)
        box = (left * f, top * f, min((left + w) * f, img.width), min((top + h) * f, img.height))
        return to_uint8_tensor(img.resize((image_size, image_size), Image.BICUBIC, box=box))

    return transform


def random_resized_crop_box(width, height, scale, rng, ratio=CROP_RATIO):
    """(left, top, w, h) of a crop covering `scale` of the area with an aspect ratio in `ratio`:
    torchvision's RandomResizedCrop rule (10 tries, then the largest centred crop within
    `ratio`)."""
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_rgb(img):
    """Any PIL image -> 8-bit RGB. 16-bit grey ("I;16", or "I" with 16-bit values, as Pillow reads
    16-bit PNGs) is scaled to 8 bits, where convert("RGB") would clip it to white; palette, grey,
    alpha and CMYK images are converted as OpenCLIP converts them (alpha dropped). A mode with no
    meaningful 8-bit form (32-bit integer or float pixels) is a BadSample: skipped and counted."""
    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.asarray(img, dtype=np.int64)  # (H, W)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise BadSample(f"{img.mode} image with values outside 16 bits")
        img = Image.fromarray((pixels >> 8).astype(np.uint8))  # the high byte: 16 -> 8 bits
    elif img.mode == "F":
        raise BadSample("floating-point (mode F) image: no 8-bit RGB form to train on")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_uint8_tensor(img):
    """RGB PIL image -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


MEAN_CHW, STD_CHW = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)


@functools.cache
def mean_std_on(device):
    """OPENAI_MEAN and OPENAI_STD as (3, 1, 1) tensors on `device`, copied there once: a blocking
    copy per batch would make the host wait for the GPU at every step."""
    return MEAN_CHW.to(device), STD_CHW.to(device)


def normalize(images):
    """uint8 (..., 3, H, W) -> float32 on the same device, exactly as torchvision's ToTensor then
    Normalize(OPENAI_MEAN, OPENAI_STD)."""
    mean, std = mean_std_on(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------------
# what a first reading can skip: stream seeds and worker shares, shards drawn with replacement,
# shard lists and object storage (URLs, stalled pipes), the first-sample check, worker counts,
# bad-sample warnings, captions for a tokenizer
def derived_seed(*parts):
    """A 63-bit seed from any values, e.g. (seed, "masks", epoch, rank): the same in every process,
    on every machine (unlike hash() of a str), and unrelated for neighbouring inputs (unlike seed +
    epoch)."""
    digest = hashlib.sha256("/".join(map(repr, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def worker_split():
    """(this dataloader worker's index, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def resampled_samples(urls, rng):
    """Shards drawn with replacement, forever (OpenCLIP's --dataset-resampled), read one after
    another."""
    draws_since_sample = 0
    # 20n draws missing the one good shard of n: probability e^-20
    while draws_since_sample <= 20 * len(urls):
        draws_since_sample += 1
        for sample in read_shard(rng.choice(urls)):
            if sample is not None:
                draws_since_sample = 0
            yield sample
    raise ValueError(f"data.py: {draws_since_sample} shards drawn from {urls[0]} ... "
                     f"without a sample {NAMING}")


def expand_urls(pattern):
    """Shards from brace patterns (`/data/cc12m-{0000..2175}.tar`), several joined with `::` (as
    OpenCLIP), or a folder of .tar files. Local paths must exist (FileNotFoundError when a pattern
    matches none; a missing few are a warning); URLs (`pipe:aws s3 cp s3://b/x-{0..9}.tar -`,
    `https://...`) are taken as they are: they are opened, and checked, when read."""
    urls = []
    for part in str(pattern).split("::"):
        if os.path.isdir(part):
            found = sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith(".tar"))
            candidates = found
        else:
            candidates = wds.shardlists.expand_urls(part)  # brace expansion
            found = [u for u in candidates if is_url(u) or os.path.isfile(u)]
        if not found:
            folder = os.path.dirname(candidates[0]) if candidates else part
            why = ("no such directory" if folder and not os.path.isdir(folder)
                   else "no matching file")
            raise FileNotFoundError(f"training data {part}: {why} ({folder or '.'})")
        if len(found) < len(candidates):
            missing = next(u for u in candidates if u not in found)
            print(f"data.py: warning: {len(candidates) - len(found)} of {len(candidates)} shards "
                  f"of {part} are missing (e.g. {missing}); using the other {len(found)}",
                  file=sys.stderr)
        urls += found
    return urls


def is_url(path):
    """Whether a shard is opened by webdataset's gopen rather than as a local file: pipe:CMD,
    http(s)://, and the other schemes gopen knows (file: and plain paths are local)."""
    return re.match(r"^[a-z][a-z0-9+.-]*:", path) is not None and not path.startswith("file:")


class StallGuard:
    """A shard's byte stream from a subprocess (webdataset's gopen of a pipe: or http(s) URL, run
    through curl), whose reads give up with a TimeoutError when no byte comes for SHARD_STALL_S
    seconds (a pipe or download that hangs): the shard is then skipped and counted, not waited
    for. read_shard reads local files as they are."""

    def __init__(self, url, stream):
        self.url, self.stream, self.pipe = url, stream, stream.proc

    def read(self, size=-1):
        fd = self.stream.stream.fileno()
        ready, _, _ = select.select([fd], [], [], SHARD_STALL_S)
        if not ready:
            raise TimeoutError(f"no data for {SHARD_STALL_S:g} s")
        chunk = os.read(fd, size if size > 0 else 1 << 20)  # what is there, as a raw read
        if not chunk and (status := self.pipe.wait(SHARD_STALL_S)):  # the end: did it fail?
            raise OSError(f"{self.url} exited with status {status}")
        return chunk

    def close(self):
        if self.pipe.poll() is None:
            self.pipe.kill()  # stalled, or we stopped reading early
        try:
            self.stream.close()
        except OSError:  # the exit status of a command we stopped
            pass


def check_train_data(pattern):
    """The shards of `pattern`, once one of their samples decodes (shards are read in order up to
    the first good sample: a moment on good data); a one-line ValueError when none does, before
    any worker starts."""
    urls = expand_urls(pattern)
    for url in urls:
        for sample in read_shard(url):
            if sample is not None and decode_sample(sample, lambda img: img.load()) is not None:
                return urls
    raise ValueError(f"training data {pattern}: no readable sample in its {len(urls)} shards "
                     f"{NAMING}")


def default_workers(on_gpu, ranks_here=1):
    """Dataloader workers per rank (training) or process (evaluation). On GPUs, every core but one
    per rank (ranks_here: the ranks on this machine): at FLIP's step rates, and in an ImageNet
    pass, JPEG decoding is the bottleneck (a worker makes ~400 images/s; a masked ViT-B/16 step
    consumes thousands). On the CPU, one: the model needs the cores itself."""
    if not on_gpu:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // ranks_here - 1)


_bad = {"count": 0, "last_warning": -math.inf}


def warn_bad(what, error):
    """One line per bad sample for the first WARN_FIRST, then at most one every WARN_EVERY_S seconds
    (per process)."""
    _bad["count"] += 1
    now = time.monotonic()
    if _bad["count"] <= WARN_FIRST or now - _bad["last_warning"] >= WARN_EVERY_S:
        _bad["last_warning"] = now
        reason = " ".join(str(error).split())[:200]
        later = "; further warnings at most once a minute" if _bad["count"] == WARN_FIRST else ""
        print(f"data.py: warning: skipped {what}: {type(error).__name__}: {reason} "
              f"({_bad['count']} skipped in process {os.getpid()}{later})",
              file=sys.stderr, flush=True)


def read_captions(pattern, max_captions=100_000):
    """Up to max_captions captions from the shards, in order (to train a tokenizer on); ValueError
    if there are none."""
    captions, urls = [], expand_urls(pattern)
    for url in urls:
        for sample in read_shard(url):
            try:
                text = sample["txt"].decode("utf-8")
            # None (broken tar), no caption, not UTF-8
            except (TypeError, KeyError, UnicodeDecodeError):
                continue
            captions += [line.strip() for line in text.splitlines() if line.strip()]  # one a line
            if len(captions) >= max_captions:
                return captions[:max_captions]
    if not captions:
        raise ValueError(f"training data {pattern}: no captions in its {len(urls)} shards {NAMING}")
    return captions


# --------------------------------------------------------------------------------------------------
# evaluation data: the eval transform, class folders, image-caption shards
def eval_transform(image_size):
    """PIL image (any mode) -> (3, S, S) float32, numerically equal to OpenCLIP's validation
    preprocessing: `eval_crop`, then ToTensor and Normalize."""
    crop = eval_crop(image_size)
    return lambda img: normalize(crop(img))


def eval_crop(image_size):
    """PIL image (any mode) -> (3, S, S) uint8: OpenCLIP's validation preprocessing up to the
    normalisation, Resize(S, bicubic), CenterCrop(S), convert("RGB"), in that order (torchvision
    hands PIL images to PIL's resize). eval.py's loaders use it and normalise whole batches on the
    device, as training does: a quarter of the bytes to convert, share and pin
    (docs/speed.md#data-pipelines)."""

    def transform(img):
        w, h = shortest_side_size(*img.size, image_size)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.BICUBIC)
        # CenterCrop's rounding
        top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
        cropped = img.crop((left, top, left + image_size, top + image_size))
        return to_uint8_tensor(cropped.convert("RGB"))

    return transform


def shortest_side_size(width, height, size):
    """(w, h) with the shortest side resized to `size`, by torchvision Resize(int)'s rule: int(size
    * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class ImageFolder(Dataset):
    """root/<class>/<image> -> (tensor, label, readable); classes are the sorted folder names
    (ImageNet: WordNet ids). An image that cannot be read is warned about and given as a blank
    mean-colour image with readable=False, so the dataset length and the accuracy's denominator stay
    the file count, and the caller can count the stand-ins: a flag per item travels with the batch
    out of dataloader workers, where a counter kept in the dataset would stay behind."""

    def __init__(self, root, transform):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root}: no such directory")
        self.root, self.transform = root, transform
        self.classes = sorted(e.name for e in os.scandir(root)
                              if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"image folder {root} has no class folders "
                             f"(expected {root}/<class>/<image>)")
        self.samples = [(os.path.join(d, f), label) for label, c in enumerate(self.classes)
                        for d, _, files in sorted(os.walk(os.path.join(root, c)))
                        for f in sorted(files) if f.rsplit(".", 1)[-1].lower() in FOLDER_IMAGE_EXTS]
        if not self.samples:
            raise ValueError(f"image folder {root} has class folders but no images")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                return self.transform(open_image(f.read())), label, True
        except Exception as e:
            warn_bad(path, e)
            blank = Image.new("RGB", (32, 32), tuple(round(255 * m) for m in OPENAI_MEAN))
            return self.transform(blank), label, False


class ImageTextDataset(IterableDataset):
    """(image tensor, caption) from shards, one ordered pass, no resampling (for retrieval), split
    without duplicates across ranks and dataloader workers (split_samples). `skipped` counts bad
    samples (workers=0; workers print theirs)."""

    def __init__(self, urls, transform, rank=0, world_size=1):
        self.urls, self.transform, self.rank, self.world_size = urls, transform, rank, world_size
        self.skipped = 0  # bad samples of the last pass (in this process)

    def __iter__(self):
        worker, num_workers = worker_split()
        part, parts = self.rank * num_workers + worker, self.world_size * num_workers
        self.skipped = 0
        for sample in split_samples(self.urls, part, parts):
            decoded = None if sample is None else decode_sample(sample, self.transform)
            if decoded is None:
                self.skipped += 1
            else:
                yield decoded
        if self.skipped:
            print(f"data.py: {self.skipped} bad samples skipped (part {part} of {parts})",
                  file=sys.stderr)


def image_text_dataset(pattern, transform, rank=0, world_size=1):
    return ImageTextDataset(expand_urls(pattern), transform, rank, world_size)


# --------------------------------------------------------------------------------------------------
# flags (every script's parser and argparse types) and the command line: convert
class OneLineParser(argparse.ArgumentParser):
    """argparse for every script here: a wrong flag is one clear line and exit status 2, not a usage
    wall. A `checked` type's complaint reads "--flag must be ..."."""

    def error(self, message):
        message = re.sub(r"^argument (--[\w-]+): ", r"\1 ", message)  # "--flag must be ..."
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def existing(kind, allowed=()):
    """An argparse type: a path to an existing file or directory (`kind`), or one of `allowed`; else
    the error "PATH: no such file"."""
    def parse(text):
        if text not in allowed and not (os.path.isfile if kind == "file" else os.path.isdir)(text):
            raise argparse.ArgumentTypeError(f"{text}: no such {kind}")
        return text

    return parse


def folder_to_make(text):
    """An argparse type: a folder that is there or can be made (no file on its way)."""
    existing = os.path.abspath(text)
    while not os.path.exists(existing):  # the nearest part of the path that exists: a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a folder")
    return text


def checked(kind, ok, allowed):
    """An argparse type: kind(text) where ok(value), else the error "must be {allowed}, got {text}".
    E.g. checked(int, lambda v: v >= 1, ">= 1") for a count."""
    def parse(text):
        value = kind(text)  # a ValueError here is argparse's own "invalid int value"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def convert(src, out, template="a photo of a {}.", shard_size=1000, seed=0, captions=None,
            files=None, img_key="filepath", caption_key="title", separator=None):
    """Images and their captions -> shuffled webdataset shards out/shard-NNNNN.tar; returns the
    shard pattern. The captions come from, in this order:
    - `captions`, a .tsv or .csv file with a header (OpenCLIP's CSV): the image path (relative to
      src) in column `img_key`, a caption in column `caption_key`; the rows of one image make one
      sample with all its captions, one a line (training draws one per epoch, retrieval keeps all);
    - KEY.txt beside KEY.jpg in src;
    - class folders src/<class>/.../<image>: `template` with the class name (+ classnames.txt).
    files: a list, one image path relative to src a line (a split such as Flickr8k's
    split_train.txt or Caltech-101's train.txt): only those images. A missing image, an image that
    does not decode, an empty caption or a row that does not parse is skipped, counted and named."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory")
    skipped = {}  # why -> how many

    def skip(what, why, detail=""):
        warn_bad(what, BadSample(why + detail))
        skipped[why] = skipped.get(why, 0) + 1

    if captions:
        texts = caption_file(captions, img_key, caption_key, separator, skip)
    else:
        texts = folder_captions(src, template)
    # class folders: every value None (the caption is the class name's)
    classes = sorted({p.split("/")[0] for p in texts}) if texts and not any(texts.values()) \
        else None
    if files:  # a split: its paths, in its order
        listed = [relative(line) for line in read_text(files).splitlines() if line.strip()]
        texts = {path: texts.get(path) for path in listed}
    if not texts:
        raise FileNotFoundError(f"{src}: no images with KEY.txt captions and no class folders "
                                "of images" if not captions else f"{captions}: no rows")
    paths = list(texts)
    random.Random(seed).shuffle(paths)  # class folders would otherwise give one-class shards
    os.makedirs(out, exist_ok=True)
    written, tar = 0, None
    for path in paths:
        if classes is not None:  # class folders: the caption is the class name's
            text = template.format(path.split("/")[0].replace("_", " "))
        else:
            text = "\n".join(texts[path] or [])
        blob = image_bytes(os.path.join(src, path), skip)
        if blob is None:
            continue
        if not text:
            skip(path, "no caption")
            continue
        if written % shard_size == 0:
            if tar:
                tar.close()
            shard = os.path.join(out, f"shard-{written // shard_size:05d}.tar")
            tar = wds.TarWriter(shard, encoder=False)
        tar.write({"__key__": f"{written:09d}", blob[1]: blob[0], "txt": text.encode()})
        written += 1
    if tar:
        tar.close()
    if classes is not None:
        with open(os.path.join(out, "classnames.txt"), "w") as f:
            f.write("\n".join(c.replace("_", " ") for c in classes) + "\n")
    pattern = os.path.join(out, "shard-{00000..%05d}.tar" % (max(written - 1, 0) // shard_size))
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    print(f"data.py: wrote {written} samples ({sum(skipped.values())} skipped"
          + (f": {why}" if why else "") + f") to {pattern}")
    return pattern


def folder_captions(src, template):
    """{image path relative to src ('/'-separated): [its KEY.txt caption] or [] where it has none}
    for a captioned folder; {path: None} for class folders (the caption comes from the class)."""
    images = sorted(os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
                    for d, _, fs in os.walk(src) for f in fs
                    if f.rsplit(".", 1)[-1].lower() in FOLDER_IMAGE_EXTS)
    txt = {p: os.path.join(src, os.path.splitext(p)[0] + ".txt") for p in images}
    if any(os.path.isfile(t) for t in txt.values()):
        return {p: [read_text(t).strip()] if os.path.isfile(t) else [] for p, t in txt.items()}
    return {p: None for p in images if "/" in p}  # class folders: src/<class>/.../<image>


def caption_file(path, img_key, caption_key, separator, skip):
    """{image path: [captions]} from a captions file with a header, the rows of one image gathered
    in file order; separator: tab for .tsv (no quoting, as TSV has none), else a comma (CSV
    quoting). A row that does not parse or has an empty caption goes to skip(what, why)."""
    separator = separator or ("\t" if path.lower().endswith(".tsv") else ",")
    quoting = csv.QUOTE_NONE if separator == "\t" else csv.QUOTE_MINIMAL
    texts = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f, delimiter=separator, quoting=quoting)
        header = next(rows, [])
        if img_key not in header or caption_key not in header:
            raise ValueError(f"{path}: its header {separator.join(header)!r} has no column "
                             f"{img_key!r} (--csv-img-key) or {caption_key!r} (--csv-caption-key)")
        i, j = header.index(img_key), header.index(caption_key)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as e:
                skip(f"row {rows.line_num} of {path}", "row that does not parse", f" ({e})")
                continue
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                skip(f"row {rows.line_num} of {path}", "row that does not parse",
                     f" ({len(row)} fields, the header has {len(header)})")
            elif not row[j].strip():
                skip(f"row {rows.line_num} of {path} ({row[i]})", "empty caption")
            else:
                texts.setdefault(relative(row[i]), []).append(" ".join(row[j].split()))
    return texts


def relative(path):
    """A path relative to convert's src as the dictionaries key it: normalised, '/'-separated."""
    return os.path.normpath(path.strip()).replace(os.sep, "/")


def image_bytes(path, skip):
    """(the file's bytes, their extension) once they decode; bmp, gif and tiff re-encoded as PNG
    (lossless); None, skipped, for a missing file or one that does not decode."""
    ext = path.rsplit(".", 1)[-1].lower()
    try:
        with open(path, "rb") as f:
            blob = f.read()
        open_image(blob).load()  # check that it decodes; the shard keeps the original bytes
        if ext not in IMAGE_EXTS:
            buf = io.BytesIO()
            open_image(blob).convert("RGB").save(buf, "PNG")
            blob, ext = buf.getvalue(), "png"
        return blob, ext
    except FileNotFoundError:
        skip(path, "missing image")
    except Exception as e:  # anything a broken file raises inside PIL
        skip(path, "image that does not decode", f" ({type(e).__name__}: {e})")
    return None


def main(argv=None):
    parser = OneLineParser(prog="data.py", description=__doc__.strip().split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help="a folder of images + captions, or class folders, "
                            "-> webdataset shards")
    p.add_argument("src", help="folder of the images: KEY.jpg + KEY.txt, one folder of images per "
                   "class, or the images a --captions file names")
    p.add_argument("out", help="output folder for shard-NNNNN.tar")
    p.add_argument("--captions", type=existing("file"), help="a .tsv or .csv file with a header: "
                   "image path (relative to SRC) and caption per row, several rows an image")
    p.add_argument("--csv-img-key", default="filepath", help="--captions' image column "
                   "(OpenCLIP's flag and default)")
    p.add_argument("--csv-caption-key", default="title", help="--captions' caption column "
                   "(OpenCLIP's flag and default)")
    p.add_argument("--csv-separator", help="--captions' separator (default: tab for .tsv, else a "
                   "comma)")
    p.add_argument("--files", type=existing("file"), help="only the images this list names, one "
                   "path relative to SRC a line (a split: train.txt, split_test.txt)")
    p.add_argument("--template", default="a photo of a {}.",
                   help="caption for class folders; {} = the class name")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, args.template, args.shard_size, captions=args.captions,
                files=args.files, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                separator=args.csv_separator)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"data.py: error: {e}")


if __name__ == "__main__":
    main()
