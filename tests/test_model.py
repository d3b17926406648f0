"""The contract of model.py: shapes, masking inside the image tower, the loss, and OpenCLIP interop."""

import math

import pytest
import torch

import masking
import model as M


def tiny(**overrides):
    torch.manual_seed(0)
    return M.create_model("tiny", **overrides).eval()


def random_tokens(batch, context, vocab, generator=None):
    """Token ids in [1, vocab-2] with the end-of-text token (the largest id) at a random position, zeros after it."""
    tokens = torch.randint(1, vocab - 1, (batch, context), generator=generator)
    eot = torch.randint(1, context, (batch,), generator=generator)
    tokens[torch.arange(batch), eot] = vocab - 1
    tokens[torch.arange(context) > eot[:, None]] = 0
    return tokens


def test_vit_b16_has_openclip_shapes():
    model = M.create_model("ViT-B-16")
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # OpenCLIP's ViT-B-16: 149.62M
    assert model.visual.grid_size == 14 and model.visual.positional_embedding.shape == (197, 768)
    assert model.text.positional_embedding.shape == (77, 512) and model.text.proj.shape == (512, 512)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_vit_b16_masked_forward_and_backward_on_cpu():
    model = M.create_model("ViT-B-16")
    images, tokens = torch.randn(2, 3, 224, 224), random_tokens(2, 77, 49408)
    keep = masking.keep_indices(2, 14, 0.5, "gaussian")
    image_features, text_features, scale = model(images, tokens, keep)
    assert image_features.shape == text_features.shape == (2, 512)
    M.clip_loss(image_features, text_features, scale).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dropped_patches_do_not_matter_and_kept_ones_do():
    model, g = tiny(), torch.Generator().manual_seed(0)
    grid, patch = model.visual.grid_size, model.config.patch_size
    images = torch.randn(1, 3, 64, 64, generator=g)
    keep = masking.keep_indices(1, grid, 0.5, "random", generator=g)
    dropped = sorted(set(range(grid * grid)) - set(keep[0].tolist()))

    def perturb(index):  # add noise to one patch, numbered row-major
        out = images.clone()
        r, c = divmod(index, grid)
        out[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 1.0
        return out

    with torch.no_grad():
        base = model.encode_image(images, keep)
        assert torch.equal(model.encode_image(perturb(dropped[0]), keep), base)
        assert not torch.allclose(model.encode_image(perturb(keep[0, 0].item()), keep), base)
        # keeping every patch is the same as not masking at all
        all_patches = torch.arange(grid * grid).unsqueeze(0)
        assert torch.allclose(model.encode_image(images, all_patches), model.encode_image(images), atol=1e-6)


def test_text_is_causal_and_pooled_at_end_of_text():
    model = tiny()
    tokens = random_tokens(4, 32, 1024, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.encode_text(tokens)
        after = tokens.clone()
        eot = tokens.argmax(-1)
        for i, e in enumerate(eot.tolist()):  # change what comes after the end-of-text token
            after[i, e + 1:] = 7
        assert torch.allclose(model.encode_text(after), base, atol=1e-6)
        before = tokens.clone()
        before[:, 0] = 5  # change the first token: the pooled (last) position sees it
        assert not torch.allclose(model.encode_text(before), base)


def test_forward_returns_normalised_features():
    model = tiny()
    images, tokens = torch.randn(3, 3, 64, 64), random_tokens(3, 32, 1024)
    img, txt, scale = model(images, tokens)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_clip_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    assert M.clip_loss(img, txt, torch.tensor(10.0)).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert M.clip_loss(img, img, torch.tensor(100.0)) < 0.01  # perfectly matched pairs: near zero
    assert M.clip_loss(img, txt, torch.tensor(10.0)).item() == pytest.approx(M.clip_loss(txt, img, torch.tensor(10.0)).item())


def test_tiny_preset_under_torch_compile():
    model = tiny()
    images, tokens = torch.randn(4, 3, 64, 64), random_tokens(4, 32, 1024)
    keep = masking.keep_indices(4, model.visual.grid_size, 0.5, "gaussian")
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(images, tokens, keep)
        out = compiled(images, tokens, keep)
    for a, b in zip(out, eager):
        assert torch.allclose(a, b, atol=1e-5)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("ViT-X-99")


def openclip_vit_b16_state_dict(prefix=""):
    """A state dict with the key names and shapes OpenCLIP's ViT-B-16 publishes (values: distinct random numbers)."""
    shapes = {"logit_scale": (), "visual.class_embedding": (768,), "visual.positional_embedding": (197, 768),
              "visual.proj": (768, 512), "visual.conv1.weight": (768, 3, 16, 16), "token_embedding.weight": (49408, 512),
              "positional_embedding": (77, 512), "text_projection": (512, 512)}
    for ln in ["visual.ln_pre", "visual.ln_post", "ln_final"]:
        width = 512 if ln == "ln_final" else 768
        shapes |= {f"{ln}.weight": (width,), f"{ln}.bias": (width,)}
    for tower, width in [("visual.transformer", 768), ("transformer", 512)]:
        for i in range(12):
            b = f"{tower}.resblocks.{i}"
            shapes |= {f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                       f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
                       f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                       f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
                       f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
                       f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,)}
    g = torch.Generator().manual_seed(0)
    return {prefix + k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_openclip_state_dict_maps_every_key(prefix):
    openclip = openclip_vit_b16_state_dict(prefix)
    openclip[prefix + "attn_mask"] = torch.empty(77, 77)  # a buffer some exports carry; we use is_causal instead
    openclip[prefix + "context_length"] = torch.tensor(77)  # OpenAI archives carry config entries too
    converted = M.convert_openclip_state_dict(openclip)
    model = M.create_model("ViT-B-16")
    model.load_state_dict(converted, strict=True)  # every key present, none left over, shapes equal
    params = dict(model.named_parameters())
    assert torch.equal(params["text.proj"], openclip[prefix + "text_projection"])
    assert torch.equal(params["visual.blocks.11.attn.in_proj.weight"],
                       openclip[prefix + "visual.transformer.resblocks.11.attn.in_proj_weight"])
    assert torch.equal(params["text.blocks.0.mlp.c_fc.bias"], openclip[prefix + "transformer.resblocks.0.mlp.c_fc.bias"])
    assert torch.equal(params["text.token_embedding.weight"], openclip[prefix + "token_embedding.weight"])


def test_flops_count_masked_tokens():
    cfg = M.PRESETS["ViT-B-16"]
    full, half = M.flops_per_sample(cfg), M.flops_per_sample(cfg, masking.num_kept(14, 0.5))
    assert 40e9 < full < 42e9  # ~41 GFLOPs per image-text pair, forward
    assert 1.7 < full / half < 1.8  # the text tower is not masked, so less than 2x


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 3060", None),  # unknown: MFU is not reported rather than made up
])
def test_peak_flops_by_device_name(name, peak):
    assert M.peak_flops_by_name(name) == peak


def test_no_peak_on_the_cpu():
    assert M.peak_flops("cpu") is None
