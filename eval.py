"""
Zero-shot evaluation of a CLIP checkpoint, measured as CLIP_benchmark measures it.

Classification: every class gets an embedding, the normalised mean of the normalised text embeddings of its prompts
("a photo of a {}.", ... 80 OpenAI templates); an image is assigned to the class whose embedding is closest. Retrieval:
images and captions rank each other by cosine similarity. `--mask` repeats either with training-style patch masking,
the paper's "masked inference" column (the default is inference unmasking: every patch).

    python eval.py --checkpoint logs/RUN/checkpoints/epoch_latest.pt --dataset TEST   # TEST: `python photographer.py`
    python eval.py --checkpoint open_clip_vit_b16.pt --tokenizer bpe_simple_vocab_16e6.txt.gz \\
        --imagenet-val /data/imagenet/val --mask gaussian --ratio 0.5 --output result.json
    python eval.py --checkpoint logs/RUN/checkpoints/epoch_30.pt --retrieval '/data/mscoco/test-{0000..0004}.tar'

The ImageNet class names (OpenAI's cleaned names, in WordNet-id order) and the 80 templates ship as plain text files
next to this one, `imagenet_classnames.txt` and `openai_templates.txt`: one entry per line, `{}` where the class name
goes, the same format `--classnames` and `--templates` take. train.py calls the same functions for its evaluation.
"""

import json
import os
import pickle
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
import masking
import model as M
from tokenizer import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET_CLASSNAMES = os.path.join(HERE, "imagenet_classnames.txt")
OPENAI_TEMPLATES = os.path.join(HERE, "openai_templates.txt")
IMAGENET_CLASSES = 1000
LOGIT_SCALE = 100.0  # CLIP / CLIP_benchmark score images with a fixed 100 * cosine, not the learned temperature
RECALL_KS = (1, 5, 10)  # CLIP_benchmark's recall@k
PROGRESS_EVERY_S = 10.0


# ----------------------------------------------------------------------------- metrics (pure functions)


def accuracy(logits, labels, k):
    """Fraction of rows whose label is among the k highest logits: logits (N, C), labels (N,). k is capped at C."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return (topk == labels[:, None]).any(dim=1).double().mean().item()


def mean_per_class_recall(predictions, labels, num_classes):
    """Recall of each class (correct / samples of that class), averaged over the classes that have samples.

    sklearn's balanced accuracy, which CLIP_benchmark reports; unlike top-1 it is not dominated by large classes.
    """
    total = torch.bincount(labels, minlength=num_classes).double()  # (C,)
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()  # (C,)
    present = total > 0
    return (correct[present] / total[present]).mean().item()


def retrieval_recall(scores, positives, k):
    """Fraction of queries (rows of scores (Q, N)) with at least one positive (bool (Q, N)) among their top k."""
    topk = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Q, k)
    return positives.gather(1, topk).any(dim=1).double().mean().item()


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path, model_name="ViT-B-16", tokenizer=None, device="cpu"):
    """(model in eval mode on `device`, tokenizer) from one of three kinds of file:

    - this project's checkpoint (train.py): {"state_dict", "config", "tokenizer", ...}, self-contained;
    - an OpenCLIP training checkpoint {"state_dict": ...} (keys may start with `module.`), or
    - a plain OpenCLIP / OpenAI state dict. These two need `model_name` and a `tokenizer` spec (e.g. CLIP's BPE vocab).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:  # weights_only: a checkpoint is data, never code to run
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a checkpoint torch.load can read ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: unknown checkpoint format (a {type(ckpt).__name__}, expected a dict)")
    if "config" in ckpt and "state_dict" in ckpt:  # ours: keys are already this model's
        try:
            model, model_name = M.CLIP(M.CLIPConfig(**ckpt["config"])), ckpt.get("model", "from the config")
        except TypeError as e:  # a config field this model.py does not know
            raise ValueError(f"{path}: config does not fit this model.py ({e})") from None
        state_dict = ckpt["state_dict"]
        tokenizer = ckpt.get("tokenizer") or tokenizer  # the model was trained with this vocabulary
    else:
        state_dict = M.convert_openclip_state_dict(ckpt.get("state_dict", ckpt))
        if "visual.conv1.weight" not in state_dict:
            raise ValueError(f"{path}: unknown checkpoint format (no CLIP ViT weights among its keys)")
        model = M.create_model(model_name)
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer: pass one (e.g. --tokenizer bpe_simple_vocab_16e6.txt.gz)")
    missing, unexpected = (set(model.state_dict()) - set(state_dict)), (set(state_dict) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit model {model_name!r}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # shapes differ: a different preset or vocabulary
        raise ValueError(f"{path} does not fit model {model_name!r}: {str(e).splitlines()[-1].strip()}") from None
    return model.to(device).eval(), load_tokenizer(tokenizer, model.config.context_length)


def read_lines(path):
    """Non-empty lines of a text file, stripped: class names or templates."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------- features


def check_mask(mask, ratio, sigma):
    if mask != "none":
        masking.check_args(1, ratio, mask, sigma)  # raises ValueError for an unknown mode or a bad ratio / sigma
    # mask "none" ignores ratio and sigma: every patch is encoded


def encode_images(model, images, mask="none", ratio=0.0, sigma=0.2, generator=None):
    """(B, 3, S, S) -> (B, E) normalised fp32 features; with a mask, only the kept patches go through the ViT.
    `images`: normalised floats, or uint8 pixels as the loaders below yield them (normalised here, on their device)."""
    if images.dtype == torch.uint8:
        images = data.normalize(images)
    keep = None
    if mask != "none":  # masked inference: the same keep_indices as in training, a fresh draw per batch
        keep = masking.keep_indices(images.shape[0], model.visual.grid_size, ratio, mask, sigma,
                                    device=images.device, generator=generator)  # (B, K)
    return F.normalize(model.encode_image(images, keep).float(), dim=-1)


def encode_texts(model, tokenizer, texts, device):
    """list of B strings -> (B, E) normalised fp32 features."""
    return F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)


def seeded_generator(device, seed=0):
    """Masks (and loader seeds) for evaluation come from their own seeded generators: the figure is reproducible, and
    evaluating in the middle of training does not move the global random stream the training masks and crops use."""
    return torch.Generator(device=device).manual_seed(seed)


def make_loader(dataset, batch_size, workers, device):
    # a DataLoader draws its workers' base seed from the global generator unless it is given one
    return DataLoader(dataset, batch_size, num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      generator=seeded_generator("cpu"))


class Progress:
    """One line on stderr at most every PROGRESS_EVERY_S seconds (evaluating ImageNet takes minutes), and a last line
    from `done()`: the rate, and the share of the time spent waiting for the next batch from `batches(loader)`. Near
    100% means the pass is bound by data loading, as it should be on a GPU; near 0, by the model."""

    def __init__(self, what, total=None, quiet=False):
        self.what, self.total, self.quiet, self.count, self.waited = what, total, quiet, 0, 0.0
        self.start = self.last = time.perf_counter()

    def batches(self, loader):
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.waited += time.perf_counter() - t0
            if batch is None:
                return
            yield batch

    def update(self, n):
        self.count += n
        now = time.perf_counter()
        if not self.quiet and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            rate = self.count / (now - self.start)
            print(f"{self.what}: {self.count}{of}, {rate:.0f}/s", file=sys.stderr, flush=True)

    def done(self):
        """Call after the last result has reached the host, so that the time includes the device's work."""
        elapsed = time.perf_counter() - self.start
        if not self.quiet:
            print(f"{self.what}: {self.count} in {elapsed:.1f} s, {self.count / elapsed:.0f}/s, "
                  f"{100 * self.waited / elapsed:.0f}% of it waiting for data", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- zero-shot classification


@torch.no_grad()
def build_classifier(model, tokenizer, classnames, templates, device, batch_size=256, precision=None, quiet=False):
    """(E, C) zero-shot classifier: column c = the normalised mean of the normalised embeddings of class c's prompts."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    if bad := [t for t in templates if "{}" not in t]:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' where the class name goes")
    prompts = [t.replace("{}", name) for name in classnames for t in templates]  # class-major: C * P prompts
    progress, features = Progress("class prompts", len(prompts), quiet), []
    with M.autocast(device, precision):
        for i in range(0, len(prompts), batch_size):
            features.append(encode_texts(model, tokenizer, prompts[i:i + batch_size], device))
            progress.update(len(features[-1]))
    features = torch.cat(features).view(len(classnames), len(templates), -1)  # (C, P, E)
    return F.normalize(features.mean(dim=1), dim=-1).T  # (E, C)


@torch.no_grad()
def zero_shot_classification(model, classifier, loader, device, mask="none", ratio=0.0, sigma=0.2, precision=None,
                             quiet=False):
    """{"acc1", "acc5", "mean_per_class_recall"} (fractions) over a loader of (images (B, 3, S, S), labels (B,)).
    Logits stay on the device until the end: a copy to the host per batch would make it wait for the GPU each time."""
    check_mask(mask, ratio, sigma)
    generator, logits, labels = seeded_generator(device), [], []
    progress = Progress("images", len(loader.dataset) if hasattr(loader.dataset, "__len__") else None, quiet)
    for images, target in progress.batches(loader):
        with M.autocast(device, precision):
            features = encode_images(model, images.to(device, non_blocking=True), mask, ratio, sigma, generator)
        logits.append(LOGIT_SCALE * features @ classifier)  # (B, C), in fp32 outside autocast
        labels.append(target)
        progress.update(len(target))
    if not logits:
        raise ValueError("no images to evaluate")
    logits, labels = torch.cat(logits).cpu(), torch.cat(labels)  # (N, C), (N,)
    progress.done()
    return {"acc1": accuracy(logits, labels, 1), "acc5": accuracy(logits, labels, 5),
            "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), labels, classifier.shape[1])}


def folder_classnames(root, folders, imagenet=False):
    """ImageNet's 1000 names; else the folder's classnames.txt; else the folder names with '_' read as spaces."""
    if imagenet:
        if len(folders) != IMAGENET_CLASSES:
            raise ValueError(f"{root} has {len(folders)} class folders; ImageNet's validation set has "
                             f"{IMAGENET_CLASSES} (one per WordNet id)")
        return read_lines(IMAGENET_CLASSNAMES)  # listed in WordNet-id order, the sorted order of the folders
    listed = os.path.join(root, "classnames.txt")
    return read_lines(listed) if os.path.isfile(listed) else [f.replace("_", " ") for f in folders]


def evaluate_folder(model, tokenizer, root, classnames=None, templates=None, batch_size=256, workers=4, device="cpu",
                    mask="none", ratio=0.0, sigma=0.2, imagenet=False, precision=None, quiet=False):
    """Zero-shot classification of an image folder (one sub-folder per class, in sorted order); see the metrics above.

    Templates default to the folder's templates.txt if it has one, else the 80 OpenAI templates.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root}")
    dataset = data.ImageFolder(root, data.eval_crop(model.config.image_size))  # uint8, normalised on the device
    classnames = classnames or folder_classnames(root, dataset.classes, imagenet)
    if len(classnames) != len(dataset.classes):
        raise ValueError(f"{len(classnames)} class names for {len(dataset.classes)} class folders in {root}")
    listed = os.path.join(root, "templates.txt")
    templates = templates or read_lines(listed if os.path.isfile(listed) else OPENAI_TEMPLATES)
    classifier = build_classifier(model, tokenizer, classnames, templates, device, batch_size, precision, quiet)
    loader = make_loader(dataset, batch_size, workers, device)
    return zero_shot_classification(model, classifier, loader, device, mask, ratio, sigma, precision, quiet)


# ----------------------------------------------------------------------------- zero-shot retrieval


@torch.no_grad()
def zero_shot_retrieval(model, tokenizer, loader, device, mask="none", ratio=0.0, sigma=0.2, precision=None,
                        quiet=False):
    """Recall@1/5/10 both ways over a loader of (images (B, 3, S, S), captions: B strings), as CLIP_benchmark:

    image_retrieval_recall@k: for each caption, is its image among the k images closest to it;
    text_retrieval_recall@k: for each image, is any of its captions among the k captions closest to it.
    A caption with several lines counts as several captions of its image (COCO and Flickr have five per image).
    """
    check_mask(mask, ratio, sigma)
    generator, image_features, text_features = seeded_generator(device), [], []
    text_image, num_images = [], 0  # the index of each caption's image; images so far
    progress = Progress("image-caption pairs", quiet=quiet)
    for images, captions in progress.batches(loader):
        texts = [[line for line in c.splitlines() if line.strip()] or [c] for c in captions]  # B lists of captions
        text_image += [num_images + i for i, lines in enumerate(texts) for _ in lines]
        num_images += len(images)
        with M.autocast(device, precision):
            images = images.to(device, non_blocking=True)
            image_features.append(encode_images(model, images, mask, ratio, sigma, generator))  # (B, E)
            text_features.append(encode_texts(model, tokenizer, sum(texts, []), device))  # (captions, E)
        progress.update(len(images))
    if not image_features:
        raise ValueError("no image-caption pairs to evaluate")
    scores = torch.cat(text_features).cpu() @ torch.cat(image_features).cpu().T  # (T, I) cosine similarities
    progress.done()
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_image)), torch.tensor(text_image)] = True  # (T, I): caption t describes image i
    result = {}
    for k in RECALL_KS:
        result[f"image_retrieval_recall@{k}"] = retrieval_recall(scores, positives, k)  # text -> images
        result[f"text_retrieval_recall@{k}"] = retrieval_recall(scores.T, positives.T, k)  # image -> texts
    return result


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = data.OneLineParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="train.py checkpoint, OpenCLIP checkpoint or OpenCLIP/OpenAI state dict")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--imagenet-val", help="ImageNet validation folder, one sub-folder per WordNet id")
    task.add_argument("--dataset", help="image folder, one sub-folder per class (e.g. the built-in test split)")
    task.add_argument("--retrieval", help="image-caption webdataset shards, brace patterns joined with '::'")
    a("--classnames", help="with --dataset: one class name per line, in the sorted order of the class folders")
    a("--templates", help="prompt templates, one per line, '{}' where the class name goes (default: OpenAI's 80)")
    a("--model", default="ViT-B-16", choices=list(M.PRESETS), help="preset for OpenCLIP checkpoints")
    a("--tokenizer", help="vocabulary for OpenCLIP checkpoints (CLIP's bpe_simple_vocab_16e6.txt.gz or tokenizer.json)")
    a("--mask", default="none", choices=["none", *masking.MODES], help="masked inference: none = every patch")
    a("--ratio", type=float, default=0.5, help="fraction of patches dropped with --mask random or gaussian")
    a("--sigma", type=float, default=0.2, help="Gaussian masking's sigma (a variance, as in training)")
    a("--batch-size", type=int, default=256, help="images (and prompts) per batch")
    a("--workers", type=int, default=None, help="dataloader workers (default: the cores less one on GPU, 1 on CPU)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--precision", choices=["bf16", "fp32"], help="bf16 autocast (GPU default) or fp32 (CPU default)")
    a("--output", help="write the result as JSON to this file too")
    args = p.parse_args(argv)
    if (args.classnames or args.templates) and not (args.dataset or args.imagenet_val):
        p.error("--classnames and --templates go with --dataset or --imagenet-val")
    try:
        check_mask(args.mask, args.ratio, args.sigma)
    except ValueError as e:
        p.error(str(e))
    if args.workers is None:  # JPEG decoding bounds an ImageNet pass on a GPU: use the cores
        args.workers = data.default_workers(on_gpu=torch.device(args.device).type == "cuda")
    return args


def run(args):
    model, tokenizer = load_checkpoint(args.checkpoint, args.model, args.tokenizer, args.device)
    settings = dict(device=args.device, mask=args.mask, ratio=args.ratio, sigma=args.sigma, precision=args.precision)
    if args.retrieval:
        dataset = data.image_text_dataset(args.retrieval, data.eval_crop(model.config.image_size))
        loader = make_loader(dataset, args.batch_size, args.workers, args.device)
        task, metrics = "zeroshot_retrieval", zero_shot_retrieval(model, tokenizer, loader, **settings)
    else:
        classnames = read_lines(args.classnames) if args.classnames else None
        templates = read_lines(args.templates) if args.templates else None
        metrics = evaluate_folder(model, tokenizer, args.imagenet_val or args.dataset, classnames, templates,
                                  args.batch_size, args.workers, imagenet=bool(args.imagenet_val), **settings)
        task = "zeroshot_classification"
    dataset_name = "imagenet1k" if args.imagenet_val else (args.dataset or args.retrieval)
    mask = {"mask": args.mask} | ({"ratio": args.ratio, "sigma": args.sigma} if args.mask != "none" else {})
    return {"dataset": dataset_name, "checkpoint": args.checkpoint, "task": task, **mask, "metrics": metrics}


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"eval.py: error: {e}")
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
