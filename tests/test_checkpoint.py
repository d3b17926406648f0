"""The contract of checkpoint.py: this project's, OpenCLIP's and OpenAI's weights load (renamed, and
resized to another grid of patches), files that are not checkpoints are one line, and metrics.jsonl
(and TensorBoard's copy of it) continues from a checkpoint's step."""

import json

import pytest
import torch

import checkpoint as ckpt
import model as M
from conftest import as_scalars, tensorboard_scalars


def tiny(**overrides):
    torch.manual_seed(0)
    return M.create_model("tiny", **overrides).eval()


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_our_checkpoint_loads_with_its_config_and_tokenizer(tiny):
    model, tok, path = tiny
    loaded, loaded_tok = ckpt.load_checkpoint(str(path))  # no model name or tokenizer needed
    assert not loaded.training and loaded.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded_tok(["a photo of a red square"]), tok(["a photo of a red square"]))


def to_openclip(state_dict, prefix="module."):
    """The inverse of checkpoint.convert_openclip_state_dict: our keys -> OpenCLIP's, as a
    DDP-wrapped model saves them."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("blocks.", "transformer.resblocks.")
        key = key.replace("attn.in_proj.weight", "attn.in_proj_weight")
        key = key.replace("attn.in_proj.bias", "attn.in_proj_bias")
        key = "text_projection" if key == "text.proj" else key.removeprefix("text.")
        out[prefix + key] = value
    return out


@pytest.mark.parametrize("wrapped", [True, False])
def test_openclip_checkpoints_load(tiny, tmp_path, wrapped):
    _, tok, _ = tiny
    torch.manual_seed(1)
    # the preset's own vocabulary size, as an OpenCLIP checkpoint would have
    model = M.create_model("tiny")
    prefix = "module." if wrapped else ""
    state = to_openclip(model.state_dict(), prefix)
    assert {prefix + "transformer.resblocks.0.attn.in_proj_weight",
            prefix + "text_projection"} <= set(state)
    torch.save({"epoch": 32, "state_dict": state} if wrapped else state, tmp_path / "openclip.pt")
    loaded, _ = ckpt.load_checkpoint(str(tmp_path / "openclip.pt"), "tiny", tokenizer=tok.to_json())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="tokenizer"):
        ckpt.load_checkpoint(str(tmp_path / "openclip.pt"), "tiny")
    with pytest.raises(ValueError, match="does not fit"):
        ckpt.load_checkpoint(str(tmp_path / "openclip.pt"), "ViT-Ti-16", tokenizer=tok.to_json())


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_a_state_dict_of_our_model_loads(tiny, tmp_path, prefix):
    # a trained tokenizer's few hundred ids, not the preset's 1024: read off the weights
    model, tok, _ = tiny
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "state_dict.pt")
    loaded, _ = ckpt.load_checkpoint(str(tmp_path / "state_dict.pt"), "tiny",
                                     tokenizer=tok.to_json())
    assert loaded.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert model.config.vocab_size == tok.vocab_size < M.PRESETS["tiny"].vocab_size
    torch.save(M.create_model("tiny", vocab_size=tok.vocab_size - 10).state_dict(),
               tmp_path / "fewer_ids.pt")
    with pytest.raises(ValueError,
                       match=f"the tokenizer has {tok.vocab_size} ids, .* {tok.vocab_size - 10}$"):
        ckpt.load_checkpoint(str(tmp_path / "fewer_ids.pt"), "tiny", tokenizer=tok.to_json())


def test_a_checkpoint_from_another_resolution_gets_its_positions_resized(tiny, tmp_path):
    model, tok, path = tiny  # 64 px, 8 px patches: an 8 x 8 grid
    positions = model.state_dict()["visual.positional_embedding"]  # (1 + 64, D)
    # RECLIP: evaluated on a 12 x 12 grid
    loaded, _ = ckpt.load_checkpoint(str(path), image_size=96)
    assert loaded.config.image_size == 96 and loaded.visual.grid_size == 12
    assert torch.equal(loaded.visual.positional_embedding, ckpt.resize_pos_embed(positions, 12))
    assert loaded.visual.positional_embedding.shape == (1 + 144, positions.shape[1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()
               if "positional" not in k or k.startswith("text."))
    with pytest.raises(ValueError, match="multiple of the model's 8 px patches"):
        ckpt.load_checkpoint(str(path), image_size=100)
    torch.manual_seed(2)
    # a plain state dict trained at 32 px
    small = M.create_model("tiny", image_size=32, vocab_size=tok.vocab_size)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    loaded, _ = ckpt.load_checkpoint(str(tmp_path / "small.pt"), "tiny", tokenizer=tok.to_json())
    # the preset's 64 px
    assert loaded.config.image_size == 64 and torch.equal(
        loaded.visual.positional_embedding,
        ckpt.resize_pos_embed(small.visual.positional_embedding.detach(), 8))


def truncated_torch_file(path):
    torch.save({"a": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b""), "is an empty file"),
    (lambda p: p.write_text("epoch 3, loss 0.1\n"), "is not a torch file .*b'epoch 3, los'"),
    (truncated_torch_file, "torch.save file that is truncated or damaged .* 200 bytes"),
    (lambda p: torch.save([torch.zeros(3)], p), "holds a list, not a dict"),
    (lambda p: torch.save({"epoch": 3, "name": "run"}, p),
     "a dict without weights .*'epoch', 'name'"),
    (lambda p: torch.save({"state_dict": 3}, p), "a dict without weights"),
    (lambda p: torch.save({"weights": torch.zeros(3)}, p), "not a CLIP ViT's .*'weights'"),
])
def test_files_that_are_not_checkpoints_are_one_line_value_errors(tmp_path, write, message):
    write(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message) as e:
        ckpt.load_checkpoint(str(tmp_path / "bad.pt"))
    # what it is, and what was expected of a file that is not a torch.save one
    assert "\n" not in str(e.value)
    assert "expected" in str(e.value) or "truncated" in str(e.value)


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pt"))


def openclip_vit_b16_state_dict(prefix=""):
    """A state dict with the key names and shapes OpenCLIP's ViT-B-16 publishes (values: distinct
    random numbers)."""
    shapes = {"logit_scale": (), "visual.class_embedding": (768,),
              "visual.positional_embedding": (197, 768), "visual.proj": (768, 512),
              "visual.conv1.weight": (768, 3, 16, 16), "token_embedding.weight": (49408, 512),
              "positional_embedding": (77, 512), "text_projection": (512, 512)}
    for ln in ["visual.ln_pre", "visual.ln_post", "ln_final"]:
        width = 512 if ln == "ln_final" else 768
        shapes |= {f"{ln}.weight": (width,), f"{ln}.bias": (width,)}
    for tower, width in [("visual.transformer", 768), ("transformer", 512)]:
        for i in range(12):
            b = f"{tower}.resblocks.{i}"
            shapes |= {f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                       f"{b}.attn.in_proj_weight": (3 * width, width),
                       f"{b}.attn.in_proj_bias": (3 * width,),
                       f"{b}.attn.out_proj.weight": (width, width),
                       f"{b}.attn.out_proj.bias": (width,),
                       f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
                       f"{b}.mlp.c_fc.weight": (4 * width, width),
                       f"{b}.mlp.c_fc.bias": (4 * width,),
                       f"{b}.mlp.c_proj.weight": (width, 4 * width),
                       f"{b}.mlp.c_proj.bias": (width,)}
    g = torch.Generator().manual_seed(0)
    return {prefix + k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_openclip_state_dict_maps_every_key(prefix):
    openclip = openclip_vit_b16_state_dict(prefix)
    # a buffer some exports carry; we use is_causal instead
    openclip[prefix + "attn_mask"] = torch.empty(77, 77)
    # OpenAI archives carry config entries too
    openclip[prefix + "context_length"] = torch.tensor(77)
    converted = ckpt.convert_openclip_state_dict(openclip)
    model = M.create_model("ViT-B-16")
    model.load_state_dict(converted, strict=True)  # every key present, none left over, shapes equal
    params = dict(model.named_parameters())
    assert torch.equal(params["text.proj"], openclip[prefix + "text_projection"])
    assert torch.equal(params["visual.blocks.11.attn.in_proj.weight"],
                       openclip[prefix + "visual.transformer.resblocks.11.attn.in_proj_weight"])
    assert torch.equal(params["text.blocks.0.mlp.c_fc.bias"],
                       openclip[prefix + "transformer.resblocks.0.mlp.c_fc.bias"])
    assert torch.equal(params["text.token_embedding.weight"],
                       openclip[prefix + "token_embedding.weight"])


def test_resize_pos_embed_same_grid_is_identity():
    pe = torch.randn(1 + 14 * 14, 16)
    assert torch.equal(ckpt.resize_pos_embed(pe, 14), pe)


@pytest.mark.parametrize("old, new", [(10, 14), (14, 10), (2, 7)])
def test_resize_pos_embed_shapes_and_class_row(old, new):
    pe = torch.randn(1 + old * old, 16)
    out = ckpt.resize_pos_embed(pe, new)
    assert out.shape == (1 + new * new, 16)
    assert torch.equal(out[0], pe[0])  # the class token has no place on the grid


def test_resize_pos_embed_known_values():
    # a 2x2 grid whose value is its column index (0, 1), the same in every channel; resized to 4x4,
    # each row is the 1-D resampling of [0, 1] by the antialiased bicubic kernel (Keys, a = -0.5),
    # with taps falling outside the grid dropped and the rest renormalised. Output column i sits at
    # input coordinate (i + 0.5) / 2 - 0.5; its taps are the two input columns, with k(0.25) =
    # 111/128, k(1.25) = -9/128, k(0.75) = 29/128, giving:
    expected_row = torch.tensor([-9 / 102, 29 / 140, 111 / 140, 1 + 9 / 102])
    # (G0*G0, D), row-major
    grid = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(4, 1).expand(4, 3)
    pe = torch.cat([torch.full((1, 3), 5.0), grid])
    out = ckpt.resize_pos_embed(pe, 4)[1:].reshape(4, 4, 3)
    assert torch.allclose(out, expected_row.view(1, 4, 1).expand(4, 4, 3), atol=1e-6)
    constant = torch.full((1 + 5 * 5, 3), 0.25)
    assert torch.allclose(ckpt.resize_pos_embed(constant, 9), torch.full((1 + 9 * 9, 3), 0.25),
                          atol=1e-6)


def test_resize_pos_embed_rejects_a_non_square_grid():
    with pytest.raises(ValueError, match="1 \\+ G\\*G"):
        ckpt.resize_pos_embed(torch.randn(1 + 12, 8), 4)


def test_fit_state_dict_to_loads_a_lower_resolution_checkpoint():
    low, high = tiny(image_size=48), tiny()  # RECLIP: trained on a 6x6 grid, evaluated on 8x8
    state_dict = low.state_dict()
    fitted = ckpt.fit_state_dict_to(high, state_dict)
    high.load_state_dict(fitted, strict=True)
    assert torch.equal(high.visual.positional_embedding,
                       ckpt.resize_pos_embed(state_dict["visual.positional_embedding"], 8))
    assert torch.equal(high.text.proj, state_dict["text.proj"])
    same = ckpt.fit_state_dict_to(low, state_dict)  # same grid: nothing resized
    assert same["visual.positional_embedding"] is state_dict["visual.positional_embedding"]


def test_resume_drops_what_was_logged_after_the_checkpoint_and_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 4, "loss": 1.0}, {"step": 4, "epoch": 1, "zeroshot_top1": 0.5},
             {"step": 6, "loss": 0.9}]
    # the last line killed mid-write
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')
    ckpt.continue_metrics(str(path), 4)
    assert read_metrics(tmp_path) == lines[:2]


def test_tensorboard_gets_metrics_jsonls_records_and_a_resume_drops_the_same(tmp_path):
    windows = [{"step": s, "loss": 5.0 - s / 4, "mfu": None, "skipped": s // 4} for s in (2, 4, 6)]
    evaluation = {"step": 4, "epoch": 1, "zeroshot_top1": 0.25, "time": 3.5}
    metrics = ckpt.MetricsLog(str(tmp_path), ["tensorboard"])
    for record, kind in [(windows[0], "train"), (windows[1], "train"), (evaluation, "val"),
                         (windows[2], "train")]:
        metrics.append(record, kind)
    metrics.close()
    assert read_metrics(tmp_path) == windows[:2] + [evaluation, windows[2]]
    assert tensorboard_scalars(tmp_path) == as_scalars(read_metrics(tmp_path))
    # resumed from the checkpoint of step 4: step 6 is trained again, once in both logs
    metrics = ckpt.MetricsLog(str(tmp_path), ["tensorboard"], resume_step=4)
    metrics.append(again := {"step": 6, "loss": 3.0, "mfu": None, "skipped": 1}, "train")
    metrics.close()
    assert read_metrics(tmp_path) == windows[:2] + [evaluation, again]
    assert tensorboard_scalars(tmp_path) == as_scalars(read_metrics(tmp_path))
