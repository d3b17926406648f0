"""The contract of photographer.py: the built-in dataset is deterministic, cached, generated all or
nothing, and places its subjects as each layout says."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import data
import photographer


def files_of(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


def interrupted(job):
    raise RuntimeError("interrupted")


def test_builtin_dataset_is_deterministic_cached_and_well_formed(tmp_path, monkeypatch):
    kw = dict(num_train=200, num_test=72, image_size=32)
    with monkeypatch.context() as m:  # an interrupted generation leaves nothing that looks finished
        m.setattr(photographer, "generate_part", interrupted)
        with pytest.raises(RuntimeError, match="interrupted"):
            photographer.builtin_dataset(root=str(tmp_path / "a"), **kw)
        assert os.listdir(tmp_path / "a") == []
    a = photographer.builtin_dataset(root=str(tmp_path / "a"), **kw)
    b = photographer.builtin_dataset(root=str(tmp_path / "b"), **kw)
    fa, fb = files_of(os.path.dirname(a["test"])), files_of(os.path.dirname(b["test"]))
    # one shard, 72 test images, classnames.txt, templates.txt
    assert fa == fb and len(fa) == 1 + 72 + 2
    c = photographer.builtin_dataset(root=str(tmp_path / "c"), seed=1, **kw)
    u = photographer.builtin_dataset(root=str(tmp_path / "u"), layout="uniform", **kw)
    e = photographer.builtin_dataset(root=str(tmp_path / "e"), layout="edge", **kw)
    for other in (c, u, e):
        assert files_of(os.path.dirname(other["test"])) != fa
    # cached: a second call generates nothing; no temporary folder is left behind
    monkeypatch.setattr(photographer, "generate_part", lambda job: pytest.fail("regenerated"))
    assert photographer.builtin_dataset(root=str(tmp_path / "a"), **kw) == a
    assert len(os.listdir(tmp_path / "a")) == 1
    # the pieces eval.py and train.py read
    folder = data.ImageFolder(a["test"], data.eval_transform(32))
    assert [n.replace("_", " ") for n in folder.classes] == a["classnames"]
    assert len(a["classnames"]) == 36
    classnames_txt = open(os.path.join(a["test"], "classnames.txt")).read()
    assert classnames_txt.split("\n")[:-1] == a["classnames"]
    assert all("{}" in t for t in a["templates"])
    samples = [s for url in data.expand_urls(a["train"]) for s in data.read_shard(url)]
    assert len(samples) == 200
    for s in samples:  # every caption names its class
        assert a["classnames"][int(s["cls"])] in s["txt"].decode()
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (32, 32)


def test_subject_placement_follows_the_layout():
    rng, ss = np.random.default_rng(0), 128
    discs = {layout: np.array([photographer.subject_disc(rng, ss, layout) for _ in range(500)])
             for layout in photographer.LAYOUTS}
    for cx, cy, r in np.concatenate(list(discs.values())):
        assert r <= min(cx, cy, ss - cx, ss - cy) + 1e-9  # the whole subject is in the frame
    off_centre = {k: np.hypot(d[:, 0] - ss / 2, d[:, 1] - ss / 2).mean() for k, d in discs.items()}
    assert off_centre["centered"] < off_centre["uniform"] < off_centre["edge"]
    cx, cy, r = discs["edge"].T
    # against a side
    assert (np.minimum.reduce([cx, cy, ss - cx, ss - cy]) - r <= 0.04 * ss + 1e-9).all()


def test_distractors_false_draws_the_same_image_without_the_edge_shapes():
    size, inner = 64, slice(16, 48)  # distractors reach at most ~0.24 of the side inward
    differ = 0
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        with_them = np.asarray(photographer.render(a, seed % 36, size, "centered"), np.int16)
        without = np.asarray(photographer.render(b, seed % 36, size, "centered", False), np.int16)
        assert a.random() == b.random()  # the same random numbers were drawn
        assert (with_them[inner, inner] == without[inner, inner]).all()
        differ += (np.abs(with_them - without).sum(-1) > 60).sum() > 10
    assert differ >= 18  # the edge shapes are gone (the subject may hide one or two)
