"""The contract of eval.py: CLIP_benchmark's metrics on cases worked out by hand, the
prompt-ensemble classifier, masked inference, loading this project's and OpenCLIP's checkpoints, and
the command line."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import data
import eval as zeroshot  # `eval` would shadow the builtin
import masking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


# ----------------------------------------------------------------------------- stand-ins with known
# features


class LookupTokenizer:
    """Each distinct string gets an id, in order of first appearance: (B,) texts -> (B, 1) ids."""

    def __init__(self):
        self.ids = {}

    def __call__(self, texts):
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])


class FeatureModel(nn.Module):
    """encode_image returns the "image" itself (a (B, E) feature vector); encode_text looks up a
    fixed table."""

    def __init__(self, text_table, grid_size=4):
        super().__init__()
        self.text_table = text_table  # (V, E), un-normalised on purpose
        self.visual = nn.Module()
        self.visual.grid_size = grid_size

    def encode_image(self, images, keep=None):
        return images

    def encode_text(self, tokens):
        return self.text_table[tokens[:, 0]]


def classify(features, labels, classifier, readable=None):
    readable = torch.ones(len(labels), dtype=torch.bool) if readable is None else readable
    # as data.ImageFolder yields
    loader = DataLoader(TensorDataset(features, labels, readable), batch_size=4)
    return zeroshot.zero_shot_classification(FeatureModel(None), classifier, loader, "cpu",
                                             quiet=True)


# ----------------------------------------------------------------------------- metrics


def test_data_files_hold_the_1000_imagenet_names_and_80_openai_templates():
    names = zeroshot.read_lines(zeroshot.IMAGENET_CLASSNAMES)
    templates = zeroshot.read_lines(zeroshot.OPENAI_TEMPLATES)
    assert len(names) == 1000 and len(templates) == len(set(templates)) == 80
    assert (names[0], names[1], names[281], names[409], names[999]) == (
        # WordNet-id order: n01440764 is first
        "tench", "goldfish", "tabby cat", "analog clock", "toilet paper")
    assert all(t.count("{}") == 1 for t in templates) and "a photo of a {}." in templates


def test_features_equal_to_their_class_embedding_score_100_percent():
    classifier = F.normalize(torch.randn(16, 10), dim=0)  # (E, C)
    labels = torch.arange(10).repeat(2)
    features = 3.0 * classifier.T[labels]  # (20, E), exactly on the class direction (any length)
    expected = {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0,
                "images": 20, "unreadable": 0}
    assert classify(features, labels, classifier) == expected


def test_a_permuted_classifier_is_right_only_on_its_fixed_points():
    classifier = torch.eye(10)  # (E=10, C=10): one axis per class
    labels = torch.arange(10)
    perm = torch.tensor([1, 2, 3, 0, 4, 5, 6, 7, 8, 9])  # a 4-cycle; 6 classes stay in place
    result = classify(classifier.T[labels], labels, classifier[:, perm])
    assert result["acc1"] == pytest.approx(0.6)
    assert result["mean_per_class_recall"] == pytest.approx(0.6)


def test_top_k_accuracy_by_hand_and_top5_at_least_top1():
    ranked = torch.tensor([[2, 0, 1, 5, 4],   # label 2: first
                           [2, 0, 1, 5, 4],   # label 4: fifth
                           [2, 0, 1, 5, 4]])  # label 3: not among the five
    labels = torch.tensor([2, 4, 3])
    assert zeroshot.accuracy(ranked, labels, 1) == pytest.approx(1 / 3)
    assert zeroshot.accuracy(ranked, labels, 5) == pytest.approx(2 / 3)
    # 3 classes: all of them count
    assert zeroshot.accuracy(ranked[:, :3], torch.tensor([2, 0, 1]), 5) == 1.0
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 20, generator=g), torch.randint(20, (200,), generator=g)
    ranked = logits.topk(5, dim=1).indices
    assert zeroshot.accuracy(ranked, labels, 5) >= zeroshot.accuracy(ranked, labels, 1)


def test_mean_per_class_recall_on_an_imbalanced_case():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # recalls 3/4, 1/2, 1/1; class 3 has no samples: not counted
    predictions = torch.tensor([0, 0, 0, 3, 1, 0, 2])
    recall = zeroshot.mean_per_class_recall(predictions, labels, 4)
    assert recall == pytest.approx((0.75 + 0.5 + 1) / 3)
    # top-1 differs
    assert zeroshot.accuracy(predictions[:, None], labels, 1) == pytest.approx(5 / 7)


def test_retrieval_recall_on_a_constructed_case():
    scores = torch.tensor([[0.9, 0.1, 0.0],    # text 0 -> image 0: rank 1
                           [0.2, 0.5, 0.65],   # text 1 -> image 0: rank 3
                           [0.1, 0.8, 0.0],    # text 2 -> image 1: rank 1
                           [0.7, 0.0, 0.6]])   # text 3 -> image 2: rank 2
    positives = torch.zeros(4, 3, dtype=torch.bool)
    positives[[0, 1, 2, 3], [0, 0, 1, 2]] = True
    assert [zeroshot.retrieval_recall(scores, positives, k) for k in (1, 2, 3)] == [0.5, 0.75, 1.0]
    # image -> texts: image 0 finds text 0, image 1 finds text 2, image 2 first finds text 1 (not
    # its own), then text 3
    assert zeroshot.retrieval_recall(scores.T, positives.T, 1) == pytest.approx(2 / 3)
    assert zeroshot.retrieval_recall(scores.T, positives.T, 2) == 1.0


def test_zero_shot_retrieval_builds_scores_and_positives_as_clip_benchmark():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 8, generator=g)  # (I, E)
    captions = ["0", "1\n1b", "2", "3", "4", "5"]  # image 1 has two captions, one per line
    tok = LookupTokenizer()
    tok([c for cap in captions for c in cap.splitlines()])  # ids 0..6 in caption order
    text_image = torch.tensor([0, 1, 1, 2, 3, 4, 5])
    loader = DataLoader(list(zip(images, captions)), batch_size=4)

    exact = zeroshot.zero_shot_retrieval(FeatureModel(2.0 * images[text_image]), tok, loader, "cpu",
                                         quiet=True)
    assert set(exact) == {f"{d}_retrieval_recall@{k}"
                          for d in ("image", "text") for k in (1, 5, 10)}
    # every caption is its image's nearest neighbour and vice versa
    assert all(v == 1.0 for v in exact.values())

    table = torch.randn(7, 8, generator=g)
    result = zeroshot.zero_shot_retrieval(FeatureModel(table), tok, loader, "cpu", quiet=True)
    scores = F.normalize(table, dim=-1) @ F.normalize(images, dim=-1).T  # (T, I)
    positives = F.one_hot(text_image, 6).bool()
    for k in (1, 5, 10):
        assert (result[f"image_retrieval_recall@{k}"]
                == zeroshot.retrieval_recall(scores, positives, k))
        assert (result[f"text_retrieval_recall@{k}"]
                == zeroshot.retrieval_recall(scores.T, positives.T, k))


def test_classifier_is_the_normalised_mean_of_normalised_prompt_embeddings():
    g = torch.Generator().manual_seed(0)
    classnames = ["cat", "dog", "car"]
    templates = ["a photo of a {}.", "a {} in a video game.", "art of the {}."]
    # lengths over 4 orders of magnitude
    table = torch.randn(9, 8, generator=g) * torch.logspace(-2, 2, 9)[:, None]
    tok = LookupTokenizer()
    classifier = zeroshot.build_classifier(FeatureModel(table), tok, classnames, templates, "cpu",
                                           batch_size=4)
    assert classifier.shape == (8, 3)
    for c, name in enumerate(classnames):
        ids = [tok.ids[t.replace("{}", name)] for t in templates]
        expected = F.normalize(F.normalize(table[ids], dim=-1).mean(dim=0), dim=0)
        assert torch.allclose(classifier[:, c], expected, atol=1e-6)
    with pytest.raises(ValueError, match="no '{}'"):
        zeroshot.build_classifier(FeatureModel(table), tok, classnames, ["a photo"], "cpu")


# ----------------------------------------------------------------------------- a tiny real model,
# folder and shard


def colour_image(name, size=(64, 64), offset=0):
    img = Image.new("RGB", size, (128, 128, 128))
    img.paste(COLOURS[name], (8 + offset, 8, 48 + offset, 48))
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder: three colour classes, two images each."""
    root = tmp_path_factory.mktemp("folder")
    for name in COLOURS:
        os.makedirs(root / f"{name}_square")
        for i in range(2):
            colour_image(name, offset=4 * i).save(root / f"{name}_square" / f"{i}.jpg")
    return root


def write_folder(root, counts, unreadable=()):
    """counts {colour: images}: class folders <colour>_square of JPEGs 0.jpg, 1.jpg, ..., each
    shifted a little; a file named in `unreadable` ("green_square/1.jpg") holds bytes no decoder
    reads."""
    for name, count in counts.items():
        os.makedirs(root / f"{name}_square")
        for i in range(count):
            colour_image(name, offset=4 * i).save(root / f"{name}_square" / f"{i}.jpg")
    for file in unreadable:
        (root / file).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Seven images, classes of three, two and two, one of them unreadable: shares of two ranks
    differ in size."""
    return write_folder(tmp_path_factory.mktemp("mixed"), {"red": 3, "green": 2, "blue": 2},
                        ["green_square/1.jpg"])


def test_masked_inference_changes_features_reproducibly_and_leaves_the_global_rng_alone(tiny,
                                                                                        folder):
    model, tok, _ = tiny
    images = torch.stack([data.eval_transform(64)(colour_image(c))
                          for c in COLOURS])  # (3, 3, 64, 64)
    with torch.no_grad():
        unmasked = zeroshot.encode_images(model, images)
        assert torch.allclose(unmasked, F.normalize(model.encode_image(images), dim=-1))
        # uint8, as the loaders yield
        pixels = torch.stack([data.eval_crop(64)(colour_image(c)) for c in COLOURS])
        assert pixels.dtype == torch.uint8
        assert torch.equal(zeroshot.encode_images(model, pixels), unmasked)
        keep = zeroshot.draw_masks(3, 8, "gaussian", 0.5, 0.2, "cpu",
                                   zeroshot.seeded_generator("cpu"))  # (3, 32)
        masked = zeroshot.encode_images(model, images, keep)
    assert keep.shape == (3, 32)
    assert zeroshot.draw_masks(3, 8, "none", 0.5, 0.2, "cpu", None) is None
    assert masked.shape == unmasked.shape and not torch.allclose(masked, unmasked, atol=1e-3)
    rng = torch.get_rng_state()
    runs = [zeroshot.evaluate_folder(model, tok, str(folder), batch_size=b, workers=0,
                                     mask="gaussian", ratio=0.75, quiet=True) for b in (4, 4, 1)]
    assert runs[0] == runs[1] and torch.equal(torch.get_rng_state(), rng)
    # image i keeps row i of one draw for the whole set, whatever the batches
    assert runs[2] == runs[0]
    assert set(runs[0]) == {"acc1", "acc5", "mean_per_class_recall", "images", "unreadable"}
    assert 0 <= runs[0]["acc1"] <= runs[0]["acc5"] == 1.0  # 3 classes: top-5 covers them all


@pytest.mark.parametrize("ratio, views", [(0.5, 2), (0.75, 4)])
def test_complementary_views_keep_every_patch_exactly_once(ratio, views):
    keep = zeroshot.draw_masks(5, 8, "random", ratio, 0.2, "cpu",
                               zeroshot.seeded_generator("cpu"), views)
    assert keep.shape == (5, views, 64 // views)  # (images, V, K): K = 64 (1 - ratio)
    # each view in raster order, as keep_indices gives
    assert torch.equal(keep, keep.sort(dim=-1).values)
    # the union is every patch and no two views share one: each patch exactly once
    for image in keep:
        assert torch.equal(torch.bincount(image.flatten(), minlength=64),
                           torch.ones(64, dtype=torch.long))
    assert not torch.equal(keep[0], keep[1])  # a fresh split per image
    single = zeroshot.draw_masks(5, 8, "random", ratio, 0.2, "cpu",
                                 zeroshot.seeded_generator("cpu"))
    assert torch.equal(keep[:, 0], single)  # view 0 is the one masked view the same seed gives


@pytest.mark.parametrize("mask, ratio, views",
                         [("random", 0.75, 2), ("random", 0.5, 3), ("gaussian", 0.5, 2)])
def test_other_views_are_independent_draws(mask, ratio, views):
    keep = zeroshot.draw_masks(5, 8, mask, ratio, 0.2, "cpu",
                               zeroshot.seeded_generator("cpu"), views)
    generator = zeroshot.seeded_generator("cpu")
    draws = [masking.keep_indices(5, 8, ratio, mask, 0.2, generator=generator)
             for _ in range(views)]  # (5, K) each
    # (5, V, K): view v is the generator's draw v
    assert torch.equal(keep, torch.stack(draws, dim=1))
    assert not zeroshot.complementary(8, mask, ratio, views)
    assert zeroshot.complementary(8, "random", 0.75, 4)
    assert zeroshot.complementary(8, "random", 0.5, 2)


def test_views_average_the_normalised_features_of_each_view(tiny):
    model, _, _ = tiny
    pixels = torch.stack([data.eval_crop(64)(colour_image(c))
                          for c in COLOURS])  # (3, 3, 64, 64) uint8
    keep = zeroshot.draw_masks(3, 8, "random", 0.75, 0.2, "cpu",
                               zeroshot.seeded_generator("cpu"), 4)  # (3, 4, 16)
    with torch.no_grad():
        ensemble = zeroshot.encode_images(model, pixels, keep)
        views = [F.normalize(model.encode_image(data.normalize(pixels), keep[:, v]), dim=-1)
                 for v in range(4)]
    assert ensemble.shape == (3, model.config.embed_dim)
    assert torch.allclose(ensemble, F.normalize(sum(views) / 4, dim=-1), atol=1e-6)
    assert not torch.allclose(ensemble, views[0], atol=1e-3)  # more than the first view


def test_one_view_is_the_single_masked_pass(tiny, folder):
    model, tok, _ = tiny
    names, templates = ["blue", "green", "red"], ["a photo of a {} square."]
    classifier = zeroshot.build_classifier(model, tok, names, templates, "cpu", quiet=True)
    dataset = data.ImageFolder(str(folder), data.eval_crop(64))
    keep = masking.keep_indices(len(dataset), 8, 0.5, "gaussian", 0.2,
                                generator=torch.Generator().manual_seed(0))
    loader = zeroshot.make_loader(dataset, 4, 0, "cpu")
    expected = zeroshot.zero_shot_classification(model, classifier, loader, "cpu", keep, quiet=True)
    settings = dict(classnames=names, templates=templates, workers=0, mask="gaussian", ratio=0.5,
                    quiet=True)
    assert zeroshot.evaluate_folder(model, tok, str(folder), views=1, **settings) == expected
    assert zeroshot.evaluate_folder(model, tok, str(folder), **settings) == expected
    runs = [zeroshot.evaluate_folder(model, tok, str(folder), views=4, batch_size=b, **settings)
            for b in (4, 1)]
    # image i keeps row i of the views, any batches
    assert runs[0] == runs[1] and set(runs[0]) == set(expected)
    with pytest.raises(ValueError, match="views must be 1, or more with a mask"):
        zeroshot.evaluate_folder(model, tok, str(folder), views=2, workers=0, quiet=True)


def test_fixed_patches_feed_every_image_the_same_set(tiny, folder, monkeypatch):
    model, tok, _ = tiny
    patches, fed, score = torch.tensor([0, 9, 27, 36, 63]), [], zeroshot.zero_shot_classification

    def spy(model, classifier, loader, device, keep=None, *rest, **kw):
        fed.append(keep)
        return score(model, classifier, loader, device, keep, *rest, **kw)

    monkeypatch.setattr(zeroshot, "zero_shot_classification", spy)
    zeroshot.evaluate_folder(model, tok, str(folder), workers=0, quiet=True, patches=patches)
    assert fed[0].shape == (6, 5) and (fed[0] == patches).all()  # each of the 6 images: the set
    with pytest.raises(ValueError, match="instead of a mask; got mask 'random'"):
        zeroshot.evaluate_folder(model, tok, str(folder), mask="random", ratio=0.5, workers=0,
                                 quiet=True, patches=patches)


def test_evaluate_folder_checks_class_names(tiny, folder):
    model, tok, _ = tiny
    with pytest.raises(ValueError, match="1000"):
        zeroshot.evaluate_folder(model, tok, str(folder), workers=0, imagenet=True, quiet=True)
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        zeroshot.evaluate_folder(model, tok, str(folder), ["red", "green"], workers=0, quiet=True)


def test_every_rank_of_a_process_group_returns_the_single_process_figures(tiny, mixed_folder,
                                                                          tmp_path):
    import eval_ranks  # tests/eval_ranks.py: what each of the two ranks runs
    model, tok, path = tiny
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.join(ROOT, "tests", "eval_ranks.py"),
                           str(path), str(mixed_folder), str(tmp_path / "result")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = {name: zeroshot.evaluate_folder(model, tok, str(mixed_folder), batch_size=7, workers=0,
                                             quiet=True, **settings)
              for name, settings in eval_ranks.PASSES.items()}
    assert single["unmasked"]["images"] == 7 and single["unmasked"]["unreadable"] == 1
    # a skipped or doubled image changes the counts, and likely the accuracies
    for rank in range(2):
        assert json.loads((tmp_path / f"result.{rank}.json").read_text()) == single
    # rank 0 alone prints, the count of the whole set
    assert proc.stderr.count("images (unmasked): 7 in ") == 1


def test_unreadable_images_are_counted_and_each_pass_says_how_it_masked(tiny, mixed_folder, capsys):
    model, tok, _ = tiny
    for workers, settings, name in [(1, {}, "unmasked"),
                                    (0, {"mask": "random", "ratio": 0.5}, "masked random 0.5"),
                                    (0, {"mask": "gaussian", "ratio": 0.25, "sigma": 0.1},
                                     "masked gaussian 0.25 sigma 0.1")]:
        result = zeroshot.evaluate_folder(model, tok, str(mixed_folder), workers=workers,
                                          **settings)
        # the flag comes back from a worker process too
        assert result["images"] == 7 and result["unreadable"] == 1
        last = capsys.readouterr().err.splitlines()[-1]
        assert (last.startswith(f"images ({name}): 7 in ")
                and last.endswith("waiting for data, 1 unreadable")), last


def test_a_mostly_unreadable_folder_is_an_error_not_an_accuracy(tiny, tmp_path):
    model, tok, path = tiny
    root = write_folder(tmp_path / "half", {"red": 2, "green": 1, "blue": 1},
                        ["red_square/1.jpg", "blue_square/0.jpg"])
    # 2 of 4: reported
    assert zeroshot.evaluate_folder(model, tok, str(root), workers=0, quiet=True)["unreadable"] == 2
    (root / "red_square" / "0.jpg").write_bytes(b"")
    with pytest.raises(ValueError,
                       match="^3 of 4 images could not be read: no accuracy to report$"):
        zeroshot.evaluate_folder(model, tok, str(root), workers=0, quiet=True)
    output = tmp_path / "result.json"
    with pytest.raises(SystemExit, match="^eval.py: error: 3 of 4 images could not be read"):
        zeroshot.main(["--checkpoint", str(path), "--dataset", str(root), "--workers", "0",
                       "--device", "cpu", "--output", str(output)])
    assert not output.exists()


def test_cli_reports_unreadable_images_and_the_resolution_beside_the_metrics(tiny, mixed_folder,
                                                                             tmp_path, capsys):
    _, _, path = tiny
    zeroshot.main(["--checkpoint", str(path), "--dataset", str(mixed_folder), "--workers", "0",
                   "--device", "cpu", "--image-size", "72",
                   "--output", str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["images"], result["unreadable"], result["image_size"]) == (7, 1, 72)
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert json.loads(capsys.readouterr().out) == result


def run_eval(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--workers", "0", "--device", "cpu",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_classification_writes_clip_benchmark_json(tiny, folder, tmp_path):
    _, _, path = tiny
    # the folders' sorted order
    (tmp_path / "names.txt").write_text("blue square\ngreen square\nred square\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    proc = run_eval("--checkpoint", path, "--dataset", folder,
                    "--classnames", tmp_path / "names.txt",
                    "--templates", tmp_path / "templates.txt", "--mask", "random", "--ratio", "0.5",
                    "--views", "2", "--output", tmp_path / "result.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images (masked random 0.5 x 2 views): 6 in " in proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["task"] == "zeroshot_classification"
    assert result["mask"] == "random" and result["ratio"] == 0.5
    assert result["views"] == 2
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0 <= v <= 1 for v in result["metrics"].values())


def write_shard(path, n):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            name = list(COLOURS)[i % len(COLOURS)]
            buf = io.BytesIO()
            colour_image(name, (80, 72), offset=i % 5).save(buf, format="JPEG")
            caption = f"a photo of a {name} square".encode()
            for ext, payload in [("jpg", buf.getvalue()), ("txt", caption)]:
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_cli_retrieval_writes_clip_benchmark_json(tiny, tmp_path):
    _, _, path = tiny
    write_shard(tmp_path / "test-0.tar", 6)
    proc = run_eval("--checkpoint", path, "--retrieval", tmp_path / "test-0.tar",
                    "--batch-size", "4", "--output", tmp_path / "result.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "result.json").read_text())["metrics"]
    assert set(metrics) == {f"{d}_retrieval_recall@{k}"
                            for d in ("image", "text") for k in (1, 5, 10)}
    # 6 candidates < 10
    assert metrics["image_retrieval_recall@10"] == metrics["text_retrieval_recall@10"] == 1.0


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="eval.py: error: no checkpoint at"):
        zeroshot.main(["--checkpoint", str(tmp_path / "missing.pt"), "--dataset", str(tmp_path)])
    folder = ["--dataset", str(tmp_path)]
    for argv, message in [(folder + ["--mask", "gaussian", "--ratio", "1.5"], "masking ratio"),
                          (folder + ["--workers", "-1"], "--workers must be at least 0, got -1"),
                          (folder + ["--batch-size", "0"],
                           "--batch-size must be at least 1, got 0"),
                          (folder + ["--image-size", "0"],
                           "--image-size must be at least 1, got 0"),
                          (folder + ["--views", "0"], "--views must be at least 1, got 0"),
                          (folder + ["--views", "2"], "views must be 1, or more with a mask"),
                          # flags: argparse's status 2, one line on stderr
                          ([], "one of the arguments")]:
        with pytest.raises(SystemExit) as e:
            zeroshot.main(["--checkpoint", "x.pt", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_progress_says_how_much_of_a_pass_waited_for_data(capsys):
    def run(load_s, work_s):
        def loader():
            for i in range(4):
                time.sleep(load_s)
                yield i
        progress = zeroshot.Progress("items")
        for _ in progress.batches(loader()):
            time.sleep(work_s)
            progress.update(1)
        progress.done()
        line = capsys.readouterr().err.strip()
        assert line.startswith("items: 4 in ") and line.endswith("% of it waiting for data")
        return int(line.split()[-6].rstrip("%"))
    assert run(0.05, 0) >= 90  # data-bound
    assert run(0, 0.05) <= 10  # model-bound
