"""
Zero-shot evaluation and linear probing of a CLIP checkpoint, measured as CLIP_benchmark measures
them.

Classification: every class gets an embedding, the normalised mean of the normalised text embeddings
of its prompts ("a photo of a {}.", ... 80 OpenAI templates); an image is assigned to the class
whose embedding is closest. Retrieval: images and captions rank each other by cosine similarity.
`--mask` repeats either with training-style patch masking, the paper's "masked inference" column
(the default is inference unmasking: every patch); `--views N` classifies the mean of N masked
views, FLIP's ensemble. `--linear-probe` fits a logistic regression on the frozen image features of
a training split instead of using prompts.

    # TEST: `python photographer.py`
    python eval.py --checkpoint logs/RUN/checkpoints/epoch_latest.pt --dataset TEST
    python eval.py --checkpoint open_clip_vit_b16.pt --tokenizer bpe_simple_vocab_16e6.txt.gz \\
        --imagenet-val /data/imagenet/val --mask gaussian --ratio 0.5 --output result.json
    python eval.py --checkpoint logs/RUN/checkpoints/epoch_30.pt \\
        --retrieval '/data/mscoco/test-{0000..0004}.tar'
    python eval.py --checkpoint logs/RUN/checkpoints/epoch_30.pt \\
        --dataset TEST --mask random --ratio 0.75 --views 4
    python eval.py --checkpoint logs/RUN/checkpoints/epoch_30.pt \\
        --linear-probe --train-dataset TRAIN --dataset TEST

The ImageNet class names (OpenAI's cleaned names, in WordNet-id order) and the 80 templates ship as
plain text files next to this one, `imagenet_classnames.txt` and `openai_templates.txt`: one entry
per line, `{}` where the class name goes, the same format `--classnames` and `--templates` take.
train.py calls the same functions for its evaluation, on every rank of its process group: each rank
encodes a share of the prompts and images, and all get the whole figure.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import data
import masking
import distributed as D
import model as M
from checkpoint import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET_CLASSNAMES = os.path.join(HERE, "imagenet_classnames.txt")
OPENAI_TEMPLATES = os.path.join(HERE, "openai_templates.txt")
IMAGENET_CLASSES = 1000
# CLIP / CLIP_benchmark score images with a fixed 100 * cosine, not the learned temperature
LOGIT_SCALE = 100.0
ACCURACY_KS = (1, 5)  # CLIP_benchmark's top-k accuracies
RECALL_KS = (1, 5, 10)  # CLIP_benchmark's recall@k
PROGRESS_EVERY_S = 10.0


# ----------------------------------------------------------------------------- metrics (pure
# functions)


def accuracy(ranked, labels, k):
    """Fraction of rows whose label is among their first k classes: ranked (N, >= k) class indices,
    best first (`logits.topk(5).indices`, as CLIP_benchmark ranks), labels (N,). With fewer than k
    columns, all of them count."""
    return (ranked[:, :k] == labels[:, None]).any(dim=1).double().mean().item()


def top_classes(logits):
    """(N, 5) class indices of each row's highest logits, best first (all of them with fewer than 5
    classes): all that the classification metrics below read, as CLIP_benchmark ranks."""
    return logits.topk(min(max(ACCURACY_KS), logits.shape[1]), dim=1).indices


def classification_metrics(ranked, labels, num_classes):
    """CLIP_benchmark's {"acc1", "acc5", "mean_per_class_recall"} from top_classes' (N, 5) ranks and
    (N,) labels."""
    return {f"acc{k}": accuracy(ranked, labels, k) for k in ACCURACY_KS} | {
        "mean_per_class_recall": mean_per_class_recall(ranked[:, 0], labels, num_classes)}


def mean_per_class_recall(predictions, labels, num_classes):
    """Recall of each class (correct / samples of that class), averaged over the classes that have
    samples.

    sklearn's balanced accuracy, which CLIP_benchmark reports; unlike top-1 it is not dominated by
    large classes.
    """
    total = torch.bincount(labels, minlength=num_classes).double()  # (C,)
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()  # (C,)
    present = total > 0
    return (correct[present] / total[present]).mean().item()


def retrieval_recall(scores, positives, k):
    """Fraction of queries (rows of scores (Q, N)) with at least one positive (bool (Q, N)) among
    their top k."""
    topk = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Q, k)
    return positives.gather(1, topk).any(dim=1).double().mean().item()


def check_readable(count, unreadable, what="images"):
    if unreadable > count / 2:  # the figure would measure blank images, not the model
        raise ValueError(f"{unreadable} of {count} {what} could not be read: no accuracy to report")


# ----------------------------------------------------------------------------- files


def read_lines(path):
    """Non-empty lines of a text file, stripped: class names or templates."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------- features


def check_mask(mask, ratio, sigma, views=1):
    if mask != "none":
        # raises ValueError for an unknown mode or a bad ratio / sigma
        masking.check_args(1, ratio, mask, sigma)
    # mask "none" ignores ratio and sigma: every patch is encoded
    if views < 1 or (views > 1 and mask == "none"):
        raise ValueError(f"views must be 1, or more with a mask (random or gaussian); "
                         f"got {views} with mask {mask!r}")


def pass_name(mask, ratio, sigma, views=1):
    """How a pass sees the images, for its progress lines: unmasked, masked random 0.5, masked
    gaussian 0.5 sigma 0.2, masked random 0.75 x 4 views."""
    if mask == "none":
        return "unmasked"
    return (f"masked {mask} {ratio:g}" + (f" sigma {sigma:g}" if mask == "gaussian" else "")
            + (f" x {views} views" if views > 1 else ""))


def complementary(grid_size, mask, ratio, views):
    """Whether `views` masks can split the G*G patches among them, K each, every patch in exactly
    one: random masking with views = 1 / (1 - ratio) (2 at 0.5, 4 at 0.75), FLIP's ensemble of
    complementary views (Table 1d)."""
    return (mask == "random" and views > 1
            and views * masking.num_kept(grid_size, ratio) == grid_size * grid_size)


def draw_masks(count, grid_size, mask, ratio, sigma, device, generator, views=1):
    """Patch indices each of `count` images keeps: (count, K), training's keep_indices; (count, V,
    K) for V views, each sorted; None for mask "none". Complementary views (see above) are one
    random order of the G*G patches cut in V parts of K; other views are V independent draws. Either
    way view 0 is the single view the same generator gives."""
    if mask == "none":
        return None
    if complementary(grid_size, mask, ratio, views):
        # keep_indices' scores
        scores = torch.rand(count, grid_size * grid_size, device=device, generator=generator)
        # (count, G*G): the first K are keep_indices' K highest
        order = scores.argsort(dim=1, descending=True)
        return order.view(count, views, -1).sort(dim=-1).values  # (count, V, K)
    keep = [masking.keep_indices(count, grid_size, ratio, mask, sigma, device=device,
                                 generator=generator)
            for _ in range(views)]  # V x (count, K)
    return keep[0] if views == 1 else torch.stack(keep, dim=1)


def encode_images(model, images, keep=None):
    """(B, 3, S, S) -> (B, E) normalised fp32 features; with keep (B, K), only the kept patches go
    through the ViT; with keep (B, V, K), the normalised mean of the V views' normalised features,
    as a prompt ensemble averages prompts. `images`: normalised floats, or uint8 pixels as the
    loaders below yield them (normalised here, on their device)."""
    if images.dtype == torch.uint8:
        images = data.normalize(images)
    if keep is not None and keep.dim() == 3:
        views = torch.stack([encode_images(model, images, keep[:, v])
                             for v in range(keep.shape[1])])  # (V, B, E)
        return F.normalize(views.mean(dim=0), dim=-1)
    return F.normalize(model.encode_image(images, keep).float(), dim=-1)


def encode_texts(model, tokenizer, texts, device):
    """list of B strings -> (B, E) normalised fp32 features."""
    tokens = tokenizer(texts)  # (B, T) on the CPU
    if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the GPU
        tokens = tokens.pin_memory()
    return F.normalize(model.encode_text(tokens.to(device, non_blocking=True)).float(), dim=-1)


def seeded_generator(device, seed=0):
    """Masks (and loader seeds) for evaluation come from their own seeded generators: the figure is
    reproducible, and evaluating in the middle of training does not move the global random stream
    the training masks and crops use."""
    return torch.Generator(device=device).manual_seed(seed)


def make_loader(dataset, batch_size, workers, device):
    # a DataLoader draws its workers' base seed from the global generator unless it is given one
    return DataLoader(dataset, batch_size, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda",
                      generator=seeded_generator("cpu"))


class Progress:
    """One line on stderr at most every PROGRESS_EVERY_S seconds (evaluating ImageNet takes
    minutes), and a last line from `done()`: the rate, and the share of the time spent waiting for
    the next batch from `batches(loader)`. Near 100% means the pass is bound by data loading, as it
    should be on a GPU; near 0, by the model."""

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

    def done(self, count=None, note=""):
        """Call after the last result has reached the host, so that the time includes the device's
        work. count: the items of the whole pass, when other ranks shared it (default: this
        process's)."""
        elapsed, count = time.perf_counter() - self.start, self.count if count is None else count
        if not self.quiet:
            print(f"{self.what}: {count} in {elapsed:.1f} s, {count / elapsed:.0f}/s, "
                  f"{100 * self.waited / elapsed:.0f}% of it waiting for data{note}",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- zero-shot
# classification


@torch.no_grad()
def build_classifier(model, tokenizer, classnames, templates, device, batch_size=256,
                     precision=None, quiet=False):
    """(E, C) zero-shot classifier: column c = the normalised mean of the normalised embeddings of
    class c's prompts. In a process group, rank r encodes the prompts of classes r, r + world, ...
    and every rank gets every column."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    if bad := [t for t in templates if "{}" not in t]:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' where the class name goes")
    rank, world = D.rank_and_world()
    mine = classnames[rank::world]
    # class-major: C_r * P prompts
    prompts = [t.replace("{}", name) for name in mine for t in templates]
    progress, features = Progress("class prompts", len(prompts), quiet), []
    with D.autocast(device, precision):
        for i in range(0, len(prompts), batch_size):
            features.append(encode_texts(model, tokenizer, prompts[i:i + batch_size], device))
            progress.update(len(features[-1]))
    # (C_r, E) this rank's rows; None from a rank without classes (fewer classes than ranks)
    rows = (F.normalize(torch.cat(features).view(len(mine), len(templates), -1).mean(dim=1), dim=-1)
            if mine else None)
    shares = D.all_ranks(None if rows is None else rows.cpu())
    # (C, E); rank 0 always has class 0
    classifier = torch.empty(len(classnames), shares[0].shape[1])
    for r, share in enumerate(shares):
        if share is not None:
            classifier[r::world] = share
    return classifier.to(device).T  # (E, C)


@torch.no_grad()
def zero_shot_classification(model, classifier, loader, device, keep=None, precision=None,
                             quiet=False, what="images"):
    """{"acc1", "acc5", "mean_per_class_recall"} (fractions), "images" and "unreadable" (counts)
    over a loader of (images (B, 3, S, S), labels (B,), readable (B,) bool); more than half
    unreadable (blank stand-ins) is a ValueError. keep: (N, K) patches each image keeps, or (N, V,
    K) for V views, in the loader's order; None for all. In a process group the loader holds this
    rank's share and every rank returns the figures over all shares. The top-5 classes of each image
    are all the metrics read: only they leave the device (at the end, not to wait for it each batch)
    and cross ranks."""
    progress, ranked, labels, readable = Progress(what, len(loader.dataset), quiet), [], [], []
    for images, target, ok in progress.batches(loader):
        batch_keep = (None if keep is None
                      else keep[progress.count:progress.count + len(target)])  # (B, [V,] K)
        with D.autocast(device, precision):
            features = encode_images(model, images.to(device, non_blocking=True), batch_keep)
        logits = LOGIT_SCALE * features @ classifier  # (B, C), in fp32 outside autocast
        ranked.append(top_classes(logits))  # (B, 5) best first
        labels, readable = labels + [target], readable + [ok]
        progress.update(len(target))
    local = [torch.cat(column).cpu() for column in (ranked, labels, readable)] if labels else None
    shares = [share for share in D.all_ranks(local) if share is not None]
    if not shares:
        raise ValueError("no images to evaluate")
    # (N, 5), (N,), (N,): rank by rank
    ranked, labels, readable = (torch.cat(column) for column in zip(*shares))
    count, unreadable = len(labels), int((~readable).sum())
    progress.done(count, f", {unreadable} unreadable")
    check_readable(count, unreadable)
    return (classification_metrics(ranked, labels, classifier.shape[1])
            | {"images": count, "unreadable": unreadable})


def folder_classnames(root, folders, imagenet=False):
    """ImageNet's 1000 names; else the folder's classnames.txt; else the folder names with '_' read
    as spaces."""
    if imagenet:
        if len(folders) != IMAGENET_CLASSES:
            raise ValueError(f"{root} has {len(folders)} class folders; ImageNet's validation "
                             f"set has {IMAGENET_CLASSES} (one per WordNet id)")
        # listed in WordNet-id order, the sorted order of the folders
        return read_lines(IMAGENET_CLASSNAMES)
    listed = os.path.join(root, "classnames.txt")
    return read_lines(listed) if os.path.isfile(listed) else [f.replace("_", " ") for f in folders]


def evaluate_folder(model, tokenizer, root, classnames=None, templates=None, batch_size=256,
                    workers=4, device="cpu", mask="none", ratio=0.0, sigma=0.2, views=1,
                    imagenet=False, precision=None, quiet=False, patches=None):
    """Zero-shot classification of an image folder (one sub-folder per class, in sorted order); see
    the metrics above. Templates default to the folder's templates.txt if it has one, else the 80
    OpenAI templates. views > 1 classifies the mean of that many masked views of each image (see
    draw_masks). patches, a (K,) tensor of patch indices, feeds every image that one fixed set
    instead of a drawn mask (repro.py --breakdown; mask must be "none").

    In a torch.distributed process group every rank calls it: rank r encodes images r, r + world,
    ... (each image once, no padding), only rank 0 prints, and every rank returns the same figures a
    single process would.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root}")
    check_mask(mask, ratio, sigma, views)
    if patches is not None and mask != "none":
        raise ValueError(f"patches is a fixed set of patches instead of a mask; got mask {mask!r}")
    # uint8, normalised on the device
    dataset = data.ImageFolder(root, data.eval_crop(model.config.image_size))
    classnames = classnames or folder_classnames(root, dataset.classes, imagenet)
    if len(classnames) != len(dataset.classes):
        raise ValueError(f"{len(classnames)} class names for {len(dataset.classes)} class folders "
                         f"in {root}")
    listed = os.path.join(root, "templates.txt")
    templates = templates or read_lines(listed if os.path.isfile(listed) else OPENAI_TEMPLATES)
    rank, world = D.rank_and_world()
    quiet = quiet or rank > 0
    classifier = build_classifier(model, tokenizer, classnames, templates, device, batch_size,
                                  precision, quiet)
    # masks are drawn once for the whole set, row i for image i, whichever rank or batch reads it:
    # the masked figure is the same for any batch size and number of ranks (for one device type: CPU
    # and CUDA draw different streams)
    keep = draw_masks(len(dataset), model.visual.grid_size, mask, ratio, sigma, device,
                      seeded_generator(device), views)
    name = pass_name(mask, ratio, sigma, views)
    if patches is not None:
        keep, name = patches.to(device).expand(len(dataset), -1), f"{patches.numel()} fixed patches"
    mine = Subset(dataset, range(rank, len(dataset), world))
    loader = make_loader(mine, batch_size, workers, device)
    return zero_shot_classification(model, classifier, loader, device,
                                    None if keep is None else keep[rank::world], precision, quiet,
                                    f"images ({name})")


def training_record(model, tokenizer, root, mask="none", ratio=0.0, sigma=0.2, **settings):
    """What train.py logs after an epoch: zero-shot with inference unmasking (every patch) as
    zeroshot_top1 / _top5 / _mean_per_class_recall, and for a masked run the same with its training
    mask as zeroshot_masked_*; zeroshot_unreadable. settings: evaluate_folder's."""
    record = {}
    for prefix, m in [("zeroshot", "none")] + [("zeroshot_masked", mask)] * (mask != "none"):
        result = evaluate_folder(model, tokenizer, root, mask=m, ratio=ratio, sigma=sigma,
                                 **settings)
        record |= {f"{prefix}_top1": result["acc1"], f"{prefix}_top5": result["acc5"],
                   f"{prefix}_mean_per_class_recall": result["mean_per_class_recall"],
                   "zeroshot_unreadable": result["unreadable"]}
    return record


# ----------------------------------------------------------------------------- zero-shot retrieval


@torch.no_grad()
def zero_shot_retrieval(model, tokenizer, loader, device, mask="none", ratio=0.0, sigma=0.2,
                        views=1, precision=None, quiet=False):
    """Recall@1/5/10 both ways over a loader of (images (B, 3, S, S), captions: B strings), as
    CLIP_benchmark:

    image_retrieval_recall@k: for each caption, is its image among the k images closest to it;
    text_retrieval_recall@k: for each image, is any of its captions among the k captions closest to
    it. A caption with several lines counts as several captions of its image (COCO and Flickr have
    five per image).
    """
    check_mask(mask, ratio, sigma, views)
    generator, image_features, text_features = seeded_generator(device), [], []
    text_image, num_images = [], 0  # the index of each caption's image; images so far
    progress = Progress(f"image-caption pairs ({pass_name(mask, ratio, sigma, views)})",
                        quiet=quiet)
    for images, captions in progress.batches(loader):
        # B lists of captions
        texts = [[line for line in c.splitlines() if line.strip()] or [c] for c in captions]
        text_image += [num_images + i for i, lines in enumerate(texts) for _ in lines]
        num_images += len(images)
        with D.autocast(device, precision):
            images = images.to(device, non_blocking=True)
            keep = draw_masks(len(images), model.visual.grid_size, mask, ratio, sigma, device,
                              generator, views)
            image_features.append(encode_images(model, images, keep))  # (B, E)
            # (captions, E)
            text_features.append(encode_texts(model, tokenizer, sum(texts, []), device))
        progress.update(len(images))
    if not image_features:
        raise ValueError("no image-caption pairs to evaluate")
    # cosine similarities
    scores = torch.cat(text_features).cpu() @ torch.cat(image_features).cpu().T  # (T, I)
    progress.done()
    positives = torch.zeros_like(scores, dtype=torch.bool)
    # (T, I): caption t describes image i
    positives[torch.arange(len(text_image)), torch.tensor(text_image)] = True
    result = {}
    # image retrieval: text -> images; text retrieval: image -> texts
    for k in RECALL_KS:
        result[f"image_retrieval_recall@{k}"] = retrieval_recall(scores, positives, k)
        result[f"text_retrieval_recall@{k}"] = retrieval_recall(scores.T, positives.T, k)
    return result


# ----------------------------------------------------------------------------- linear probe

# CLIP_benchmark's linear probe (clip_benchmark/metrics/linear_probe.py): a logistic regression on
# the frozen image tower's normalised features, its L2 strength searched on a held-out part of the
# training split, then refitted on all of it. Where CLIP_benchmark runs AdamW for a set number of
# epochs, the solver here is the one OpenAI's CLIP paper used (appendix A.3: L-BFGS), full batch:
# the fit is the optimum of a convex loss, with no learning rate, epochs or batch order to choose,
# and the same for any batch size.
# CLIP_benchmark's grid: 10^-6 .. 10^2, 12/decade
PROBE_L2 = torch.logspace(-6, 2, 97, dtype=torch.float64).tolist()
# its search: every 16th value (7 of them), then the best's neighbours 8, 4, 2, 1 away
PROBE_SPANS = (16, 8, 4, 2, 1)
# 1 in 10 training images chooses the L2: CLIP_benchmark's README example (--val_proportion 0.1)
PROBE_HELD_OUT = 10
# L-BFGS iterations, as OpenAI's probes (sklearn's LogisticRegression(max_iter=1000))
PROBE_MAX_ITER = 1000


@torch.no_grad()
def image_features(model, loader, device, precision=None, quiet=False, what="images"):
    """(features (N, E) normalised fp32, labels (N,), readable (N,) bool), all on `device`, of a
    loader of (images, labels, readable): every patch, normalised as CLIP_benchmark's probe features
    are. One process, the whole loader."""
    progress, features, labels, readable = Progress(what, len(loader.dataset), quiet), [], [], []
    for images, target, ok in progress.batches(loader):
        with D.autocast(device, precision):
            features.append(encode_images(model, images.to(device, non_blocking=True)))  # (B, E)
        labels, readable = labels + [target], readable + [ok]
        progress.update(len(target))
    labels, readable = torch.cat(labels).to(device), torch.cat(readable).to(device)
    progress.done(note=f", {int((~readable).sum())} unreadable")
    return torch.cat(features), labels, readable


def fit_probe(features, labels, num_classes, l2):
    """Multinomial logistic regression: the Linear(E, C) minimising the mean cross-entropy on (N, E)
    features and (N,) labels + l2 / 2 * |weight|^2 (the bias is not penalised; sklearn's
    LogisticRegression(C) is l2 = 1 / (C N)). Full-batch L-BFGS from zero: the loss is convex, so
    the result needs no seed."""
    probe = torch.nn.Linear(features.shape[1], num_classes, device=features.device)
    torch.nn.init.zeros_(probe.weight), torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=PROBE_MAX_ITER,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(probe(features), labels) + l2 / 2 * probe.weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return probe.requires_grad_(False)


def choose_l2(features, labels, num_classes, seed=0, quiet=True):
    """The PROBE_L2 value whose probe, fitted on 9 in 10 of (features, labels), has the best top-1
    on the other tenth, searched as CLIP_benchmark searches (PROBE_SPANS; a tie goes to the weaker
    L2, as there). The tenth is drawn (seeded) class by class, so each class has about a tenth of
    its samples held out."""
    order = torch.randperm(len(labels), generator=seeded_generator("cpu", seed)).to(labels.device)
    order = order[labels[order].argsort(stable=True)]  # (N,) grouped by class, shuffled within each
    held = torch.zeros_like(labels, dtype=torch.bool)
    held[order[::PROBE_HELD_OUT]] = True  # every 10th of each class's run, within one
    top1 = {}  # grid index -> held-out top-1

    def score(i):
        if i not in top1:
            probe = fit_probe(features[~held], labels[~held], num_classes, PROBE_L2[i])
            top1[i] = accuracy(probe(features[held]).argmax(dim=1, keepdim=True), labels[held], 1)
            if not quiet:
                print(f"linear probe: l2 {PROBE_L2[i]:.2e}, held-out top-1 {top1[i]:.4f}",
                      file=sys.stderr, flush=True)
        return top1[i], -i

    best = max(range(0, len(PROBE_L2), PROBE_SPANS[0]), key=score)
    for span in PROBE_SPANS[1:]:
        best = max([max(best - span, 0), best, min(best + span, len(PROBE_L2) - 1)], key=score)
    return PROBE_L2[best]


def linear_probe(train, test, num_classes, seed=0, quiet=True):
    """CLIP_benchmark's {"acc1", "acc5", "mean_per_class_recall"} on the test split of a probe with
    the L2 choose_l2 picks, refitted on the whole training split; train and test are image_features'
    (features, labels, readable). Unreadable training images are left out of the fit; unreadable
    test images count, as in zero-shot classification. Beside the metrics: "l2", "images",
    "unreadable", "train_images", "train_unreadable"."""
    (x, y, ok), (test_x, test_y, test_ok) = train, test
    counts = {"images": len(test_y), "unreadable": int((~test_ok).sum()),
              "train_images": len(y), "train_unreadable": int((~ok).sum())}
    check_readable(counts["train_images"], counts["train_unreadable"], "training images")
    check_readable(counts["images"], counts["unreadable"])
    if int(ok.sum()) < 2:  # one to fit on and one to hold out, at the least
        raise ValueError(f"a linear probe needs 2 readable training images or more, "
                         f"got {int(ok.sum())}")
    l2 = choose_l2(x[ok], y[ok], num_classes, seed, quiet)
    logits = fit_probe(x[ok], y[ok], num_classes, l2)(test_x)  # (N, C)
    return (classification_metrics(top_classes(logits).cpu(), test_y.cpu(), num_classes)
            | {"l2": l2, **counts})


def probe_folders(model, train_root, test_root, batch_size=256, workers=4, device="cpu",
                  precision=None, quiet=False):
    """linear_probe on the features of two image folders with the same class sub-folders: training
    and test split."""
    transform = data.eval_crop(model.config.image_size)
    train, test = data.ImageFolder(train_root, transform), data.ImageFolder(test_root, transform)
    if train.classes != test.classes:
        raise ValueError(f"{train_root} and {test_root} have different class folders "
                         f"({len(train.classes)} and {len(test.classes)}); "
                         "a probe needs the same classes in both")
    splits = [(train, "training images (unmasked)"), (test, "test images (unmasked)")]
    features = [image_features(model, make_loader(dataset, batch_size, workers, device), device,
                               precision, quiet, what)
                for dataset, what in splits]
    return linear_probe(*features, len(train.classes), quiet=quiet)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = data.OneLineParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True,
      help="train.py checkpoint, OpenCLIP checkpoint or OpenCLIP/OpenAI state dict")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--imagenet-val",
                      help="ImageNet validation folder, one sub-folder per WordNet id")
    task.add_argument("--dataset",
                      help="image folder, one sub-folder per class (e.g. the built-in test split)")
    task.add_argument("--retrieval",
                      help="image-caption webdataset shards, brace patterns joined with '::'")
    a("--linear-probe", action="store_true",
      help="fit a logistic-regression probe on the frozen image features of "
           "--train-dataset, test it on --dataset or --imagenet-val")
    a("--train-dataset",
      help="with --linear-probe: the probe's training split, one sub-folder per class")
    a("--classnames",
      help="with --dataset: one class name per line, in the sorted order of the class folders")
    a("--templates",
      help="prompt templates, one per line, '{}' where the class name goes (default: OpenAI's 80)")
    a("--model", default="ViT-B-16", choices=list(M.PRESETS),
      help="preset for state dicts and OpenCLIP checkpoints")
    a("--tokenizer", help="vocabulary for OpenCLIP checkpoints "
                          "(CLIP's bpe_simple_vocab_16e6.txt.gz or tokenizer.json)")
    a("--mask", default="none", choices=["none", *masking.MODES],
      help="masked inference: none = every patch")
    a("--ratio", type=float, default=0.5,
      help="fraction of patches dropped with --mask random or gaussian")
    a("--sigma", type=float, default=0.2,
      help="Gaussian masking's sigma (a variance, as in training)")
    a("--views", type=int, default=1,
      help="classify the mean of this many masked views per image: complementary "
           "(every patch once) for random masking at 1 / (1 - ratio), else independent")
    a("--image-size", type=int, help="evaluate at this resolution, positional embeddings resized "
                                     "(RECLIP); default: the checkpoint's, else the preset's")
    a("--batch-size", type=int, default=256, help="images (and prompts) per batch")
    a("--workers", type=int, default=None,
      help="dataloader workers (default: the cores less one on GPU, 1 on CPU)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--precision", choices=D.PRECISIONS, help=D.PRECISION_HELP)
    a("--output", help="write the result as JSON to this file too")
    args = p.parse_args(argv)
    if (args.classnames or args.templates) and not (args.dataset or args.imagenet_val):
        p.error("--classnames and --templates go with --dataset or --imagenet-val")
    if args.linear_probe != bool(args.train_dataset):
        p.error("--linear-probe and --train-dataset go together")
    if args.linear_probe and (args.retrieval or args.mask != "none" or args.classnames
                              or args.templates):
        p.error("--linear-probe tests on --dataset or --imagenet-val, every patch: "
                "no --mask, prompts or --retrieval")
    for flag, value, least in [("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--image-size", args.image_size, 1), ("--views", args.views, 1)]:
        if value is not None and value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    try:
        check_mask(args.mask, args.ratio, args.sigma, args.views)
    except ValueError as e:
        p.error(str(e))
    if args.workers is None:  # JPEG decoding bounds an ImageNet pass on a GPU: use the cores
        on_gpu = torch.device(args.device).type == "cuda"
        args.workers = data.default_workers(on_gpu, D.launch_env()[3])
    return args


def run(args):
    model, tokenizer = load_checkpoint(args.checkpoint, args.model, args.tokenizer, args.device,
                                       args.image_size)
    settings = dict(device=args.device, mask=args.mask, ratio=args.ratio, sigma=args.sigma,
                    views=args.views, precision=args.precision)
    if args.linear_probe:
        metrics = probe_folders(model, args.train_dataset, args.imagenet_val or args.dataset,
                                args.batch_size, args.workers, args.device, args.precision)
        task = "linear_probe"
    elif args.retrieval:
        dataset = data.image_text_dataset(args.retrieval, data.eval_crop(model.config.image_size))
        loader = make_loader(dataset, args.batch_size, args.workers, args.device)
        metrics = zero_shot_retrieval(model, tokenizer, loader, **settings)
        task = "zeroshot_retrieval"
    else:
        classnames = read_lines(args.classnames) if args.classnames else None
        templates = read_lines(args.templates) if args.templates else None
        metrics = evaluate_folder(model, tokenizer, args.imagenet_val or args.dataset, classnames,
                                  templates, args.batch_size, args.workers,
                                  imagenet=bool(args.imagenet_val), **settings)
        task = "zeroshot_classification"
    dataset_name = "imagenet1k" if args.imagenet_val else (args.dataset or args.retrieval)
    mask = {"mask": args.mask} | ({"ratio": args.ratio, "sigma": args.sigma, "views": args.views}
                                  if args.mask != "none" else {})
    # beside the metrics, not among them
    beside = ("images", "unreadable", "train_images", "train_unreadable", "l2")
    counts = {k: metrics.pop(k) for k in beside if k in metrics}
    train = {"train_dataset": args.train_dataset} if args.linear_probe else {}
    return {"dataset": dataset_name, **train, "checkpoint": args.checkpoint, "task": task,
            "image_size": model.config.image_size, **mask, **counts, "metrics": metrics}


def main(argv=None):
    """Launched by torchrun or srun (several ranks, as train.py reads them), zero-shot
    classification shares the images between the ranks; rank 0 prints and writes the result."""
    args = parse_args(argv)
    try:
        if D.launch_env()[2] > 1:
            if args.linear_probe or args.retrieval:
                raise ValueError("--linear-probe and --retrieval run in one process: start eval.py "
                                 "without torchrun or srun")
            args.device = D.setup_distributed()[3]  # this rank's GPU, or the CPU
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"eval.py: error: {e}")
    if D.rank_and_world()[0] == 0:
        print(json.dumps(result, indent=2))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
