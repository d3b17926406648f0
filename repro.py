"""
A scaled-down version of the paper's table: CLIP, FLIP and GDM-FLIP pre-trained on a small dataset
with the `tiny` preset, then each masked model tuned unmasked, reported as masked inference /
unmasked inference / after tuning (zero-shot top-1 on the test split), mean +- std over seeds.

    python repro.py --jobs 2                    # built-in dataset, centred subjects (~1 h, 2 cores)
    python repro.py --jobs 2 --dataset uniform  # the control: subjects anywhere in the frame
    apt-get install dataset-fashion-mnist && python repro.py --jobs 2 --dataset fashion-mnist
    python repro.py --jobs 2 --reclip           # RECLIP beside FLIP and GDM-FLIP at equal budgets

RECLIP (the paper's equal-budget baseline) pre-trains CLIP on smaller images with as many patches as
a masked run keeps: `tiny` has 64 patches at 64 px, so 48, 32 and 24 px (36, 16 and 9 patches) face
43.75%, 75% and 85.9% masking, as the paper's 160, 112 and 64 px (100, 49 and 16 of 196 patches)
face 50%, 75% and 91.8%. Its "unmasked inference" column is the low-resolution model evaluated at 64
px (positional embeddings resized), and it is tuned at 64 px as the masked models are tuned
unmasked.

Every run lives in <log-dir>/<dataset>-<method>-<ratio>-s<seed> (its output in train.log there); a
finished run is not trained again and an interrupted one resumes from its last checkpoint, so the
command can simply be started again. Curves: python visualize.py curves
logs/repro/centered-*-0.5-s0/metrics.jsonl
"""

import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

import checkpoint
import data
import export
import model as M
import eval as zeroshot  # `eval` would shadow the builtin
import masking
import photographer
import visualize

HERE = os.path.dirname(os.path.abspath(__file__))
# samples per epoch: the built-in dataset's size, also drawn from Fashion-MNIST's 60k
SAMPLES = 20_000
TUNE_SAMPLES = 4000  # unmasked tuning: a fifth of an epoch (the paper tuned ~1% of its 30 epochs)
# where Debian's dataset-fashion-mnist puts the IDX files
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle boot"]
CAPTION = "a photo of a {}."  # Fashion-MNIST captions and its only zero-shot template


# ----------------------------------------------------------------------------- Fashion-MNIST as
# shards + a test folder


def read_idx(path):
    """An IDX file (MNIST's format, gzipped): uint8 array of shape (N,) or (N, rows, cols)."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def prepare_fashion_mnist(src=FASHION_MNIST, root=None):
    """Fashion-MNIST -> class folders of PNGs -> data.convert's shards (captions from the class
    names), plus the test split as a class folder for zero-shot. Done once, cached beside the
    built-in dataset. Returns {train, test}."""
    out = os.path.join(root or photographer.cache_root(), "fashion-mnist-v1")
    if os.path.isdir(out):
        shards = len([f for f in os.listdir(os.path.join(out, "train")) if f.endswith(".tar")])
        return {"train": os.path.join(out, "train", f"shard-{{00000..{shards - 1:05d}}}.tar"),
                "test": os.path.join(out, "test")}
    splits = {"train-images": read_fashion_mnist(src, "train"),
              "test": read_fashion_mnist(src, "t10k")}
    tmp = out + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for folder, (images, labels) in splits.items():
        write_class_folder(images, labels, os.path.join(tmp, folder))
    data.convert(os.path.join(tmp, "train-images"), os.path.join(tmp, "train"), template=CAPTION)
    shutil.rmtree(os.path.join(tmp, "train-images"))
    with open(os.path.join(tmp, "test", "templates.txt"), "w") as f:
        f.write(CAPTION + "\n")
    os.replace(tmp, out)  # all or nothing: a half-written dataset never looks finished
    return prepare_fashion_mnist(src, root)


def read_fashion_mnist(src, prefix):
    """(images (N, 28, 28) uint8, labels (N,)) of Fashion-MNIST's "train" or "t10k" (test) split in
    src."""
    path = os.path.join(src, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Fashion-MNIST in {src}: apt-get install dataset-fashion-mnist")
    return read_idx(path), read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"))


def write_class_folder(images, labels, folder, per_class=None):
    """Fashion-MNIST images as PNGs in one folder per class ("ankle_boot" for "ankle boot"), named
    by their index in the file; the first `per_class` of each class, or all."""
    count = [0] * len(FASHION_CLASSES)
    for name in FASHION_CLASSES:
        os.makedirs(os.path.join(folder, name.replace(" ", "_")))
    for i, (image, label) in enumerate(zip(images, labels)):
        if per_class is None or count[label] < per_class:
            class_dir = os.path.join(folder, FASHION_CLASSES[label].replace(" ", "_"))
            Image.fromarray(image).save(os.path.join(class_dir, f"{i:05d}.png"))
            count[label] += 1


def fashion_mnist_probe_split(per_class=1000, src=FASHION_MNIST, root=None):
    """The linear probe's training split for Fashion-MNIST (eval.py --linear-probe --train-dataset):
    the first `per_class` training images of each class as a class folder. Done once, cached beside
    the dataset."""
    out = os.path.join(root or photographer.cache_root(), f"fashion-mnist-v1-probe-{per_class}")
    if not os.path.isdir(out):
        images, labels = read_fashion_mnist(src, "train")
        tmp = out + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_class_folder(images, labels, tmp, per_class)
        os.replace(tmp, out)
    return out


def subject_kept(layout, ratio, sigma=0.2, n=2000, image_size=64, grid=8, seed=0):
    """The mean fraction of the subject's area that Gaussian masking keeps on a built-in layout,
    from the generator's placement of the subject and masking.keep_probability. Random masking keeps
    1 - ratio of it: the difference is how much centring can help there."""
    # photographer.render draws at twice the size
    rng, ss = np.random.default_rng(seed), 2 * image_size
    yy, xx = np.mgrid[0:ss, 0:ss] + 0.5
    cover = np.zeros((ss, ss))
    for _ in range(n):
        cx, cy, r = photographer.subject_disc(rng, ss, layout)
        cover += (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    cover = cover.reshape(grid, ss // grid, grid, ss // grid).sum((1, 3))  # per patch
    keep = np.asarray(masking.keep_probability(grid, ratio, "gaussian", sigma))
    return float((cover * keep).sum() / cover.sum())


# ----------------------------------------------------------------------------- where unmasked
# inference breaks


def patch_sets(grid, ratio, sigma, floor=0.01, sizes=(16, 36)):
    """The patch sets of inference_breakdown: {"central m": the m patches nearest the centre (those
    Gaussian masking keeps most often), for m = K (training's count) and `sizes`; "covered": those
    it keeps at least `floor` of the time (absent where that is every patch)}, and for each other
    patch the covered patch nearest to it (a dict)."""
    p = masking.keep_probability(grid, ratio, "gaussian", sigma).flatten()
    centre = masking.gaussian_pdf(grid, 1.0)  # radial: the same order as any sigma's
    order = centre.argsort(descending=True, stable=True)
    sets = {f"central {m}": order[:m].sort().values
            for m in sorted({masking.num_kept(grid, ratio), *sizes}) if m < grid * grid}
    covered = torch.nonzero(p >= floor).flatten()
    if len(covered) < grid * grid:
        sets["covered"] = covered
    yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    yx = yx.flatten(1).T.double()  # (N, 2) row and column of each patch
    nearest = {int(i): int(covered[(yx[covered] - yx[i]).norm(dim=1).argmin()])
               for i in torch.nonzero(p < floor).flatten()}
    return sets, nearest


@torch.no_grad()
def inference_breakdown(run_dir, test_dir, floor=0.01):
    """Zero-shot top-1 of a masked run's last checkpoint fed, for every test image: every patch;
    each patch set of patch_sets; every patch again, with each position kept less than `floor` of
    the time given the positional embedding of its nearest covered neighbour. If that last one
    recovers masked inference, never-trained positions broke unmasked inference; if only the
    smaller sets do, it is the extra patches (docs/results.md#sigma)."""
    with open(os.path.join(run_dir, "args.json")) as f:
        a = json.load(f)
    path = os.path.join(run_dir, "checkpoints", "epoch_latest.pt")
    model, tokenizer = checkpoint.load_checkpoint(path)

    def top1(patches=None):
        return zeroshot.evaluate_folder(model, tokenizer, test_dir, workers=1, quiet=True,
                                        patches=patches)["acc1"]

    sigma = a["sigma"] if a["mask"] == "gaussian" else 1e6  # random masking: a flat Gaussian
    sets, nearest = patch_sets(model.visual.grid_size, a["ratio"], sigma, floor)
    result = {"every patch": top1()} | {name: top1(keep) for name, keep in sets.items()}
    if nearest:
        pos = model.visual.positional_embedding  # (1 + N, D): row 0 is the class token's
        trained = pos.clone()
        for i, j in nearest.items():
            pos[1 + i] = trained[1 + j]
        result["every patch, nearest covered position"] = top1()
    return result


# ----------------------------------------------------------------------------- which images the
# centre prior helps: the test split cut by how centred each image is


def centred_parts(test_dir, out_dir, parts=3, measure="edge energy"):
    """The class-folder test split cut into `parts` folders of about as many images each, from
    the least to the most centred by `measure` (visualize.measure_set's share of content Gaussian
    masking keeps at 50%); each part has every class folder (some maybe empty, the labels stay
    the same), the split's classnames.txt and templates.txt, and links to its images. Made once
    in out_dir; returns [(folder, (lowest, highest) share in it)]."""
    per_image, _ = visualize.measure_set(test_dir)[measure]
    order = sorted(per_image, key=lambda name: per_image[name][1])  # least centred first
    classes = [e.name for e in os.scandir(test_dir) if e.is_dir()]
    result = []
    for k in range(parts):
        names = order[k * len(order) // parts:(k + 1) * len(order) // parts]
        folder = os.path.join(out_dir, f"part-{k + 1}-of-{parts}")
        if not os.path.isdir(folder):
            tmp = folder + f".tmp{os.getpid()}"
            for c in classes:
                os.makedirs(os.path.join(tmp, c))
            for extra in ("classnames.txt", "templates.txt"):
                if os.path.isfile(os.path.join(test_dir, extra)):
                    shutil.copy(os.path.join(test_dir, extra), tmp)
            for name in names:
                os.symlink(os.path.abspath(os.path.join(test_dir, name)), os.path.join(tmp, name))
            os.replace(tmp, folder)
        result.append((folder, (per_image[names[0]][1], per_image[names[-1]][1])))
    return result


@torch.no_grad()
def by_centredness(runs, test_dir, out_dir, parts=3):
    """Zero-shot top-1 of each run's last checkpoint on each part of centred_parts, every patch and
    (for a masked run) with its training mask, as a Markdown table: mean +- std over the seeds of
    each configuration (folders that differ only in -s<seed>)."""
    cut = centred_parts(test_dir, out_dir, parts)
    groups = {}
    for run in runs:
        with open(os.path.join(run, "args.json")) as f:
            a = json.load(f)
        model, tokenizer = checkpoint.load_checkpoint(
            os.path.join(run, "checkpoints", "epoch_latest.pt"))
        label = re.sub(r"-s\d+", "", os.path.basename(os.path.normpath(run)))
        for mask in ["none"] + [a["mask"]] * (a["mask"] != "none"):
            row = [zeroshot.evaluate_folder(model, tokenizer, folder, workers=1, quiet=True,
                                            mask=mask, ratio=a["ratio"], sigma=a["sigma"])["acc1"]
                   for folder, _ in cut]
            groups.setdefault(f"{label}, {'masked' if mask != 'none' else 'unmasked'}",
                              []).append(row)
    head = " | ".join(f"part {k + 1}: {lo:.3f}-{hi:.3f}" for k, (_, (lo, hi)) in enumerate(cut))
    lines = [f"| run, inference | {head} | seeds |", "|---|" + "---|" * (parts + 1)]
    for label, rows in groups.items():
        cells = " | ".join(mean_std(column) for column in zip(*rows))
        lines.append(f"| {label} | {cells} | {len(rows)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs
FULL_SIZE, PATCH = 64, 8  # the tiny preset: an 8 x 8 grid of patches
RECLIP_SIZES = (48, 32, 24)  # 36, 16 and 9 patches
# what each evaluation reports, as eval.py names it (CLIP_benchmark's names)
CLASSIFICATION = ("acc1", "mean_per_class_recall")
RETRIEVAL = tuple(f"{way}_retrieval_recall@{k}" for way in ("image", "text")
                  for k in zeroshot.RECALL_KS)


def budget_ratio(size):
    """The masking ratio that keeps as many patches of a 64 px image as a `size` px image has."""
    return 1 - (size // PATCH) ** 2 / (FULL_SIZE // PATCH) ** 2


def evals(run_dir):
    """The evaluation records of a run's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "zeroshot_top1" in r]


def finished(run_dir):
    """True once the run wrote its last epoch's checkpoint (after its last evaluation, if any)."""
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            epochs = json.load(f)["epochs"]
    except FileNotFoundError:
        return False
    return os.path.isfile(os.path.join(run_dir, "checkpoints", f"epoch_{epochs}.pt"))


def train(run_dir, flags, env):
    """train.py in a subprocess (output in run_dir/train.log): skipped if finished, resumed if
    interrupted."""
    log_dir, name = os.path.split(run_dir)
    if not finished(run_dir):
        interrupted = os.path.exists(os.path.join(run_dir, "checkpoints", "epoch_latest.pt"))
        resume = ["--resume", "latest"] if interrupted else []
        cmd = [str(c) for c in [sys.executable, os.path.join(HERE, "train.py"),
                                "--log-dir", log_dir, "--name", name, *flags, *resume]]
        os.makedirs(run_dir, exist_ok=True)
        print(" ".join(cmd), flush=True)
        with open(os.path.join(run_dir, "train.log"), "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                raise RuntimeError(f"{name} failed: see {run_dir}/train.log")


def scores(args, run_dir, env, masked=False, size=None):
    """{metric: value} of a finished run: zero-shot classification as train.py evaluated it after
    its last epoch, with inference unmasking or (masked) its training mask; retrieval, or another
    image size, by eval.py on its last checkpoint."""
    if args.retrieval_data or size:
        return evaluate(args, run_dir, env, masked, size)
    record, prefix = evals(run_dir)[-1], "zeroshot_masked" if masked else "zeroshot"
    return {"acc1": record[f"{prefix}_top1"],
            "mean_per_class_recall": record[f"{prefix}_mean_per_class_recall"]}


def evaluate(args, run_dir, env, masked=False, size=None):
    """eval.py's metrics for a run's last checkpoint (in a subprocess; kept in run_dir/eval-*.json):
    retrieval on args.retrieval_data, else zero-shot on args.test_dir; every patch, or the run's
    own mask (masked); at `size` px (positional embeddings resized) or the run's size."""
    with open(os.path.join(run_dir, "args.json")) as f:
        a = json.load(f)
    mask = ["--mask", a["mask"], "--ratio", a["ratio"], "--sigma", a["sigma"]] if masked else []
    task = ["--retrieval", args.retrieval_data] if args.retrieval_data else [
        "--dataset", args.test_dir]
    out = os.path.join(run_dir, f"eval-{task[0][2:]}-{'masked' if masked else 'unmasked'}"
                                + (f"-{size}px" if size else "") + ".json")
    if not os.path.isfile(out):
        cmd = [str(c) for c in [sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint",
                                os.path.join(run_dir, "checkpoints", "epoch_latest.pt"), *task,
                                *mask, *(["--image-size", size] if size else []), "--device",
                                "cpu", "--workers", 1, "--output", out]]
        with open(os.path.join(run_dir, "eval.log"), "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                raise RuntimeError(f"evaluating {run_dir} failed: see {run_dir}/eval.log")
    with open(out) as f:
        metrics = json.load(f)["metrics"]
    return {m: metrics[m] for m in (RETRIEVAL if args.retrieval_data else CLASSIFICATION)}


def common_flags(args, seed):
    """The train.py flags a run and its tuning share: model, batch size, seed and data."""
    return ["--model", "tiny", "--batch-size", args.batch_size, "--seed", seed, *args.data_flags]


def pretrain(args, run_dir, common, flags, env):
    """A pre-training run with `flags` (its masking or image size): args.epochs of args.samples
    samples at args.lr, warmed up over 5% of its steps."""
    steps = args.samples // args.batch_size * args.epochs
    train(run_dir, common + flags + ["--epochs", args.epochs, "--lr", args.lr,
                                     "--warmup", max(1, steps // 20),
                                     "--train-num-samples", args.samples], env)


def run_one(args, env, method, mask, ratio, seed, sigma=0.2):
    """{metric: (masked, unmasked, tuned)} of one pre-training run and its unmasked tuning; sigma:
    Gaussian masking's (the paper's 0.2 keeps the run folder's name of before)."""
    name = f"{args.dataset}-{method}-{ratio:g}" + (f"-sigma{sigma:g}" if sigma != 0.2 else "")
    run_dir = os.path.join(args.log_dir, f"{name}-s{seed}")
    common = common_flags(args, seed)
    pretrain(args, run_dir, common, ["--mask", mask, "--ratio", ratio, "--sigma", sigma], env)
    unmasked = scores(args, run_dir, env)
    if mask == "none":
        result = {m: (None, v, None) for m, v in unmasked.items()}
    else:
        masked = scores(args, run_dir, env, masked=True)
        tuned = tune(args, run_dir, common, env)
        result = {m: (masked[m], unmasked[m], tuned[m]) for m in unmasked}
    print(f"{os.path.basename(run_dir)}: masked / unmasked / tuned = {result}", flush=True)
    return result


def tune(args, run_dir, common, env):
    """The unmasked tuning of a pre-trained run, in run_dir-tuned: its weights, args.tune_samples
    samples, no masking; its scores."""
    pretrained = os.path.join(run_dir, "checkpoints", "epoch_latest.pt")
    train(run_dir + "-tuned", common + ["--pretrained", pretrained, "--mask", "none",
                                        "--epochs", 1, "--lr", args.tune_lr, "--warmup", 3,
                                        "--train-num-samples", args.tune_samples], env)
    return scores(args, run_dir + "-tuned", env)


def run_reclip(args, env, size, seed):
    """{metric: (None, unmasked, tuned)} of RECLIP: pre-trained at `size` px, evaluated and tuned
    at 64 px."""
    run_dir = os.path.join(args.log_dir, f"{args.dataset}-reclip-{size}px-s{seed}")
    common = common_flags(args, seed)
    pretrain(args, run_dir, common, ["--mask", "none", "--image-size", size], env)
    full = scores(args, run_dir, env, size=FULL_SIZE)
    tuned = tune(args, run_dir, common + ["--image-size", FULL_SIZE], env)
    result = {m: (None, full[m], tuned[m]) for m in full}
    print(f"{os.path.basename(run_dir)}: unmasked at {FULL_SIZE} px / tuned = {result}",
          flush=True)
    return result


# ----------------------------------------------------------------------------- beside OpenCLIP's
# own trainer (--peer openclip): the tiny preset as an OpenCLIP model config, CLIP's BPE, the same
# recipe and shards in both trainers, both evaluated by eval.py
PEER_MODEL = "gdmflip-tiny"  # the name the tiny preset is registered under in OpenCLIP
PEER_BPE = "import open_clip, os; print(os.path.join(os.path.dirname(open_clip.__file__), " \
           "'bpe_simple_vocab_16e6.txt.gz'))"


def openclip_main(argv):
    """In the peer's Python: OpenCLIP's trainer, open_clip_train.main, with the model config file
    argv[0] registered (open_clip.add_model_config) and argv[1:] as its flags."""
    import open_clip
    from open_clip_train.main import main as openclip_train

    open_clip.add_model_config(argv[0])
    openclip_train(argv[1:])


def train_main(argv):
    """In the peer's Python: our trainer, train.py with argv[1:] as its flags (argv[0] its path)."""
    import train

    train.main(argv[1:])


def openclip_top1(config, checkpoint, folder, classnames, templates):
    """In the peer's Python: zero-shot top-1 of an OpenCLIP checkpoint on a class folder by
    OpenCLIP's own code (its preprocessing, tokenizer and build_zero_shot_classifier), to hold
    eval.py's figure for the same checkpoint against."""
    import open_clip
    from torchvision.datasets import ImageFolder as TorchvisionFolder

    open_clip.add_model_config(config)
    name = os.path.splitext(os.path.basename(config))[0]
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint,
                                                                 precision="fp32")
    classifier = open_clip.build_zero_shot_classifier(
        model.eval(), tokenizer=open_clip.get_tokenizer(name), classnames=classnames,
        templates=[t.format for t in templates], device="cpu")
    loader = torch.utils.data.DataLoader(TorchvisionFolder(folder, preprocess), batch_size=256)
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            correct += int(((features @ classifier).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def in_peer(args, function, *arguments, log=None):
    """repro.`function`(*arguments) run by the peer's Python (--peer-python, the one OpenCLIP is
    installed in), output to `log` (else returned)."""
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import repro; "
            f"print(repro.{function}(*{list(arguments)!r}))")
    if log is None:  # the value: the last line printed
        done = subprocess.run([args.peer_python, "-c", code], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{function} failed: "
                               + (done.stderr.strip().splitlines() or ["no output"])[-1])
        return done.stdout.strip().splitlines()[-1]
    with open(log, "a") as f:
        if subprocess.run([args.peer_python, "-c", code], stdout=f, stderr=subprocess.STDOUT,
                          env=args.env).returncode:
            raise RuntimeError(f"{function} failed: see {log}")


def timed(run_dir, start):
    """Seconds a run's trainer took, from start() the first time (kept in run_dir/wall.json)."""
    path = os.path.join(run_dir, "wall.json")
    if not os.path.isfile(path):
        t0 = time.time()
        start()
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"seconds": time.time() - t0}, f)
    with open(path) as f:
        return json.load(f)["seconds"]


def peer_recipe(args, seed):
    """The recipe both trainers get, in the flags both spell the same way (OpenCLIP's)."""
    steps = args.samples // args.batch_size * args.epochs
    return ["--train-data", args.train_data, "--train-num-samples", args.samples, "--batch-size",
            args.batch_size, "--epochs", args.epochs, "--lr", args.lr, "--wd", 0.2, "--warmup",
            max(1, steps // 20), "--beta1", 0.9, "--beta2", 0.98, "--eps", 1e-6, "--precision",
            "fp32", "--workers", 1, "--seed", seed]


def peer_run(args, trainer, mask, ratio, seed):
    """One run of either trainer: (run folder, final checkpoint, wall seconds, samples/s: the
    median of its log lines)."""
    name = f"{args.dataset}-{trainer}-{mask}-{ratio:g}-s{seed}"
    run_dir = os.path.join(args.log_dir, "peer", name)
    recipe = [str(c) for c in peer_recipe(args, seed)]
    log = os.path.join(args.log_dir, "peer", name + ".log")
    checkpoint = os.path.join(run_dir, "checkpoints", f"epoch_{args.epochs}.pt")
    if not os.path.isfile(os.path.join(run_dir, "wall.json")):  # not finished: start it afresh
        shutil.rmtree(run_dir, ignore_errors=True)  # (OpenCLIP will not write into a used name)
    if trainer == "openclip":
        flags = [args.peer_config, *recipe, "--dataset-type", "webdataset", "--model", PEER_MODEL,
                 "--force-patch-dropout", str(ratio), "--logs", os.path.dirname(run_dir),
                 "--name", name, "--save-frequency", str(args.epochs), "--zeroshot-frequency", "0",
                 "--log-every-n-steps", "10"]
        seconds = timed(run_dir, lambda: in_peer(args, "openclip_main", flags, log=log))
        with open(os.path.join(run_dir, "out.log")) as f:
            speeds = [float(v) for v in re.findall(r"([\d.]+)/s/gpu", f.read())]
    else:
        flags = [os.path.join(HERE, "train.py"), *recipe, "--model", "tiny", "--tokenizer",
                 args.peer_bpe, "--mask", mask, "--ratio", str(ratio), "--log-dir",
                 os.path.dirname(run_dir), "--name", name, "--log-every", "10"]
        seconds = timed(run_dir, lambda: in_peer(args, "train_main", flags, log=log))
        speeds = [r["samples_per_s"] for r in visualize.read_metrics(
            os.path.join(run_dir, "metrics.jsonl")) if r.get("samples_per_s")]
    return run_dir, checkpoint, seconds, statistics.median(speeds)


def peer_table(args):
    """Zero-shot top-1 and mean per-class recall (eval.py, fp32) of OpenCLIP's trainer and ours at
    one recipe, mean +- std over seeds, with each trainer's samples/s and wall time; and OpenCLIP's
    own zero-shot top-1 of its first checkpoint beside eval.py's."""
    found = subprocess.run([args.peer_python, "-c", PEER_BPE], capture_output=True, text=True)
    if found.returncode:
        raise FileNotFoundError(f"--peer openclip needs OpenCLIP in {args.peer_python} (pip install "
                                "'open_clip_torch[training]' there): "
                                + (found.stderr.strip().splitlines() or ["no output"])[-1])
    args.peer_bpe = found.stdout.strip()  # CLIP's BPE, as OpenCLIP ships it
    os.makedirs(os.path.join(args.log_dir, "peer"), exist_ok=True)
    args.peer_config = os.path.join(args.log_dir, "peer", PEER_MODEL + ".json")
    tiny = replace(M.PRESETS["tiny"], vocab_size=49408)  # CLIP's BPE
    with open(args.peer_config, "w") as f:
        json.dump(export.openclip_model_config(tiny), f, indent=1)
    ratio = args.ratios[0]
    runs = [("OpenCLIP, CLIP", "openclip", "none", 0.0),
            (f"OpenCLIP, FLIP {ratio:.0%} (--force-patch-dropout)", "openclip", "random", ratio),
            ("ours, CLIP", "ours", "none", 0.0), (f"ours, FLIP {ratio:.0%}", "ours", "random", ratio),
            (f"ours, GDM-FLIP {ratio:.0%}", "ours", "gaussian", ratio)]
    rows, first = {}, None
    for seed in args.seeds:  # the trainers alternate: their speeds are measured in one sitting
        for label, trainer, mask, r in runs:
            run_dir, checkpoint, seconds, speed = peer_run(args, trainer, mask, r, seed)
            flags = ["--model", "tiny", "--tokenizer", args.peer_bpe, "--precision", "fp32"]
            metrics = evaluate_checkpoint(args, run_dir, checkpoint, flags)
            rows.setdefault(label, []).append((metrics, speed, seconds))
            first = first or (trainer == "openclip" and (checkpoint, metrics["acc1"]))
    lines = ["| trainer, method | top-1 | mean per-class recall | samples/s | wall time (min) |",
             "|---|---|---|---|---|"]
    for label, results in rows.items():
        metrics, speeds, seconds = zip(*results)
        cells = [mean_std([m["acc1"] for m in metrics]),
                 mean_std([m["mean_per_class_recall"] for m in metrics]),
                 f"{statistics.median(speeds):.0f}",
                 f"{statistics.mean(seconds) / 60:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    folder = data.ImageFolder(args.test_dir, lambda img: img)
    classnames = zeroshot.folder_classnames(args.test_dir, folder.classes)
    listed = os.path.join(args.test_dir, "templates.txt")
    templates = zeroshot.read_lines(listed if os.path.isfile(listed) else zeroshot.OPENAI_TEMPLATES)
    theirs = float(in_peer(args, "openclip_top1", args.peer_config, first[0], args.test_dir,
                           classnames, templates))
    return "\n".join(lines) + (f"\n\nOpenCLIP's own zero-shot top-1 of {first[0]}: {theirs:.4f}; "
                               f"eval.py's: {first[1]:.4f}\n")


def evaluate_checkpoint(args, run_dir, checkpoint, flags):
    """eval.py's zero-shot metrics of a checkpoint on args.test_dir (kept in run_dir/eval.json)."""
    out = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(out):
        cmd = [sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint", checkpoint,
               "--dataset", args.test_dir, "--device", "cpu", "--workers", "1", "--output", out,
               *flags]
        with open(os.path.join(run_dir, "eval.log"), "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"evaluating {checkpoint} failed: see {run_dir}/eval.log")
    with open(out) as f:
        return json.load(f)["metrics"]


def mean_std(values):
    """'mean +- std' in percent over seeds, '-' where a column does not apply."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}" + spread


def table(rows):
    """rows: {label: [(masked, unmasked, tuned) per seed]} -> a Markdown table in the paper's
    format."""
    lines = ["| method | masked inference | unmasked inference | after tuning |",
             "|---|---|---|---|"]
    for label, results in rows.items():
        cells = " | ".join(mean_std(column) for column in zip(*results))
        lines.append(f"| {label} | " + cells + " |")
    return "\n".join(lines)


def breakdown_table(runs, test_dirs):
    """inference_breakdown of each run folder as a Markdown table, mean +- std over the seeds of
    each configuration (folders that differ only in their -s<seed> suffix)."""
    groups = {}
    for run, test_dir in zip(runs, test_dirs):
        label = os.path.basename(os.path.normpath(run))
        groups.setdefault(label.rsplit("-s", 1)[0], []).append(inference_breakdown(run, test_dir))
    columns = ["every patch", "central K", "central 16", "central 36", "covered",
               "every patch, nearest covered position"]
    lines = ["| run | " + " | ".join(columns) + " | seeds |", "|---|" + "---|" * (len(columns) + 1)]
    for label, results in groups.items():
        cells = []
        for column in columns:
            if column == "central K":  # training's own count, the first central set
                column = next(k for k in results[0] if k.startswith("central"))
            # "covered" is absent where every patch is: then it is "every patch"
            cells.append(mean_std([r.get(column, r["every patch"] if column == "covered" else None)
                                   for r in results]))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(results)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = data.OneLineParser(prog="repro.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="centered", help="built-in dataset with centred subjects "
                   "(centered), its uniform or edge layout (controls), fashion-mnist; with "
                   "--train-data, the name its runs and tables go by (e.g. caltech101)")
    p.add_argument("--train-data", help="any training shards (data.py convert's), brace patterns "
                   "joined with '::', instead of a --dataset of ours")
    p.add_argument("--train-num-samples", type=int, help="with --train-data: samples per epoch")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--zeroshot-data", type=data.existing("directory"), help="with "
                      "--train-data: the class-folder test split for zero-shot classification")
    task.add_argument("--retrieval-data", help="with --train-data: image-caption test shards for "
                      "zero-shot retrieval (several captions per image, one a line)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9],
                   help="masking ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds (initialisation, data order, masks)")
    p.add_argument("--epochs", type=int, default=2,
                   help=f"pre-training epochs (of {SAMPLES} samples, or --train-num-samples)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of pre-training")
    p.add_argument("--tune-lr", type=float, default=1e-4,
                   help="peak learning rate of the unmasked tuning")
    p.add_argument("--tune-samples", type=int, help=f"samples of the unmasked tuning (default: "
                   f"{TUNE_SAMPLES} on our datasets, one epoch of --train-data, as the paper)")
    p.add_argument("--reclip", action="store_true", help="RECLIP at 48, 32, 24 px beside FLIP and "
                   "GDM-FLIP at the same patch budgets (43.75%%, 75%%, 85.9%% masking) instead of "
                   "--ratios")
    p.add_argument("--reclip-sizes", type=int, nargs="+", default=[], help="RECLIP at these image "
                   "sizes (multiples of 8) beside --ratios' rows, e.g. 48 32 (36 and 16 patches "
                   "against 32 and 16 at 50%% and 75%%)")
    p.add_argument("--sigmas", type=float, nargs="+", help="GDM-FLIP at each of these sigmas (the "
                   "sweep of docs/results.md#sigma) beside FLIP at --ratios, no CLIP row")
    p.add_argument("--breakdown", nargs="+", metavar="RUN", help="no training: zero-shot top-1 of "
                   "these masked runs fed every patch, the central K (training's count), 16 and "
                   "36, the covered patches, and every patch with covered positions "
                   "(inference_breakdown)")
    p.add_argument("--no-distractors", action="store_true", help="with --breakdown: on the test "
                   "split of the same images without the small shapes along the edges")
    p.add_argument("--by-centredness", nargs="+", metavar="RUN", help="no training: zero-shot "
                   "top-1 of these runs on --zeroshot-data cut in three, from its least to its "
                   "most centred images by edge energy (centred_parts)")
    p.add_argument("--peer", choices=["openclip"], help="OpenCLIP's own trainer beside ours at one "
                   "recipe (fp32, CLIP's BPE, the first of --ratios) on --train-data, evaluated on "
                   "--zeroshot-data by eval.py: CLIP and FLIP in both, GDM-FLIP in ours")
    p.add_argument("--peer-python", default=sys.executable, help="with --peer: the Python that "
                   "has OpenCLIP (pip install 'open_clip_torch[training]'); both trainers run in "
                   "it, so that they time the same torch")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each with cores/jobs threads")
    p.add_argument("--log-dir", default="logs/repro", help="where the runs go")
    args = p.parse_args(argv)
    ours = [*photographer.LAYOUTS, "fashion-mnist"]
    if args.by_centredness:
        if not args.zeroshot_data:
            p.error("--by-centredness needs the --zeroshot-data its runs were evaluated on")
        return args
    if args.peer and not (args.train_data and args.train_num_samples and args.zeroshot_data):
        p.error("--peer needs --train-data, --train-num-samples and --zeroshot-data")
    if args.train_data:
        if args.dataset in ours:
            p.error(f"--dataset names the runs of --train-data: give it a name of its own, not "
                    f"{args.dataset!r} (e.g. caltech101)")
        if not args.train_num_samples or not (args.zeroshot_data or args.retrieval_data):
            p.error("--train-data needs --train-num-samples and --zeroshot-data or "
                    "--retrieval-data")
    elif args.dataset not in ours or args.zeroshot_data or args.retrieval_data:
        p.error(f"--dataset must be one of {', '.join(ours)}, or pass --train-data with "
                "--train-num-samples and --zeroshot-data or --retrieval-data")
    if any(size % PATCH or not 0 < size < FULL_SIZE for size in args.reclip_sizes):
        p.error(f"--reclip-sizes must be multiples of {PATCH} under {FULL_SIZE}, got "
                f"{args.reclip_sizes}")
    return args


def prepare_task(args):
    """Settle on args what every run shares: data_flags (train.py's data flags), test_dir (zero-shot
    classification) or retrieval_data, samples (per epoch) and tune_samples."""
    args.samples, args.test_dir = SAMPLES, args.zeroshot_data
    if args.train_data:
        args.samples = args.train_num_samples
        args.data_flags = ["--train-data", args.train_data]
        if args.zeroshot_data:  # train.py evaluates it every fifth of the run and at the end
            args.data_flags += ["--zeroshot-data", args.zeroshot_data,
                                "--zeroshot-frequency", max(1, args.epochs // 5)]
    elif args.dataset == "fashion-mnist":
        fmnist = prepare_fashion_mnist()
        args.data_flags = ["--train-data", fmnist["train"], "--zeroshot-data", fmnist["test"]]
        args.test_dir = fmnist["test"]
    else:
        args.data_flags = ["--builtin-layout", args.dataset]
        args.test_dir = photographer.builtin_dataset(args.dataset)["test"]
    args.tune_samples = args.tune_samples or (args.samples if args.train_data else TUNE_SAMPLES)


def planned_runs(args):
    """[(label, method, mask, ratio or RECLIP's size, sigma)] of the table's rows, in order."""
    masked = [("FLIP", "flip", "random"), ("GDM-FLIP", "gdmflip", "gaussian")]
    if args.reclip:  # per budget: RECLIP at that size, then masking that keeps as many patches
        runs = [("CLIP", "clip", "none", 0.0)] + [
            row for size in RECLIP_SIZES
            for row in [(f"RECLIP {size} px", "reclip", "none", size)] + [
                (f"{label} {budget_ratio(size):.2%}", method, mask, budget_ratio(size))
                for label, method, mask in masked]]
    elif args.sigmas:  # per ratio: FLIP, then GDM-FLIP at each sigma
        runs = [row for ratio in args.ratios for row in [(f"FLIP {ratio:.1%}", "flip", "random",
                                                          ratio, 0.2)] + [
            (f"GDM-FLIP {ratio:.1%} sigma {s:g}", "gdmflip", "gaussian", ratio, s)
            for s in args.sigmas]]
    else:
        runs = [("CLIP", "clip", "none", 0.0)] + [(f"{label} {ratio:.0%}", method, mask, ratio)
                                                  for ratio in args.ratios
                                                  for label, method, mask in masked] + [
            (f"RECLIP {size} px ({(size // PATCH) ** 2} patches)", "reclip", "none", size)
            for size in args.reclip_sizes]
    return [run if len(run) == 5 else (*run, 0.2) for run in runs]  # (label, ..., value, sigma)


def main(argv=None):
    args = parse_args(argv)
    if args.breakdown:
        test_dirs = []
        for run in args.breakdown:
            try:
                with open(os.path.join(run, "args.json")) as f:
                    run_args = json.load(f)
            except (OSError, ValueError):
                run_args = {}
            # a run on --train-data records the default layout too, yet never saw it
            if run_args.get("train_data") is not None or "builtin_layout" not in run_args:
                sys.exit(f"repro.py: error: {run} is not a run on the built-in dataset "
                         "(no args.json with builtin_layout and no --train-data)")
            test_dirs.append(photographer.builtin_dataset(
                run_args["builtin_layout"], distractors=not args.no_distractors)["test"])
        print(breakdown_table(args.breakdown, test_dirs))
        return
    if args.by_centredness:
        out_dir = os.path.join(args.log_dir, "by-centredness",
                               os.path.basename(os.path.normpath(args.zeroshot_data)))
        print(by_centredness(args.by_centredness, args.zeroshot_data, out_dir))
        return
    env = dict(os.environ)
    # share the cores; a small model gains more from parallel runs than from threads
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    args.env = env
    try:
        prepare_task(args)
        if args.peer:  # one run at a time: the trainers' speeds are compared
            result = peer_table(args)
            print(result)
            with open(os.path.join(args.log_dir, f"{args.dataset}-peer-table.md"), "w") as f:
                f.write(result)
            return
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"repro.py: error: {e}")

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {label: [pool.submit(run_reclip, args, env, value, s) if method == "reclip"
                           else pool.submit(run_one, args, env, method, mask, value, s, sigma)
                           for s in args.seeds]
                   for label, method, mask, value, sigma in planned_runs(args)}
        rows = {label: [f.result() for f in fs] for label, fs in futures.items()}
    what = "zero-shot retrieval" if args.retrieval_data else "zero-shot classification"
    result = (f"{what} (%) on the {args.dataset} test split, seeds {args.seeds}, {args.epochs} "
              f"epochs of {args.samples} samples, {(time.time() - t0) / 60:.0f} min\n")
    for metric in RETRIEVAL if args.retrieval_data else CLASSIFICATION:
        metric_rows = {label: [r[metric] for r in results] for label, results in rows.items()}
        result += f"\n{metric}:\n\n{table(metric_rows)}\n"
    ratios = [budget_ratio(size) for size in RECLIP_SIZES] if args.reclip else args.ratios
    if args.dataset in photographer.LAYOUTS:
        kept = [f"{r:.0%} masking {subject_kept(args.dataset, r):.2f} vs {1 - r:.2f}"
                for r in ratios]
        result += ("\nshare of the subject's area kept, GDM-FLIP against FLIP: "
                   + ", ".join(kept) + "\n")
    print("\n" + result)
    kind = "-reclip" if args.reclip else "-sigmas" if args.sigmas else ""
    table_file = f"{args.dataset}{kind}-table.md"
    with open(os.path.join(args.log_dir, table_file), "w") as f:
        f.write(result)


if __name__ == "__main__":
    main()
