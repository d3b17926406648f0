"""The contract of eval.py's linear probe: a logistic regression on frozen image features that fits
what is separable, obeys its L2 strength, picks that strength on held-out training images as
CLIP_benchmark does, leaves unreadable training images out, and reports CLIP_benchmark's metrics
from the command line."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import eval as zeroshot  # `eval` would shadow the builtin
from test_eval import FeatureModel, folder, write_folder  # noqa: F401 (fixtures)

METRICS = {"acc1", "acc5", "mean_per_class_recall"}


def clusters(per_class, noise=0.1, dim=8, split=0):
    """(features (N, dim), labels (N,)): points around one random centre per class (the same centres
    for every split, 3 apart or more), per_class[c] of class c, each split its own noise."""
    centres = 3 * F.normalize(torch.randn(len(per_class), dim,
                                          generator=torch.Generator().manual_seed(0)), dim=-1)
    # (N,) class-major
    labels = torch.arange(len(per_class)).repeat_interleave(torch.tensor(per_class))
    g = torch.Generator().manual_seed(1 + split)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def features_of(features, labels, readable=None):
    """image_features over a loader of (features, label, readable) rows through the FeatureModel
    stand-in."""
    readable = torch.ones(len(labels), dtype=torch.bool) if readable is None else readable
    loader = DataLoader(TensorDataset(features, labels, readable), batch_size=16)
    return zeroshot.image_features(FeatureModel(None), loader, "cpu", quiet=True)


def test_image_features_are_normalised_and_keep_labels_and_flags():
    x, y = clusters([3] * 5)
    readable = torch.arange(15) % 4 != 0
    features, labels, ok = features_of(x, y, readable)
    assert torch.allclose(features, F.normalize(x, dim=-1))
    assert torch.equal(labels, y) and torch.equal(ok, readable)


def test_a_weak_l2_probe_separates_separable_features():
    x, y = clusters([20] * 5)
    probe = zeroshot.fit_probe(F.normalize(x, dim=-1), y, 5, l2=1e-6)
    assert probe.weight.shape == (5, 8) and not probe.weight.requires_grad
    # every training point on its side
    assert torch.equal(probe(F.normalize(x, dim=-1)).argmax(dim=1), y)


def test_a_stronger_l2_gives_smaller_weights_and_a_huge_one_only_the_class_prior():
    x, y = clusters([30, 10, 10, 10, 10], noise=0.5)  # class 0 is the most frequent
    x = F.normalize(x, dim=-1)
    norms = [zeroshot.fit_probe(x, y, 5, l2).weight.norm().item()
             for l2 in (1e-4, 1e-2, 1.0, 100.0)]
    assert norms == sorted(norms, reverse=True) and norms[-1] < norms[0] / 100, norms
    weak, huge = (zeroshot.fit_probe(x, y, 5, l2)(x).argmax(dim=1) for l2 in (1e-6, 1e4))
    assert torch.equal(weak, y)
    # weights ~ 0: the bias (the log prior) alone decides, chance level
    assert torch.equal(huge, torch.zeros_like(y))


def test_the_fit_is_the_same_every_time():
    x, y = clusters([10] * 5, noise=1.0)
    fits = [zeroshot.fit_probe(F.normalize(x, dim=-1), y, 5, l2=1e-3) for _ in range(2)]
    assert torch.equal(fits[0].weight, fits[1].weight) and torch.equal(fits[0].bias, fits[1].bias)


def test_l2_search_finds_the_peak_as_clip_benchmark_searches(monkeypatch):
    """A held-out top-1 that peaks at grid index 37: 7 values across the grid, then spans 8, 4, 2, 1
    around the best (32 -> 40 -> 36 -> 36, a tie with 38 going to the weaker -> 37), each value
    fitted once."""
    fitted = []  # (grid index, the rows it was fitted on)

    def fake_fit(features, labels, num_classes, l2):
        fitted.append((zeroshot.PROBE_L2.index(l2), features[:, 0].long()))
        return lambda x: torch.zeros(len(x), num_classes)

    monkeypatch.setattr(zeroshot, "fit_probe", fake_fit)
    monkeypatch.setattr(zeroshot, "accuracy", lambda *_: 1 - abs(fitted[-1][0] - 37) / 100)
    rows = torch.arange(150.0)[:, None]  # (150, 1) ids
    labels = torch.arange(3).repeat_interleave(50)  # 50 per class
    assert zeroshot.choose_l2(rows, labels, 3) == zeroshot.PROBE_L2[37]
    order = [i for i, _ in fitted]
    # 7 + 2 new per span
    assert order == [0, 16, 32, 48, 64, 80, 96, 24, 40, 36, 44, 34, 38, 35, 37]
    fit = fitted[0][1]
    # one held-out tenth for the whole search
    assert all(torch.equal(rows_fitted, fit) for _, rows_fitted in fitted)
    # a tenth of each class held out
    assert torch.bincount(labels[fit], minlength=3).tolist() == [45, 45, 45]

    fitted.clear()
    zeroshot.choose_l2(rows, labels, 3, seed=1)
    assert not torch.equal(fitted[0][1], fit)  # another seed holds out other images
    fitted.clear()
    # every L2 as good: the weakest, as CLIP_benchmark
    monkeypatch.setattr(zeroshot, "accuracy", lambda *_: 1.0)
    assert zeroshot.choose_l2(rows, labels, 3) == zeroshot.PROBE_L2[0]


def test_the_probe_reports_clip_benchmark_metrics_on_separable_features():
    (x, y), (test_x, test_y) = clusters([20] * 5), clusters([10] * 5, split=1)
    result = zeroshot.linear_probe(features_of(x, y), features_of(test_x, test_y), 5)
    assert ({k: result[k] for k in METRICS}
            == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0})
    assert result["l2"] in zeroshot.PROBE_L2
    counts = (result["images"], result["unreadable"], result["train_images"],
              result["train_unreadable"])
    assert counts == (50, 0, 100, 0)


def test_unreadable_training_images_are_counted_and_left_out_of_the_fit():
    """Blank stand-ins sit on class 0's point with label 1, three of them against two real class-0
    images: fitted, they would turn the probe's answer there to class 1."""
    eye = torch.eye(3)
    x = torch.cat([eye[[0, 0]], eye[[1] * 4], eye[[2] * 4], eye[[0, 0, 0]]])  # (13, 3)
    y = torch.tensor([0, 0] + [1] * 4 + [2] * 4 + [1, 1, 1])
    readable = torch.arange(13) < 10
    test = features_of(eye.repeat(2, 1), torch.arange(3).repeat(2))
    result = zeroshot.linear_probe(features_of(x, y, readable), test, 3)
    assert result["acc1"] == 1.0 and (result["train_images"], result["train_unreadable"]) == (13, 3)
    # what they would do
    assert zeroshot.linear_probe(features_of(x, y), test, 3)["acc1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="^7 of 13 training images could not be read"):
        zeroshot.linear_probe(features_of(x, y, torch.arange(13) < 6), test, 3)
    with pytest.raises(ValueError, match="needs 2 readable training images or more, got 1"):
        zeroshot.linear_probe(features_of(x[:1], y[:1]), test, 3)


def test_cli_linear_probe_writes_clip_benchmark_json(tiny, folder, tmp_path, capsys):  # noqa: F811
    _, _, path = tiny
    train = write_folder(tmp_path / "train", {"red": 4, "green": 4, "blue": 4},
                         ["blue_square/3.jpg"])
    zeroshot.main(["--checkpoint", str(path), "--linear-probe", "--train-dataset", str(train),
                   "--dataset", str(folder), "--workers", "0", "--device", "cpu",
                   "--output", str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert ((result["task"], result["dataset"], result["train_dataset"])
            == ("linear_probe", str(folder), str(train)))
    assert set(result["metrics"]) == METRICS and result["l2"] in zeroshot.PROBE_L2
    assert (result["images"], result["unreadable"], result["train_images"],
            result["train_unreadable"]) == (6, 0, 12, 1)
    # the test images are among the training images, colours apart
    assert result["metrics"]["acc1"] == 1.0


def test_cli_linear_probe_bad_input_is_one_line(tiny, folder, tmp_path, capsys):  # noqa: F811
    _, _, path = tiny
    base = ["--checkpoint", str(path), "--dataset", str(folder)]
    for argv, message in [(["--linear-probe"], "--linear-probe and --train-dataset go together"),
                          (["--train-dataset", str(folder)],
                           "--linear-probe and --train-dataset go together"),
                          (["--linear-probe", "--train-dataset", str(folder), "--mask", "random"],
                           "no --mask")]:
        with pytest.raises(SystemExit) as e:
            zeroshot.main(base + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    other = write_folder(tmp_path / "other", {"red": 1, "green": 1})
    with pytest.raises(SystemExit,
                       match="^eval.py: error: .* different class folders \\(2 and 3\\)"):
        zeroshot.main(base + ["--linear-probe", "--train-dataset", str(other), "--workers", "0",
                              "--device", "cpu"])
