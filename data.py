"""
Everything that turns files into tensors: webdataset shards -> (images, token ids) batches, the train and eval image
transforms, CLIP's tokenizer, ImageFolder, and the built-in "photographer" dataset that runs when no data is given.

    tok = load_tokenizer("bpe_simple_vocab_16e6.txt.gz")          # ids equal to OpenCLIP's on English text
    loader = make_train_loader("/data/cc12m/cc12m-train-{0000..2175}.tar", batch_size=256,
                               num_samples=10_968_539, image_size=224, tokenizer=tok, workers=6)
    for images, tokens, skipped in loader:                         # (B, 3, 224, 224) uint8, (B, 77), bad ones skipped
        images = normalize(images.to("cuda"))                       # float, normalised on the GPU

Shards are img2dataset / webdataset tars: `KEY.jpg|jpeg|png|webp` next to `KEY.txt`. A bad sample (corrupt or truncated
image, non-image, missing / empty / non-UTF-8 caption, truncated tar, decompression-bomb-sized image) is skipped,
counted and reported in a rate-limited warning: it never stops a run.

    python data.py builtin [--layout uniform|edge]     # generate (once, cached) the built-in dataset, print its paths
    python data.py convert SRC OUT [--template ...]    # a folder of KEY.jpg + KEY.txt, or class folders, -> shards
    python data.py bench [--workers 2]                 # images/s of the training and evaluation pipelines

The built-in dataset lives in $GDMFLIP_DATA or ~/.cache/gdm-flip/, one folder per set of parameters; delete that folder
to regenerate it.
"""

import argparse
import functools
import gzip
import html
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
import zlib

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its threads and our forked dataloader workers don't mix

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from tokenizers import Regex, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image statistics, used by OpenCLIP too
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of torchvision's RandomResizedCrop, which OpenCLIP uses
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes
FOLDER_IMAGE_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")  # also read from image folders
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (1024 ** 3 // 4 // 3); larger is a bad sample
SHUFFLE_BUFFER = 2_000  # raw samples per worker (OpenCLIP: 5000); holds encoded bytes, ~100 MB for CC12M-sized JPEGs
PREFETCH_BATCHES = 2  # per worker
WARN_FIRST, WARN_EVERY_S = 5, 60  # bad-sample warnings: the first few, then at most one a minute per process


# ------------------------------------------------------------------------------------------------------ transforms
MEAN_CHW, STD_CHW = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)


def to_uint8_tensor(img):
    """RGB PIL image -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


@functools.cache
def mean_std_on(device):
    """OPENAI_MEAN and OPENAI_STD as (3, 1, 1) tensors on `device`, copied there once: a blocking copy per batch
    would make the host wait for the GPU at every step."""
    return MEAN_CHW.to(device), STD_CHW.to(device)


def normalize(images):
    """uint8 (..., 3, H, W) -> float32 on the same device, exactly as torchvision's ToTensor then
    Normalize(OPENAI_MEAN, OPENAI_STD)."""
    mean, std = mean_std_on(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


def random_resized_crop_box(width, height, scale, rng, ratio=CROP_RATIO):
    """(left, top, w, h) of a crop covering `scale` of the area with an aspect ratio in `ratio`: torchvision's
    RandomResizedCrop rule (10 tries, then the largest centred crop within `ratio`)."""
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


def train_transform(image_size, scale=(0.9, 1.0), generator=None):
    """PIL image -> (3, S, S) uint8: random resized crop (OpenCLIP's default scale (0.9, 1); FLIP used (0.5, 1)),
    bicubic, RGB. `generator`: a `random.Random` (default: the global one); the loader seeds one per worker, epoch.

    Not normalised here: train.py normalises whole batches on the GPU (`normalize`), so that the dataloader workers
    convert, stack, share and pin a quarter of the bytes (uint8, not float32): 20-26% more images/s (README).

    Fast path: a big JPEG is decoded at 1/2, 1/4 or 1/8 size by libjpeg (`draft`) when the crop still has >= S pixels
    per side, and `resize(box=...)` resamples straight from the crop region without copying it out first."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    rng = generator or random

    def transform(img):
        width, height = img.size
        left, top, w, h = random_resized_crop_box(width, height, scale, rng)
        drafted = img.draft("RGB", (math.ceil(width * image_size / w), math.ceil(height * image_size / h)))
        f = drafted[1][2] / width if drafted else 1.0  # draft box = the whole image in the reduced image's pixels
        if img.mode != "RGB":
            img = img.convert("RGB")
        box = (left * f, top * f, min((left + w) * f, img.width), min((top + h) * f, img.height))
        return to_uint8_tensor(img.resize((image_size, image_size), Image.BICUBIC, box=box))

    return transform


def shortest_side_size(width, height, size):
    """(w, h) with the shortest side resized to `size`, by torchvision Resize(int)'s rule: int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def eval_crop(image_size):
    """PIL image (any mode) -> (3, S, S) uint8: OpenCLIP's validation preprocessing up to the normalisation, Resize(S,
    bicubic), CenterCrop(S), convert("RGB"), in that order (torchvision hands PIL images to PIL's resize). eval.py's
    loaders use it and normalise whole batches on the device, as training does: a quarter of the bytes to convert,
    share and pin (README: Data)."""

    def transform(img):
        w, h = shortest_side_size(*img.size, image_size)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.BICUBIC)
        top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))  # CenterCrop's rounding
        return to_uint8_tensor(img.crop((left, top, left + image_size, top + image_size)).convert("RGB"))

    return transform


def eval_transform(image_size):
    """PIL image (any mode) -> (3, S, S) float32, numerically equal to OpenCLIP's validation preprocessing:
    `eval_crop`, then ToTensor and Normalize."""
    crop = eval_crop(image_size)
    return lambda img: normalize(crop(img))


# ------------------------------------------------------------------------------------------------------- tokenizer
SOT, EOT, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"
CLIP_NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP reads only the first 48894 merges of its BPE file: 49408 tokens in all
# CLIP's pre-split: contractions, runs of letters, single digits, runs of other non-space characters; spaces vanish
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
TRAINED_VOCAB_SIZE = 49408  # upper bound for a tokenizer trained by load_tokenizer(captions): CLIP's size


def byte_alphabet():
    """byte -> printable character (GPT-2's byte-level map), in CLIP's vocabulary order: printable Latin-1 first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class Tokenizer:
    """list of strings -> (B, context_length) LongTensor: [sot] + BPE(text) + [eot], cut to the context (still ending
    with eot), zero-padded. eot is the largest id, because the text tower pools at tokens.argmax(-1) as CLIP does.

    Wraps a HuggingFace `tokenizers.Tokenizer` that does CLIP's clean-up (NFC, whitespace, lower case), pre-split and
    byte-level BPE with `</w>` ending each word; the length rule lives in it too, so `to_json()` is the whole thing."""

    def __init__(self, hf, context_length=None):
        vocab = hf.get_vocab()
        if SOT not in vocab or EOT not in vocab:
            raise ValueError(f"tokenizer has no {SOT} / {EOT} tokens; CLIP-style tokenizers need both")
        self.sot, self.eot, self.vocab_size = vocab[SOT], vocab[EOT], max(vocab.values()) + 1
        if self.eot != self.vocab_size - 1:
            raise ValueError(f"{EOT} must have the largest id ({self.vocab_size - 1}), has {self.eot}")
        self.context_length = context_length or (hf.truncation or {}).get("max_length", 77)
        hf.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                          special_tokens=[(SOT, self.sot), (EOT, self.eot)])
        hf.enable_truncation(self.context_length)  # counts sot and eot: text keeps context_length - 2 tokens
        hf.enable_padding(length=self.context_length, pad_id=0, pad_token=hf.id_to_token(0))
        self.hf = hf

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        texts = [html.unescape(html.unescape(t)) for t in texts]  # as CLIP's basic_clean; `tokenizers` can't do this
        ids = [e.ids for e in self.hf.encode_batch(texts)]
        return torch.tensor(ids, dtype=torch.long).view(len(texts), self.context_length)

    def decode(self, ids):
        """Token ids -> the cleaned text, read between sot and the first eot (CLIP's decode)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot:
            ids = ids[1:ids.index(self.eot)] if self.eot in ids else ids[1:]
        byte_of = {c: b for b, c in byte_alphabet().items()}
        text = "".join(self.hf.id_to_token(i) for i in ids)
        return bytes(byte_of[c] for c in text).decode("utf-8", "replace").replace("</w>", " ").strip()

    def to_json(self):
        return self.hf.to_str()


def bpe_tokenizer(merges, pad=False):
    """HF tokenizer with CLIP's layout: ids = [<pad>] + 256 byte characters + the same with </w> + one token per merge
    + [sot, eot]. CLIP has no pad token (it pads with 0, the id of "!"); a tokenizer trained here reserves 0 for it."""
    chars = list(byte_alphabet().values())
    ids = {}
    for token in [PAD] * pad + chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]:
        ids.setdefault(token, len(ids))  # a learnt merge can rebuild an existing token: keep the first id
    hf = HFTokenizer(models.BPE(ids, [tuple(m) for m in merges], end_of_word_suffix="</w>", fuse_unk=False))
    hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Strip(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),  # keep the matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # bytes -> printable characters
    hf.add_special_tokens([SOT, EOT])
    return hf


def read_text(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def clip_bpe_merges(path):
    """The merges of a CLIP BPE vocabulary file (`bpe_simple_vocab_16e6.txt.gz`: a header line, then "a b" per line)."""
    lines = read_text(path).split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1] if line.strip()]


def train_tokenizer(captions, vocab_size=1024, context_length=77):
    """A BPE tokenizer learnt from captions (lower-cased, CLIP's pre-split, bytes, `</w>`), laid out like CLIP's:
    pad = 0, the 512 byte characters, up to vocab_size - 515 merges, then sot = vocab_size - 2, eot = vocab_size - 1.
    A small corpus may run out of merges first: the vocabulary is then smaller, and eot is still the largest id."""
    num_merges = vocab_size - 1 - 512 - 2
    if num_merges < 0:
        raise ValueError(f"vocab_size must be at least 515 (pad, 512 byte tokens, sot, eot), got {vocab_size}")
    learner = bpe_tokenizer([])  # same clean-up and pre-split as the final tokenizer
    trainer = trainers.BpeTrainer(vocab_size=512 + num_merges, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learner.train_from_iterator((html.unescape(html.unescape(c)) for c in captions), trainer)
    merges = json.loads(learner.to_str())["model"]["merges"][:num_merges]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]  # format differs by version
    return Tokenizer(bpe_tokenizer(merges, pad=True), context_length)


def load_tokenizer(spec, context_length=None):
    """A Tokenizer from: a CLIP BPE file (`bpe_simple_vocab_16e6.txt.gz`, ids as OpenCLIP's), a `tokenizer.json` or its
    text (`Tokenizer.to_json()`), or a captions file / folder of .txt files to train one on (one caption per line).
    context_length: default 77, or the one stored in a tokenizer.json."""
    if isinstance(spec, Tokenizer):
        spec = spec.to_json()
    spec = str(spec)
    if spec.lstrip().startswith("{"):
        return Tokenizer(HFTokenizer.from_str(spec), context_length)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"tokenizer {spec}: no such file or directory")
    if os.path.isfile(spec) and spec.endswith(".json"):
        return Tokenizer(HFTokenizer.from_file(spec), context_length)
    files = [spec] if os.path.isfile(spec) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.endswith(".txt"))
    texts = [read_text(path) for path in files]
    if os.path.isfile(spec) and (spec.endswith(".gz") or texts[0].startswith("#version")):
        return Tokenizer(bpe_tokenizer(clip_bpe_merges(spec)), context_length or 77)
    captions = [line for text in texts for line in text.splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"tokenizer {spec}: no captions to train a tokenizer on")
    return train_tokenizer(captions, TRAINED_VOCAB_SIZE, context_length or 77)


# ---------------------------------------------------------------------------------------------------------- shards
def expand_urls(pattern):
    """Shard paths from brace patterns (`/data/cc12m-{0000..2175}.tar`), several joined with `::` (as OpenCLIP), or a
    folder of .tar files. Raises FileNotFoundError when a pattern matches no file; missing shards are a warning."""
    urls = []
    for part in str(pattern).split("::"):
        if os.path.isdir(part):
            found = sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith(".tar"))
            candidates = found
        else:
            candidates = wds.shardlists.expand_urls(part)  # brace expansion
            found = [u for u in candidates if os.path.isfile(u)]
        if not found:
            folder = os.path.dirname(candidates[0]) if candidates else part
            why = "no such directory" if folder and not os.path.isdir(folder) else "no matching file"
            raise FileNotFoundError(f"training data {part}: {why} ({folder or '.'})")
        if len(found) < len(candidates):
            missing = next(u for u in candidates if not os.path.isfile(u))
            print(f"data.py: warning: {len(candidates) - len(found)} of {len(candidates)} shards of {part} are missing "
                  f"(e.g. {missing}); using the other {len(found)}", file=sys.stderr)
        urls += found
    return urls


def read_shard(path):
    """The samples of one tar shard, in file order: {"__key__": key, ext: bytes}, files grouped by key as webdataset
    does ("a/b.c.jpg" -> key "a/b", ext "c.jpg"). A tar that is truncated or corrupt ends early with a None."""
    sample = None
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: never seeks, reads each shard once
            for member in tar:
                tar.members = []  # streaming mode would otherwise keep every header of the shard in memory
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                if sample is not None and sample["__key__"] != key:  # a new key: the previous sample is whole
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                sample[ext.lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        warn_bad(f"the rest of shard {path}", e)
        yield None


class BadSample(ValueError):
    pass


def open_image(data):
    """Encoded bytes -> lazily decoded PIL image; a decompression bomb (more than MAX_IMAGE_PIXELS) is a BadSample."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we enforce our own limit just below
        img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise BadSample(f"{img.width}x{img.height} image is over the {MAX_IMAGE_PIXELS} pixel limit")
    return img


def decode_sample(sample, transform):
    """{"jpg": bytes, "txt": bytes, ...} -> (image tensor, caption), or None (warned) for a bad sample."""
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
    except Exception as e:  # anything a broken file can raise inside PIL: never stop a run for one sample
        warn_bad(f"sample {sample.get('__key__')}", e)
        return None


_bad = {"count": 0, "last_warning": -math.inf}


def warn_bad(what, error):
    """One line per bad sample for the first WARN_FIRST, then at most one every WARN_EVERY_S seconds (per process)."""
    _bad["count"] += 1
    now = time.monotonic()
    if _bad["count"] <= WARN_FIRST or now - _bad["last_warning"] >= WARN_EVERY_S:
        _bad["last_warning"] = now
        reason = " ".join(str(error).split())[:200]
        later = "; further warnings at most once a minute" if _bad["count"] == WARN_FIRST else ""
        print(f"data.py: warning: skipped {what}: {type(error).__name__}: {reason} "
              f"({_bad['count']} skipped in process {os.getpid()}{later})", file=sys.stderr, flush=True)


def read_captions(pattern, max_captions=100_000):
    """Up to max_captions captions from the shards, in order (to train a tokenizer on)."""
    captions = []
    for url in expand_urls(pattern):
        for sample in read_shard(url):
            try:
                caption = sample["txt"].decode("utf-8").strip()
            except (TypeError, KeyError, UnicodeDecodeError):  # None (broken tar), no caption, not UTF-8
                continue
            if caption:
                captions.append(caption)
            if len(captions) >= max_captions:
                return captions
    return captions


# ----------------------------------------------------------------------------------------------------- train loader
def worker_split():
    """(this dataloader worker's index, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def resampled_samples(urls, rng):
    """Shards drawn with replacement, forever (OpenCLIP's --dataset-resampled), read one after another."""
    while True:
        yield from read_shard(rng.choice(urls))


def shuffled(samples, buffer_size, rng):
    """Shuffle a stream through a buffer of buffer_size samples; None (bad-sample markers) pass straight through."""
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


class TrainStream(IterableDataset):
    """Yields this rank's batches of one epoch: (images (B, 3, S, S) uint8, tokens (B, T), skipped), skipped (a 0-d long
    tensor) counts the bad samples this worker passed over since its previous batch. The stream (shard draws, shuffle,
    crops) is a function of (seed, epoch, rank, worker) only, so a run resumed at an epoch boundary sees what an
    uninterrupted one saw; each worker makes whole batches, so batches differ with the number of workers."""

    def __init__(self, urls, batch_size, num_batches, image_size, tokenizer, scale, seed, rank):
        self.urls, self.batch_size, self.num_batches = urls, batch_size, num_batches
        self.image_size, self.tokenizer, self.scale, self.seed, self.rank = image_size, tokenizer, scale, seed, rank
        self.epoch = multiprocessing.Value("i", 0)  # shared memory: persistent workers see set_epoch

    def __iter__(self):
        worker, num_workers = worker_split()
        rng = random.Random(f"{self.seed}/{self.epoch.value}/{self.rank}/{worker}")  # str seeds hash the same anywhere
        transform = train_transform(self.image_size, self.scale, generator=rng)
        samples = shuffled(resampled_samples(self.urls, rng), SHUFFLE_BUFFER, rng)
        my_batches = self.num_batches // num_workers + (worker < self.num_batches % num_workers)  # sums to num_batches
        for _ in range(my_batches):
            yield self.next_batch(samples, transform)

    def next_batch(self, samples, transform):
        images, captions, skipped = [], [], 0
        while len(images) < self.batch_size:
            sample = next(samples)
            decoded = None if sample is None else decode_sample(sample, transform)
            if decoded is None:
                skipped += 1
                if skipped > 100 * self.batch_size + 1000:  # everything is bad: fail instead of spinning forever
                    raise RuntimeError(f"data.py: {skipped} bad samples while making one batch from {self.urls[0]} "
                                       "...: is the training data readable?")
                continue
            images.append(decoded[0])
            captions.append(decoded[1])
        return torch.stack(images), self.tokenizer(captions), torch.tensor(skipped)


class TrainLoader:
    """A DataLoader over TrainStream: `for images, tokens, skipped in loader`, `num_batches` per epoch, `set_epoch`."""

    def __init__(self, stream, workers):
        self.stream, self.num_batches = stream, stream.num_batches
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=torch.cuda.is_available(),
                                 prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)

    def set_epoch(self, epoch):
        self.stream.epoch.value = epoch

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return self.num_batches


def default_workers(on_gpu):
    """Dataloader workers per rank (training) or process (evaluation). On GPUs, every core but one per rank: at FLIP's
    step rates, and in an ImageNet pass, JPEG decoding is the bottleneck (a worker makes ~400 images/s; a masked
    ViT-B/16 step consumes thousands). On the CPU, one: the model needs the cores itself."""
    if not on_gpu:
        return 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun: GPUs used on this machine
    return max(1, len(os.sched_getaffinity(0)) // ranks_here - 1)


def make_train_loader(pattern, batch_size, num_samples, image_size, tokenizer, workers=4, seed=0, rank=0,
                      world_size=1, scale=(0.9, 1.0)):
    """The training batches of one rank: num_samples // (batch_size * world_size) per epoch, shards resampled with
    replacement (OpenCLIP's resampled mode), so every epoch is the same length on every rank."""
    urls = expand_urls(pattern)
    num_batches = num_samples // (batch_size * world_size)
    stream = TrainStream(urls, batch_size, num_batches, image_size, tokenizer, tuple(scale), seed, rank)
    return TrainLoader(stream, workers)


# -------------------------------------------------------------------------------------------------- evaluation data
class ImageFolder(Dataset):
    """root/<class>/<image> -> (tensor, label); classes are the sorted folder names (ImageNet: WordNet ids).
    An image that cannot be read is warned about and given as a blank mean-colour image, so the dataset length and
    the accuracy's denominator stay the file count (the model then guesses for it)."""

    def __init__(self, root, transform):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root}: no such directory")
        self.root, self.transform = root, transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"image folder {root} has no class folders (expected {root}/<class>/<image>)")
        self.samples = [(os.path.join(d, f), label) for label, c in enumerate(self.classes)
                        for d, _, files in sorted(os.walk(os.path.join(root, c))) for f in sorted(files)
                        if f.rsplit(".", 1)[-1].lower() in FOLDER_IMAGE_EXTS]
        if not self.samples:
            raise ValueError(f"image folder {root} has class folders but no images")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                return self.transform(open_image(f.read())), label
        except Exception as e:
            warn_bad(path, e)
            blank = Image.new("RGB", (32, 32), tuple(round(255 * m) for m in OPENAI_MEAN))
            return self.transform(blank), label


class ImageTextDataset(IterableDataset):
    """(image tensor, caption) from shards, one ordered pass, no resampling (for retrieval). Split without duplicates
    across ranks and dataloader workers: by shard when there are enough shards, else by sample (each part then reads
    every shard but decodes only its own samples). `skipped` counts bad samples (workers=0; workers print theirs)."""

    def __init__(self, urls, transform, rank=0, world_size=1):
        self.urls, self.transform, self.rank, self.world_size = urls, transform, rank, world_size
        self.skipped = 0  # bad samples of the last pass (in this process)

    def __iter__(self):
        worker, num_workers = worker_split()
        part, parts = self.rank * num_workers + worker, self.world_size * num_workers
        by_shard = len(self.urls) >= parts
        self.skipped, index = 0, -1
        for i, url in enumerate(self.urls):
            if by_shard and i % parts != part:
                continue
            for sample in read_shard(url):
                index += 1
                if not by_shard and index % parts != part:
                    continue
                decoded = None if sample is None else decode_sample(sample, self.transform)
                if decoded is None:
                    self.skipped += 1
                else:
                    yield decoded
        if self.skipped:
            print(f"data.py: {self.skipped} bad samples skipped (part {part} of {parts})", file=sys.stderr)


def image_text_dataset(pattern, transform, rank=0, world_size=1):
    return ImageTextDataset(expand_urls(pattern), transform, rank, world_size)


# ------------------------------------------------------------------------------------- the built-in "photographer" set
SHAPES = ("circle", "cross", "heart", "square", "star", "triangle")
COLOURS = {"blue": (40, 90, 230), "green": (30, 170, 60), "orange": (250, 140, 20), "purple": (150, 60, 200),
           "red": (220, 30, 40), "yellow": (245, 215, 30)}  # saturated hues over a desaturated background
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # 36, sorted: both lists are alphabetical
SUBJECT_SIZE = (0.35, 0.55)  # subject diameter / image side: big enough for a 64 px, patch-8 ViT to learn in minutes
DISTRACTOR_SIZE = (0.10, 0.18)
CENTRED_JITTER = 0.08  # std of the subject centre around the image centre, in image sides ("as a photographer would")
CAPTIONS = ("a photo of {a} {}", "a picture of the {}", "{a} {}", "{}", "an image showing {a} {}",
            "a close-up of the {}", "{a} {} on a textured background", "there is {a} {} in this picture",
            "the {} among small shapes", "a photograph of the {}")
LAYOUT_CAPTIONS = {"centered": ("{a} {} in the middle of the frame", "{a} {} in the centre of the photo"),
                   "uniform": ("{a} {} somewhere in the frame",),
                   "edge": ("{a} {} at the edge of the frame", "{a} {} off to one side")}
LAYOUTS = tuple(LAYOUT_CAPTIONS)  # where the subject goes: near the centre, anywhere, against one edge
TEMPLATES = ("a photo of the {}.", "a picture of the {}.", "the {}.", "a close-up of the {}.")  # zero-shot prompts
GENERATOR_VERSION = 2  # bump when the images or captions change, so old caches are not reused
SHARD_SIZE = 1000


def shape_points(shape, cx, cy, r, angle):
    """Polygon of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a) * 1.05, math.sin(a) * 1.05 + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [(math.cos(a) * (1 if k % 2 == 0 else 0.45), math.sin(a) * (1 if k % 2 == 0 else 0.45))
               for k, a in enumerate(-math.pi / 2 + math.pi / 5 * np.arange(10))]
    elif shape == "cross":
        t = 0.33  # half-width of an arm
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
               (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif shape == "heart":  # the classic parametric heart, scaled into the unit disc
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = list(zip(np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 16))
    else:  # circle
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def textured_background(size, rng):
    """(size, size, 3) uint8: a muted base colour, smooth blotches and fine grain."""
    base = rng.uniform(70, 180) + rng.uniform(-20, 20, 3)  # grey with a slight tint
    blotches = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    smooth = np.asarray(blotches, dtype=np.float32) / 255 - 0.5  # (size, size, 3) in [-0.5, 0.5]
    grain = rng.normal(0, 8, (size, size, 1))
    return np.clip(base + 50 * smooth + grain, 0, 255).astype(np.uint8)


def render(rng, label, size, layout):
    """One size x size PIL image of class `label`: the subject (placed as `layout` says) and 2-4 small distractors along
    the edges."""
    ss = 2 * size  # draw at twice the size, then average 2x2 blocks: smooth edges
    img = Image.fromarray(textured_background(size, rng)).resize((ss, ss), Image.NEAREST)
    draw = ImageDraw.Draw(img)

    def put(colour, shape, cx, cy, r):
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, 3), 0, 255))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(shape_points(shape, cx, cy, r, rng.uniform(-0.25, 0.25)), fill=fill)

    for _ in range(rng.integers(2, 5)):  # distractors: other classes, small, in a band along a random edge
        colour, shape = CLASSES[(label + rng.integers(1, len(CLASSES))) % len(CLASSES)]
        r = rng.uniform(*DISTRACTOR_SIZE) * ss / 2
        put(colour, shape, *near_a_side(rng, ss, r, 0.06), r)
    colour, shape = CLASSES[label]
    put(colour, shape, *subject_disc(rng, ss, layout))
    return img.reduce(2)


def subject_disc(rng, ss, layout):
    """(cx, cy, r) of the subject in an ss x ss image, as `layout` places it; the disc always fits in the frame."""
    r = rng.uniform(*SUBJECT_SIZE) * ss / 2
    if layout == "centered":
        cx, cy = np.clip(ss / 2 + rng.normal(0, CENTRED_JITTER * ss, 2), r, ss - r)
    elif layout == "uniform":
        cx, cy = rng.uniform(r, ss - r, 2)
    else:  # edge: touching, or nearly, one of the four sides
        cx, cy = near_a_side(rng, ss, r, 0.04)
    return cx, cy, r


def near_a_side(rng, ss, r, band):
    """Centre (cx, cy) of a disc of radius r at a random place along a random side of an ss x ss image, at most
    band * ss away from touching it."""
    along, inward = rng.uniform(r, ss - r), r + rng.uniform(0, band * ss)
    return [(along, inward), (along, ss - inward), (inward, along), (ss - inward, along)][rng.integers(4)]


def caption(rng, label, layout):
    name = " ".join(CLASSES[label])
    options = CAPTIONS + LAYOUT_CAPTIONS[layout]
    return options[rng.integers(len(options))].format(name, a="an" if name[0] in "aeiou" else "a")


def jpeg_bytes(img, quality=90):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def generate_part(job):
    """One shard of the train split or one chunk of the test split; seeded by (seed, split, index) alone, so the bytes
    do not depend on how the jobs are spread over processes."""
    out, split, index, start, count, size, layout, seed = job
    rng = np.random.default_rng([seed, split == "test", index])
    if split == "train":
        with wds.TarWriter(os.path.join(out, "train", f"shard-{index:04d}.tar"), encoder=False, mtime=0) as tar:
            for i in range(start, start + count):
                label = int(rng.integers(len(CLASSES)))
                img = render(rng, label, size, layout)
                tar.write({"__key__": f"{i:08d}", "jpg": jpeg_bytes(img), "txt": caption(rng, label, layout).encode(),
                           "cls": str(label).encode()})
    else:
        for i in range(start, start + count):
            label = i % len(CLASSES)  # balanced
            with open(os.path.join(out, "test", "_".join(CLASSES[label]), f"{i:06d}.jpg"), "wb") as f:
                f.write(jpeg_bytes(render(rng, label, size, layout)))


def cache_root():
    """Where generated and converted datasets are kept: $GDMFLIP_DATA, or ~/.cache/gdm-flip."""
    return os.environ.get("GDMFLIP_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "gdm-flip")


def builtin_dataset(layout="centered", root=None, num_train=50_000, num_test=2_000, image_size=64, seed=0):
    """Generate (once; cached under root, default $GDMFLIP_DATA or ~/.cache/gdm-flip) the built-in dataset and return
    {"train": shard pattern, "test": ImageFolder dir, "classnames": [...], "templates": [...]}. "centered" puts the
    subject near the centre as a photographer would; "uniform" anywhere its whole disc fits (which still covers the
    centre most often); "edge" against one side (the control where centring should hurt)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if num_train < 1 or num_test < 1:
        raise ValueError("num_train and num_test must be positive")
    root = root or cache_root()
    name = f"photographer-{layout}-{num_train}-{num_test}-{image_size}px-seed{seed}-v{GENERATOR_VERSION}"
    out = os.path.join(root, name)
    num_shards = math.ceil(num_train / SHARD_SIZE)
    result = {"train": os.path.join(out, "train", "shard-{0000..%04d}.tar" % (num_shards - 1)),
              "test": os.path.join(out, "test"), "classnames": [" ".join(c) for c in CLASSES],
              "templates": list(TEMPLATES)}
    if os.path.isdir(out):
        return result
    # build in a temporary folder and rename it when complete: an interrupted run leaves no half dataset behind
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    os.makedirs(os.path.join(tmp, "train"))
    for c in CLASSES:
        os.makedirs(os.path.join(tmp, "test", "_".join(c)))  # "blue_circle": sorted like CLASSES
    with open(os.path.join(tmp, "test", "classnames.txt"), "w") as f:
        f.write("\n".join(result["classnames"]) + "\n")
    with open(os.path.join(tmp, "test", "templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    jobs = [(tmp, "train", k, k * SHARD_SIZE, min(SHARD_SIZE, num_train - k * SHARD_SIZE), image_size, layout, seed)
            for k in range(num_shards)]
    jobs += [(tmp, "test", k, k * SHARD_SIZE, min(SHARD_SIZE, num_test - k * SHARD_SIZE), image_size, layout, seed)
             for k in range(math.ceil(num_test / SHARD_SIZE))]
    processes = min(os.cpu_count() or 1, len(jobs))
    t0 = time.time()
    try:
        if processes > 1:
            with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(processes) as pool:
                pool.map(generate_part, jobs, chunksize=1)
        else:
            list(map(generate_part, jobs))
        os.rename(tmp, out)
    except OSError:
        if not os.path.isdir(out):  # not "another process finished first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data.py: generated the built-in dataset ({num_train} train, {num_test} test images, {layout}) in {out} "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)
    return result


# --------------------------------------------------------------------------------------------------------------- CLI
def convert(src, out, template="a photo of a {}.", shard_size=1000, seed=0):
    """A folder of KEY.jpg + KEY.txt (captioned), or of class folders (caption = template with the class name), ->
    shuffled webdataset shards out/shard-NNNNN.tar (+ classnames.txt for class folders). Returns the shard pattern."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory")
    images = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs
                    if f.rsplit(".", 1)[-1].lower() in FOLDER_IMAGE_EXTS)
    captioned = any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for p in images)
    if not captioned:  # class folders: src/<class>/.../<image>
        images = [p for p in images if os.sep in os.path.relpath(p, src)]
    if not images:
        raise FileNotFoundError(f"{src}: no images with KEY.txt captions and no class folders of images")
    classes = sorted({os.path.relpath(p, src).split(os.sep)[0] for p in images})
    random.Random(seed).shuffle(images)  # class folders would otherwise give one-class shards (and batches)
    os.makedirs(out, exist_ok=True)
    written, skipped, tar = 0, 0, None
    for path in images:
        if captioned:
            txt = os.path.splitext(path)[0] + ".txt"
            text = read_text(txt).strip() if os.path.isfile(txt) else ""
        else:
            text = template.format(os.path.relpath(path, src).split(os.sep)[0].replace("_", " "))
        ext = path.rsplit(".", 1)[-1].lower()
        try:
            with open(path, "rb") as f:
                blob = f.read()
            open_image(blob).load()  # check that it decodes; the shard keeps the original bytes
            if ext not in IMAGE_EXTS:  # bmp, gif, tiff: re-encode losslessly
                buf = io.BytesIO()
                open_image(blob).convert("RGB").save(buf, "PNG")
                blob, ext = buf.getvalue(), "png"
            if not text:
                raise BadSample("no caption")
        except Exception as e:
            warn_bad(path, e)
            skipped += 1
            continue
        if written % shard_size == 0:
            if tar:
                tar.close()
            tar = wds.TarWriter(os.path.join(out, f"shard-{written // shard_size:05d}.tar"), encoder=False)
        tar.write({"__key__": f"{written:09d}", ext: blob, "txt": text.encode()})
        written += 1
    if tar:
        tar.close()
    if not captioned:
        with open(os.path.join(out, "classnames.txt"), "w") as f:
            f.write("\n".join(c.replace("_", " ") for c in classes) + "\n")
    pattern = os.path.join(out, "shard-{00000..%05d}.tar" % (max(written - 1, 0) // shard_size))
    print(f"data.py: wrote {written} samples ({skipped} skipped) to {pattern}")
    return pattern


def fake_photo(rng, short_side):
    """A CC12M-like JPEG for benchmarks: smooth colours, shapes, grain; shortest side `short_side`, aspect to 16:9."""
    aspect = rng.uniform(1, 16 / 9)
    size = (round(short_side * aspect), short_side) if rng.random() < 0.7 else (short_side, round(short_side * aspect))
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(10, short_side / 4)
        draw.polygon(shape_points(SHAPES[rng.integers(6)], x, y, r, 0), fill=tuple(rng.integers(0, 256, 3).tolist()))
    grain = rng.normal(0, 4, (size[1], size[0], 1))  # texture, so the JPEG is photo-sized (~60-70 kB), not flat
    return jpeg_bytes(Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8)), quality=90)


def images_per_s(loader):
    """Images/s of one pass over `loader`, the first batch (worker start-up, shuffle buffer) not counted."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(batch[0].shape[0] for batch in it)
    return n / (time.perf_counter() - t0)


def shard_loader_factory(photos, tmp, image_size, batch_size):
    """workers -> a training loader over one shard of `photos`, resampled for three passes' worth of batches."""
    captions = [f"a photo of a {c} {s}" for c in COLOURS for s in SHAPES]
    shard = os.path.join(tmp, "bench-0000.tar")
    with wds.TarWriter(shard, encoder=False) as tar:
        for i, photo in enumerate(photos):
            tar.write({"__key__": f"{i:06d}", "jpg": photo, "txt": captions[i % len(captions)].encode()})
    tokenizer, num_samples = train_tokenizer(captions, 1024, 77), 3 * len(photos) // batch_size * batch_size
    return lambda w: make_train_loader(shard, batch_size, num_samples, image_size, tokenizer, workers=w)


def folder_loader_factory(photos, tmp, image_size, batch_size):
    """workers -> an evaluation loader over a class folder of `photos`, read as eval.py reads ImageNet."""
    for i, photo in enumerate(photos):
        os.makedirs(os.path.join(tmp, "val", f"c{i % 10}"), exist_ok=True)
        with open(os.path.join(tmp, "val", f"c{i % 10}", f"{i:06d}.jpg"), "wb") as f:
            f.write(photo)
    folder = ImageFolder(os.path.join(tmp, "val"), eval_crop(image_size))
    return lambda w: DataLoader(folder, batch_size, num_workers=w)


def bench(workers, num_images=256, image_size=224, batch_size=32):
    """Images/s of the training pipeline (CC12M-like JPEGs, shortest side 400-500 px, from a shard) and of the
    evaluation pipeline (ImageNet-like, shortest side 333-375 px, from class folders), against a plain PIL
    decode + resize of the same JPEGs in one process."""
    rng = np.random.default_rng(0)
    pipelines = {"training": ((400, 501), shard_loader_factory), "evaluation": ((333, 376), folder_loader_factory)}
    for what, (sides, loader_factory) in pipelines.items():
        photos = [fake_photo(rng, int(rng.integers(*sides))) for _ in range(num_images)]
        print(f"{what}: {num_images} JPEGs of shortest side {sides[0]}-{sides[1] - 1} px, "
              f"mean {sum(map(len, photos)) / len(photos) / 1e3:.0f} kB, {image_size} px output")
        t0 = time.perf_counter()
        for photo in photos:
            Image.open(io.BytesIO(photo)).convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        print(f"  plain PIL decode + resize (1 process): {num_images / (time.perf_counter() - t0):7.1f} images/s")
        with tempfile.TemporaryDirectory() as tmp:
            make_loader = loader_factory(photos, tmp, image_size, batch_size)
            for w in sorted({0, workers}):
                rate = images_per_s(make_loader(w))
                per = f"{rate / max(w, 1):.1f} per {'worker' if w else 'process'}"
                print(f"  {what + ' pipeline,':21}{w:2d} workers:{'':6}{rate:7.1f} images/s ({per})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("builtin", help="generate (once, cached) the built-in photographer dataset")
    p.add_argument("--layout", default="centered", choices=LAYOUTS, help="where the subject goes")
    p.add_argument("--root", default=None, help="cache folder (default: $GDMFLIP_DATA or ~/.cache/gdm-flip)")
    p.add_argument("--num-train", type=int, default=50_000, help="training images")
    p.add_argument("--num-test", type=int, default=2_000, help="test images (balanced over the 36 classes)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p = commands.add_parser("convert", help="a folder of images + captions, or class folders, -> webdataset shards")
    p.add_argument("src", help="folder with KEY.jpg + KEY.txt, or with one folder of images per class")
    p.add_argument("out", help="output folder for shard-NNNNN.tar")
    p.add_argument("--template", default="a photo of a {}.", help="caption for class folders; {} = the class name")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p = commands.add_parser("bench", help="training and evaluation pipelines' images/s vs plain PIL decode + resize")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers (also measured: 0, in-process)")
    p.add_argument("--num-images", type=int, default=256, help="JPEGs to generate for each pipeline")
    args = parser.parse_args(argv)
    try:
        if args.command == "builtin":
            d = builtin_dataset(args.layout, args.root, args.num_train, args.num_test, args.image_size, args.seed)
            print(f"train: {d['train']}\ntest:  {d['test']}")
            print(f"{len(d['classnames'])} classes: {', '.join(d['classnames'])}")
        elif args.command == "convert":
            convert(args.src, args.out, args.template, args.shard_size)
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a dataloader worker, so the in-process rate compares with theirs
            try:
                bench(args.workers, args.num_images)
            finally:
                torch.set_num_threads(threads)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"data.py: error: {e}")


if __name__ == "__main__":
    main()
