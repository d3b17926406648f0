"""The contract of `python export.py`: OpenCLIP's and transformers' key names are exact
inverses of ours (tensor for tensor), the Hugging Face config pools and activates as our model does,
the tokenizer survives as CLIPTokenizer files, the files are written whole, and bad input is one
line. With open_clip or transformers installed, their features are compared with ours too."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt
import export as E
import model as M
import tokenizer as T
from test_checkpoint import openclip_vit_b16_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
needs_safetensors = pytest.mark.skipif(not HAS_SAFETENSORS, reason="safetensors is not installed "
                                       "(optional: pip install safetensors)")
CAPTIONS = ["a photo of a red square", "A Blue square.", "ΟΔΟΣ", "a green photo " * 20]

# the fields of open_clip_torch 3.3.0's CLIPVisionCfg and CLIPTextCfg (open_clip/model.py) that an
# exported model config sets
OPENCLIP_VISION_FIELDS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
OPENCLIP_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                        "hf_tokenizer_name", "tokenizer_kwargs"}


def transformers_clip_shapes(c):
    """Every parameter of transformers' CLIPModel (models/clip/modeling_clip.py, 5.24.0) and its
    shape, for a CLIPConfig: what model.safetensors must hold for a strict load."""
    E, V, W = c.embed_dim, c.vision_width, c.text_width
    shapes = {"logit_scale": (), "visual_projection.weight": (E, V),
              "text_projection.weight": (E, W),
              "vision_model.embeddings.class_embedding": (V,),
              "vision_model.embeddings.patch_embedding.weight": (V, 3, c.patch_size, c.patch_size),
              "vision_model.embeddings.position_embedding.weight": (1 + c.grid_size ** 2, V),
              "text_model.embeddings.token_embedding.weight": (c.vocab_size, W),
              "text_model.embeddings.position_embedding.weight": (c.context_length, W)}
    for ln, width in [("vision_model.pre_layrnorm", V), ("vision_model.post_layernorm", V),
                      ("text_model.final_layer_norm", W)]:
        shapes |= {f"{ln}.weight": (width,), f"{ln}.bias": (width,)}
    for tower, width, layers in [("vision_model", V, c.vision_layers),
                                 ("text_model", W, c.text_layers)]:
        hidden = int(width * c.mlp_ratio)
        for i in range(layers):
            b = f"{tower}.encoder.layers.{i}"
            linears = [(f"self_attn.{n}_proj", (width, width)) for n in "qkv"] + [
                ("self_attn.out_proj", (width, width)), ("mlp.fc1", (hidden, width)),
                ("mlp.fc2", (width, hidden))]
            for name, shape in linears:
                shapes |= {f"{b}.{name}.weight": shape, f"{b}.{name}.bias": shape[:1]}
            for ln in ("layer_norm1", "layer_norm2"):
                shapes |= {f"{b}.{ln}.weight": (width,), f"{b}.{ln}.bias": (width,)}
    return shapes


@pytest.fixture(scope="module")
def clip_layout_tokenizer():
    """A tokenizer laid out as CLIP's BPE (49,408 ids, no pad token, eot 49407), from made-up
    merges: CLIP's own file is not needed to test what depends on the layout."""
    chars = list(T.byte_alphabet().values())
    merges = [(a, b) for a in chars for b in chars][:T.CLIP_NUM_MERGES]
    return T.Tokenizer(T.bpe_tokenizer(merges))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def export(*args):
    E.main(list(map(str, args)))


def test_checkpoint_py_export_is_export_py(tmp_path):
    # the older spelling, `python checkpoint.py export ARGS`, runs `python export.py ARGS`
    def run(*args):
        return subprocess.run([sys.executable, *args, str(tmp_path / "missing.pt"),
                               str(tmp_path / "out"), "--format", "open_clip"],
                              capture_output=True, text=True, cwd=ROOT)
    old, new = run("checkpoint.py", "export"), run("export.py")
    assert old.returncode == new.returncode != 0
    assert old.stderr == new.stderr and "missing.pt" in old.stderr


def one_line_exit(args, capsys):
    """The message of a SystemExit from the export command, checked to be one line."""
    with pytest.raises(SystemExit) as e:
        export(*args)
    message = str(e.value.code) if e.value.code not in (None, 2) else capsys.readouterr().err
    assert message.strip() and "\n" not in message.strip()
    return message


# ----------------------------------------------------------------------------- key names


def test_openclip_keys_are_the_exact_inverse_of_the_conversion(tiny):
    ours = tiny[0].state_dict()
    openclip = E.to_openclip_state_dict(ours)
    assert {"transformer.resblocks.0.attn.in_proj_weight", "text_projection",
            "visual.transformer.resblocks.3.mlp.c_proj.bias", "token_embedding.weight",
            "positional_embedding", "ln_final.weight"} <= set(openclip)
    assert not any(k.startswith("text.") or "blocks." in k.replace("resblocks.", "")
                   for k in openclip)
    back = ckpt.convert_openclip_state_dict(openclip)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)  # shared, exact
    # and from OpenCLIP's side: its ViT-B-16 keys there and back
    theirs = openclip_vit_b16_state_dict()
    assert same_tensors(E.to_openclip_state_dict(ckpt.convert_openclip_state_dict(theirs)),
                        theirs)


@pytest.mark.parametrize("config, name", [
    (M.PRESETS["ViT-B-16"], "ViT-B-16"),
    (replace(M.PRESETS["ViT-B-16"], quick_gelu=True), "ViT-B-16-quickgelu"),
    (M.PRESETS["ViT-S-16"], "ViT-S-16"),
    (M.PRESETS["ViT-Ti-16"], None), (M.PRESETS["tiny"], None),
    (replace(M.PRESETS["ViT-B-16"], image_size=256), None),  # a changed image size
    (replace(M.PRESETS["ViT-B-16"], vocab_size=32000), None),  # a changed vocabulary
])
def test_openclip_needs_a_model_config_only_for_what_it_does_not_ship(config, name):
    assert E.openclip_builtin_name(config) == name


def test_openclip_model_config_of_tiny():
    c = M.PRESETS["tiny"]
    config = E.openclip_model_config(c, "tok")
    assert config["embed_dim"] == 128 and config["quick_gelu"] is False
    assert set(config["vision_cfg"]) <= OPENCLIP_VISION_FIELDS
    assert set(config["text_cfg"]) <= OPENCLIP_TEXT_FIELDS
    # OpenCLIP's image tower has width / head_width heads: 128 / 32 = 4, ours
    assert config["vision_cfg"] == {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4,
                                    "head_width": 32, "mlp_ratio": 4.0}
    assert config["text_cfg"] | {"hf_tokenizer_name": None} == {
        "context_length": 32, "vocab_size": 1024, "width": 128, "heads": 4, "layers": 4,
        "mlp_ratio": 4.0, "hf_tokenizer_name": None, "tokenizer_kwargs": {"clean": "lower"}}
    assert config["text_cfg"]["hf_tokenizer_name"] == os.path.abspath("tok")
    assert "hf_tokenizer_name" not in E.openclip_model_config(c)["text_cfg"]  # CLIP's BPE


def test_openclip_model_config_of_vit_bigg_14_is_openclips_own():
    # open_clip_torch 3.3.0's model_configs/ViT-bigG-14.json: the image MLP has its own ratio
    config = E.openclip_model_config(M.PRESETS["ViT-bigG-14"])
    assert config["embed_dim"] == 1280
    assert config["vision_cfg"] == {"image_size": 224, "patch_size": 14, "width": 1664,
                                    "layers": 48, "head_width": 104, "mlp_ratio": 4.9231}
    assert {k: config["text_cfg"][k] for k in ("width", "heads", "layers", "mlp_ratio")} == {
        "width": 1280, "heads": 20, "layers": 32, "mlp_ratio": 4.0}
    hf = E.hf_config(M.PRESETS["ViT-bigG-14"], T.Tokenizer(T.bpe_tokenizer([("a", "b")])))
    assert (hf["vision_config"]["intermediate_size"], hf["text_config"]["intermediate_size"]) == (
        8192, 5120)


@pytest.mark.parametrize("name", ["tiny", "ViT-B-16"])
def test_hf_keys_and_shapes_are_transformers_clipmodels(name):
    model = M.create_model(name)
    hf = E.to_hf_state_dict(model.state_dict())
    assert {k: tuple(v.shape) for k, v in hf.items()} == transformers_clip_shapes(model.config)
    # what safetensors stores: contiguous tensors, none sharing memory
    assert all(v.is_contiguous() for v in hf.values())
    assert len({v.untyped_storage().data_ptr() for v in hf.values()}) == len(hf)


def test_hf_mapping_round_trip_is_exact(tiny):
    ours = tiny[0].state_dict()
    assert same_tensors(ckpt.from_hf_state_dict(E.to_hf_state_dict(ours)), ours)
    g = torch.Generator().manual_seed(0)
    theirs = {k: torch.randn(shape, generator=g)
              for k, shape in transformers_clip_shapes(tiny[0].config).items()}
    assert same_tensors(E.to_hf_state_dict(ckpt.from_hf_state_dict(theirs)), theirs)
    # a buffer older transformers saved
    position_ids = {"text_model.embeddings.position_ids": torch.arange(32)[None]}
    assert same_tensors(ckpt.from_hf_state_dict(theirs | position_ids),
                        ckpt.from_hf_state_dict(theirs))


@torch.no_grad()
def test_hf_weights_compute_our_attention_and_projections(tiny):
    model = tiny[0]
    hf = E.to_hf_state_dict(model.state_dict())
    x = torch.randn(2, 5, 128)
    p = "vision_model.encoder.layers.1.self_attn."
    # transformers' CLIPAttention: separate q, k, v Linears, 4 heads of 32
    q, k, v = (F.linear(x, hf[f"{p}{n}_proj.weight"], hf[f"{p}{n}_proj.bias"])
               .view(2, 5, 4, 32).transpose(1, 2) for n in "qkv")
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 128)
    y = F.linear(y, hf[p + "out_proj.weight"], hf[p + "out_proj.bias"])
    assert torch.allclose(y, model.visual.blocks[1].attn(x), atol=1e-6)
    pooled = torch.randn(3, 128)
    for linear, proj in [("visual_projection.weight", model.visual.proj),
                         ("text_projection.weight", model.text.proj)]:
        assert torch.allclose(F.linear(pooled, hf[linear]), pooled @ proj, atol=1e-6)


# ----------------------------------------------------------------------------- the HF config


def test_hf_config_of_vit_b16(clip_layout_tokenizer):
    hf = E.hf_config(M.PRESETS["ViT-B-16"], clip_layout_tokenizer)
    text, vision = hf["text_config"], hf["vision_config"]
    assert hf["projection_dim"] == 512 and hf["architectures"] == ["CLIPModel"]
    # OpenCLIP's ViT-B-16 has nn.GELU; nn.LayerNorm's eps
    assert text.items() >= {"hidden_act": "gelu", "layer_norm_eps": 1e-5}.items()
    assert vision.items() >= {"hidden_act": "gelu", "layer_norm_eps": 1e-5}.items()
    # eos_token_id is not 2, so transformers pools at the end-of-text token, as our argmax
    assert text.items() >= {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
                            "vocab_size": 49408, "max_position_embeddings": 77,
                            "hidden_size": 512, "intermediate_size": 2048,
                            "num_hidden_layers": 12, "num_attention_heads": 8}.items()
    assert vision.items() >= {"image_size": 224, "patch_size": 16, "hidden_size": 768,
                              "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12}.items()
    quick = E.hf_config(replace(M.PRESETS["ViT-B-16"], quick_gelu=True), clip_layout_tokenizer)
    assert quick["text_config"]["hidden_act"] == "quick_gelu"
    assert quick["vision_config"]["hidden_act"] == "quick_gelu"


def test_hf_config_of_tiny_with_a_trained_tokenizer(tiny):
    model, tok, _ = tiny
    hf = E.hf_config(model.config, tok)
    assert hf["projection_dim"] == 128
    assert hf["text_config"].items() >= {
        "hidden_act": "gelu", "eos_token_id": tok.eot, "bos_token_id": tok.sot,
        "pad_token_id": 0,  # <pad>
        "vocab_size": tok.vocab_size, "max_position_embeddings": 32, "hidden_size": 128,
        "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}.items()
    assert tok.eot == model.config.vocab_size - 1  # the largest id, where our argmax pools
    assert hf["vision_config"].items() >= {
        "hidden_act": "gelu", "image_size": 64, "patch_size": 8, "hidden_size": 128,
        "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}.items()


@pytest.mark.parametrize("config", [M.PRESETS["ViT-B-16"], M.PRESETS["tiny"],
                                    replace(M.PRESETS["ViT-Ti-16"], quick_gelu=True)])
def test_hf_config_reads_back_as_the_same_model(config, clip_layout_tokenizer):
    assert ckpt.config_from_hf(E.hf_config(config, clip_layout_tokenizer), "out") == config


@pytest.mark.parametrize("change, message", [
    (lambda hf: hf["text_config"].pop("hidden_size"), "not a CLIPModel's config .*hidden_size"),
    (lambda hf: hf["vision_config"].update(hidden_act="gelu_new"), "gelu or quick_gelu"),
    (lambda hf: hf["vision_config"].update(intermediate_size=1000), "one MLP ratio"),
    (lambda hf: hf["text_config"].update(layer_norm_eps=1e-6), "eps 1e-05"),
])
def test_an_hf_config_model_py_does_not_build_is_one_line(change, message, clip_layout_tokenizer):
    hf = E.hf_config(M.PRESETS["tiny"], clip_layout_tokenizer)
    change(hf)
    with pytest.raises(ValueError, match=message) as e:
        ckpt.config_from_hf(hf, "out")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- tokenizer files


@pytest.mark.parametrize("which", ["trained", "clip layout"])
def test_clip_tokenizer_files_read_back_as_the_same_tokenizer(which, tiny, clip_layout_tokenizer,
                                                              tmp_path):
    tok = tiny[1] if which == "trained" else clip_layout_tokenizer
    files = T.hf_tokenizer_files(tok)
    config = json.loads(files["tokenizer_config.json"])
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["eos_token"] == T.EOT
    assert config["model_max_length"] == tok.context_length
    assert config["pad_token"] == (T.PAD if which == "trained" else T.EOT)
    assert files["merges.txt"].startswith("#version: 0.2\n")
    E.write_files(tmp_path, files)
    back = T.load_tokenizer(str(tmp_path))  # a folder of vocab.json + merges.txt
    assert back.context_length == tok.context_length and back.vocab_size == tok.vocab_size
    assert torch.equal(back(CAPTIONS), tok(CAPTIONS))
    assert T.is_clip_bpe(back) == (which == "clip layout")


def test_only_clips_own_bpe_counts_as_openclips_default_tokenizer(tiny, clip_layout_tokenizer):
    chars = list(T.byte_alphabet().values())
    fewer_merges = T.Tokenizer(T.bpe_tokenizer([(a, b) for a in chars[:10] for b in chars[:10]]))
    assert T.is_clip_bpe(clip_layout_tokenizer)
    assert not T.is_clip_bpe(fewer_merges)  # CLIP's layout, another vocabulary
    assert not T.is_clip_bpe(tiny[1])  # trained here: <pad> first


def test_clip_tokenizer_files_whose_vocab_is_not_their_merges_are_refused(tiny, tmp_path):
    files = T.hf_tokenizer_files(tiny[1])
    vocab = json.loads(files["vocab.json"])
    first, second = list(vocab)[1:3]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    E.write_files(tmp_path, files | {"vocab.json": json.dumps(vocab)})
    with pytest.raises(ValueError, match="vocab.json is not the vocabulary its merges.txt gives"):
        T.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- the command


def test_export_open_clip_writes_weights_config_and_tokenizer_that_read_back(tiny, tmp_path,
                                                                              capsys):
    model, tok, path = tiny
    export(path, tmp_path / "tiny-export.pt", "--format", "open_clip")
    out = capsys.readouterr().out
    assert "open_clip.add_model_config" in out
    assert "create_model_and_transforms('tiny-export'" in out
    assert sorted(os.listdir(tmp_path)) == ["tiny-export-tokenizer", "tiny-export.json",
                                            "tiny-export.pt"]  # nothing temporary left
    assert sorted(os.listdir(tmp_path / "tiny-export-tokenizer")) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "tiny-export.json").read_text())
    assert config == E.openclip_model_config(model.config, tmp_path / "tiny-export-tokenizer")
    weights = torch.load(tmp_path / "tiny-export.pt", weights_only=True)
    assert same_tensors(weights, E.to_openclip_state_dict(model.state_dict()))
    loaded, loaded_tok = ckpt.load_checkpoint(str(tmp_path / "tiny-export.pt"), "tiny",
                                              str(tmp_path / "tiny-export-tokenizer"))
    assert loaded.config == model.config and same_tensors(loaded.state_dict(), model.state_dict())
    assert torch.equal(loaded_tok(CAPTIONS), tok(CAPTIONS))


@pytest.mark.parametrize("which", ["clip layout", "trained"])
def test_a_model_openclip_ships_needs_only_the_weights_unless_its_tokenizer_is_ours(
        which, tiny, clip_layout_tokenizer, tmp_path, monkeypatch):
    model, trained, _ = tiny
    monkeypatch.setitem(E.OPENCLIP_BUILTIN, "tiny-builtin", model.config)  # as ViT-B-16 is
    tok = clip_layout_tokenizer if which == "clip layout" else trained
    written, usage = E.export_openclip(model, tok, str(tmp_path / "out.pt"))
    if which == "clip layout":
        assert written == [str(tmp_path / "out.pt")] and os.listdir(tmp_path) == ["out.pt"]
        assert "create_model_and_transforms('tiny-builtin'" in usage[0]
        assert "OpenCLIP's default: CLIP's BPE" in usage[1]
    else:  # a config of its own, to name the tokenizer
        assert sorted(os.listdir(tmp_path)) == ["out-tokenizer", "out.json", "out.pt"]
        assert "add_model_config" in usage[0] and "create_model_and_transforms('out'" in usage[1]


def test_export_writes_nothing_half_way(tiny, tmp_path, monkeypatch, capsys):
    _, _, path = tiny
    out = tmp_path / "tiny.pt"
    export(path, out, "--format", "open_clip")
    before = out.read_bytes()

    def disk_full(obj, file):  # writes part of the file, then fails
        with open(file, "wb") as f:
            f.write(before[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert "No space left on device" in one_line_exit([path, out, "--format", "open_clip"], capsys)
    assert out.read_bytes() == before  # the previous export, whole
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    monkeypatch.undo()
    with pytest.raises(OSError):  # and a first export that fails leaves no file at all
        ckpt.write_atomic(str(tmp_path / "new.pt"), lambda tmp: disk_full(None, tmp))
    assert not (tmp_path / "new.pt").exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@needs_safetensors
def test_export_hf_writes_a_folder_that_reads_back_exactly(tiny, tmp_path, capsys):
    model, tok, path = tiny
    export(path, tmp_path / "hf", "--format", "hf")
    assert "CLIPModel.from_pretrained" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "hf")) == [
        "config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
        "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == E.hf_config(model.config, tok)
    from safetensors.torch import load_file
    assert same_tensors(load_file(tmp_path / "hf" / "model.safetensors"),
                        E.to_hf_state_dict(model.state_dict()))
    loaded, loaded_tok = ckpt.load_checkpoint(str(tmp_path / "hf"))  # no model name or tokenizer
    assert loaded.config == model.config and same_tensors(loaded.state_dict(), model.state_dict())
    assert torch.equal(loaded_tok(CAPTIONS), tok(CAPTIONS))
    # the export of an exported folder is the same folder
    export(tmp_path / "hf", tmp_path / "again", "--format", "hf")
    for name in os.listdir(tmp_path / "hf"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


@pytest.mark.skipif(HAS_SAFETENSORS, reason="safetensors is installed")
def test_export_hf_without_safetensors_is_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    message = one_line_exit([tiny[2], tmp_path / "hf", "--format", "hf"], capsys)
    assert "pip install safetensors" in message
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.pt", "{tmp}/out.pt", "--format", "open_clip"], "no checkpoint at"),
    (["{tmp}/notes.txt", "{tmp}/out.pt", "--format", "open_clip"], "is not a torch file"),
    (["{ckpt}", "{tmp}", "--format", "open_clip"], "is a folder; --format open_clip writes a file"),
    (["{ckpt}", "{tmp}/out.json", "--format", "open_clip"], "name the weights otherwise"),
    (["{ckpt}", "{tmp}/notes.txt", "--format", "hf"], "is a file; --format hf writes a folder"),
    (["{state_dict}", "{tmp}/out.pt", "--format", "open_clip", "--model", "tiny"],
     "carries no tokenizer"),
    (["{tmp}", "{tmp}/out.pt", "--format", "open_clip"], "a folder without config.json"),
    (["{ckpt}", "{tmp}/out.pt", "--format", "onnx"], "--format invalid choice: 'onnx'"),
    (["{ckpt}", "{tmp}/out.pt"], "the following arguments are required: --format"),
])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, args, message):
    model, _, path = tiny
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    places = {"tmp": tmp_path, "ckpt": path, "state_dict": tmp_path / "state_dict.pt"}
    before = sorted(os.listdir(tmp_path))
    assert message in one_line_exit([a.format(**places) for a in args], capsys)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


# ----------------------------------------------------------------------------- the libraries


def features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_open_clip_loads_the_export_and_gives_our_features(tiny, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    model, tok, path = tiny
    export(path, tmp_path / "tiny-export-test.pt", "--format", "open_clip")
    open_clip.add_model_config(tmp_path / "tiny-export-test.json")
    # loads strictly: a missing or unexpected key raises
    theirs, _, _ = open_clip.create_model_and_transforms(
        "tiny-export-test", pretrained=str(tmp_path / "tiny-export-test.pt"))
    images, tokens = torch.randn(2, 3, 64, 64), tok(CAPTIONS)
    if importlib.util.find_spec("transformers"):  # OpenCLIP's HFTokenizer needs it
        tokens = open_clip.get_tokenizer("tiny-export-test")(CAPTIONS)
        assert torch.equal(tokens, tok(CAPTIONS))
    for a, b in zip(features(theirs.eval(), images, tokens), features(model, images, tokens)):
        assert (a - b).abs().max() <= 1e-4


@needs_safetensors
def test_transformers_loads_the_export_and_gives_our_features(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok, path = tiny
    export(path, tmp_path / "hf", "--format", "hf")
    theirs, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf",
                                                          output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched keys
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokens = their_tok([T.clean_caption(c) for c in CAPTIONS], padding="max_length",
                       max_length=32, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokens, tok(CAPTIONS))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image_features = theirs.get_image_features(pixel_values=images)
        text_features = theirs.get_text_features(input_ids=tokens)
    # transformers 5 returns the projected features as pooler_output, 4 a tensor
    theirs_ = [getattr(f, "pooler_output", f) for f in (image_features, text_features)]
    for a, b in zip(theirs_, features(model, images, tokens)):
        assert (a - b).abs().max() <= 1e-4

