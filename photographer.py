"""
The built-in dataset: subjects placed as a photographer would place them, so GDM-FLIP's centred
masking has something to find on a laptop CPU with no data.

Each 64 px image shows one coloured shape (36 classes: 6 colours x 6 shapes) on a textured
background, with 2-4 small shapes of other classes along the edges as distractors; the caption names
the subject. Three layouts:
- "centered": the subject near the centre, as in most photos (the case GDM-FLIP is built for);
- "uniform": anywhere its whole disc fits (a control);
- "edge": against one side (the control where centring should hurt).

    python photographer.py [--layout uniform|edge]  # generate (once, cached) and print the paths
    d = builtin_dataset("centered")  # {"train": shard pattern, "test": class folders, ...}

Generated once into $GDMFLIP_DATA or ~/.cache/gdm-flip/, one folder per set of parameters; delete it
to regenerate. train.py, repro.py and this script build the same dataset for the same parameters.
"""

import io
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

import data

SHAPES = ("circle", "cross", "heart", "square", "star", "triangle")
# saturated hues over a desaturated background
COLOURS = {"blue": (40, 90, 230), "green": (30, 170, 60), "orange": (250, 140, 20),
           "purple": (150, 60, 200), "red": (220, 30, 40), "yellow": (245, 215, 30)}
# 36, sorted: both lists are alphabetical
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]
# subject diameter / image side: big enough for a 64 px, patch-8 ViT to learn in minutes
SUBJECT_SIZE = (0.35, 0.55)
DISTRACTOR_SIZE = (0.10, 0.18)
# std of the subject centre around the image centre, in image sides ("as a photographer would")
CENTRED_JITTER = 0.08
CAPTIONS = ("a photo of {a} {}", "a picture of the {}", "{a} {}", "{}", "an image showing {a} {}",
            "a close-up of the {}", "{a} {} on a textured background",
            "there is {a} {} in this picture", "the {} among small shapes",
            "a photograph of the {}")
LAYOUT_CAPTIONS = {"centered": ("{a} {} in the middle of the frame",
                                "{a} {} in the centre of the photo"),
                   "uniform": ("{a} {} somewhere in the frame",),
                   "edge": ("{a} {} at the edge of the frame", "{a} {} off to one side")}
# where the subject goes: near the centre, anywhere, against one edge
LAYOUTS = tuple(LAYOUT_CAPTIONS)
# zero-shot prompts
TEMPLATES = ("a photo of the {}.", "a picture of the {}.", "the {}.", "a close-up of the {}.")
GENERATOR_VERSION = 2  # bump when the images or captions change, so old caches are not reused
SHARD_SIZE = 1000
NUM_TRAIN, NUM_TEST = 20_000, 2_000  # the default size, whichever command generates it


def shape_points(shape, cx, cy, r, angle):
    """Polygon of a shape of radius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a) * 1.05, math.sin(a) * 1.05 + 0.15)
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [(math.cos(a) * (1 if k % 2 == 0 else 0.45),
                math.sin(a) * (1 if k % 2 == 0 else 0.45))
               for k, a in enumerate(-math.pi / 2 + math.pi / 5 * np.arange(10))]
    elif shape == "cross":
        t = 0.33  # half-width of an arm
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
               (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif shape == "heart":  # the classic parametric heart, scaled into the unit disc
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        ys = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 16
        pts = list(zip(np.sin(t) ** 3, ys))
    else:  # circle
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def textured_background(size, rng):
    """(size, size, 3) uint8: a muted base colour, smooth blotches and fine grain."""
    base = rng.uniform(70, 180) + rng.uniform(-20, 20, 3)  # grey with a slight tint
    blotches = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    blotches = blotches.resize((size, size), Image.BICUBIC)
    smooth = np.asarray(blotches, dtype=np.float32) / 255 - 0.5  # (size, size, 3) in [-0.5, 0.5]
    grain = rng.normal(0, 8, (size, size, 1))
    return np.clip(base + 50 * smooth + grain, 0, 255).astype(np.uint8)


def render(rng, label, size, layout, distractors=True):
    """One size x size PIL image of class `label`: the subject (placed as `layout` says) and 2-4
    small distractors along the edges. distractors=False leaves them out but draws the same
    random numbers: the same image without them (the control of docs/results.md#sigma)."""
    ss = 2 * size  # draw at twice the size, then average 2x2 blocks: smooth edges
    img = Image.fromarray(textured_background(size, rng)).resize((ss, ss), Image.NEAREST)
    draw = ImageDraw.Draw(img)

    def put(colour, shape, cx, cy, r, show=True):
        jittered = np.array(COLOURS[colour]) + rng.integers(-12, 13, 3)
        fill = tuple(int(v) for v in np.clip(jittered, 0, 255))
        if shape == "circle":
            if show:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            points = shape_points(shape, cx, cy, r, rng.uniform(-0.25, 0.25))
            if show:
                draw.polygon(points, fill=fill)

    # distractors: other classes, small, in a band along a random edge
    for _ in range(rng.integers(2, 5)):
        colour, shape = CLASSES[(label + rng.integers(1, len(CLASSES))) % len(CLASSES)]
        r = rng.uniform(*DISTRACTOR_SIZE) * ss / 2
        put(colour, shape, *near_a_side(rng, ss, r, 0.06), r, show=distractors)
    colour, shape = CLASSES[label]
    put(colour, shape, *subject_disc(rng, ss, layout))
    return img.reduce(2)


def subject_disc(rng, ss, layout):
    """(cx, cy, r) of the subject in an ss x ss image, as `layout` places it; the disc always fits
    in the frame."""
    r = rng.uniform(*SUBJECT_SIZE) * ss / 2
    if layout == "centered":
        cx, cy = np.clip(ss / 2 + rng.normal(0, CENTRED_JITTER * ss, 2), r, ss - r)
    elif layout == "uniform":
        cx, cy = rng.uniform(r, ss - r, 2)
    else:  # edge: touching, or nearly, one of the four sides
        cx, cy = near_a_side(rng, ss, r, 0.04)
    return cx, cy, r


def near_a_side(rng, ss, r, band):
    """Centre (cx, cy) of a disc of radius r at a random place along a random side of an ss x ss
    image, at most band * ss away from touching it."""
    along, inward = rng.uniform(r, ss - r), r + rng.uniform(0, band * ss)
    sides = [(along, inward), (along, ss - inward), (inward, along), (ss - inward, along)]
    return sides[rng.integers(4)]


def caption(rng, label, layout):
    name = " ".join(CLASSES[label])
    options = CAPTIONS + LAYOUT_CAPTIONS[layout]
    return options[rng.integers(len(options))].format(name, a="an" if name[0] in "aeiou" else "a")


def jpeg_bytes(img, quality=90):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def generate_part(job):
    """One shard of the train split or one chunk of the test split; seeded by (seed, split, index)
    alone, so the bytes do not depend on how the jobs are spread over processes."""
    out, split, index, start, count, size, layout, seed, distractors = job
    rng = np.random.default_rng([seed, split == "test", index])
    if split == "train":
        shard = os.path.join(out, "train", f"shard-{index:04d}.tar")
        with wds.TarWriter(shard, encoder=False, mtime=0) as tar:
            for i in range(start, start + count):
                label = int(rng.integers(len(CLASSES)))
                img = render(rng, label, size, layout, distractors)
                tar.write({"__key__": f"{i:08d}", "jpg": jpeg_bytes(img),
                           "txt": caption(rng, label, layout).encode(), "cls": str(label).encode()})
    else:
        for i in range(start, start + count):
            label = i % len(CLASSES)  # balanced
            folder = os.path.join(out, "test", "_".join(CLASSES[label]))
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(jpeg_bytes(render(rng, label, size, layout, distractors)))


def cache_root():
    """Where generated and converted datasets are kept: $GDMFLIP_DATA, or ~/.cache/gdm-flip."""
    return (os.environ.get("GDMFLIP_DATA")
            or os.path.join(os.path.expanduser("~"), ".cache", "gdm-flip"))


def builtin_dataset(layout="centered", root=None, num_train=NUM_TRAIN, num_test=NUM_TEST,
                    image_size=64, seed=0, distractors=True):
    """Generate (once; cached under root, default $GDMFLIP_DATA or ~/.cache/gdm-flip) the built-in
    dataset and return {"train": shard pattern, "test": ImageFolder dir, "classnames": [...],
    "templates": [...]}. "centered" puts the subject near the centre as a photographer would;
    "uniform" anywhere its whole disc fits (which still covers the centre most often); "edge"
    against one side (the control where centring should hurt). distractors=False: the same images
    without the small shapes along the edges."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if num_train < 1 or num_test < 1:
        raise ValueError("num_train and num_test must be positive")
    root = root or cache_root()
    name = (f"photographer-{layout}-{num_train}-{num_test}-{image_size}px-seed{seed}"
            f"{'' if distractors else '-nodistractors'}-v{GENERATOR_VERSION}")
    out = os.path.join(root, name)
    num_shards = math.ceil(num_train / SHARD_SIZE)
    result = {"train": os.path.join(out, "train", "shard-{0000..%04d}.tar" % (num_shards - 1)),
              "test": os.path.join(out, "test"), "classnames": [" ".join(c) for c in CLASSES],
              "templates": list(TEMPLATES)}
    if os.path.isdir(out):
        return result
    # build in a temporary folder and rename it when complete: an interrupted run leaves no half
    # dataset behind
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
    jobs = [(tmp, "train", k, k * SHARD_SIZE, min(SHARD_SIZE, num_train - k * SHARD_SIZE),
             image_size, layout, seed, distractors) for k in range(num_shards)]
    jobs += [(tmp, "test", k, k * SHARD_SIZE, min(SHARD_SIZE, num_test - k * SHARD_SIZE),
              image_size, layout, seed, distractors)
             for k in range(math.ceil(num_test / SHARD_SIZE))]
    processes = min(os.cpu_count() or 1, len(jobs))
    t0 = time.time()
    try:
        if processes > 1:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with context.Pool(processes) as pool:
                pool.map(generate_part, jobs, chunksize=1)
        else:
            list(map(generate_part, jobs))
        os.rename(tmp, out)
    except OSError:
        if not os.path.isdir(out):  # not "another process finished first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"photographer.py: generated the built-in dataset ({num_train} train, {num_test} test "
          f"images, {layout}) in {out} in {time.time() - t0:.1f} s", file=sys.stderr)
    return result


def main(argv=None):
    p = data.OneLineParser(prog="photographer.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--layout", default="centered", choices=LAYOUTS, help="where the subject goes")
    p.add_argument("--root", default=None,
                   help="cache folder (default: $GDMFLIP_DATA or ~/.cache/gdm-flip)")
    p.add_argument("--num-train", type=int, default=NUM_TRAIN, help="training images")
    p.add_argument("--num-test", type=int, default=NUM_TEST,
                   help="test images (balanced over the 36 classes)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--no-distractors", action="store_true",
                   help="the same images without the small shapes along the edges")
    args = p.parse_args(argv)
    try:
        d = builtin_dataset(args.layout, args.root, args.num_train, args.num_test, args.image_size,
                            args.seed, not args.no_distractors)
    except (OSError, ValueError) as e:
        sys.exit(f"photographer.py: error: {e}")
    print(f"train: {d['train']}\ntest:  {d['test']}")
    print(f"{len(d['classnames'])} classes: {', '.join(d['classnames'])}")


if __name__ == "__main__":
    main()
