"""
CLIP in plain PyTorch: a Vision Transformer that encodes only the patches it is told to keep, a causal text
Transformer, and the symmetric contrastive (InfoNCE) loss.

Shapes and parameter names follow OpenAI CLIP / OpenCLIP (`class_embedding`, `positional_embedding`, `ln_pre`, `ln_post`,
`proj`, `token_embedding`, `ln_final`, `logit_scale`), so an OpenCLIP `ViT-B-16` state dict loads after a small renaming
(`convert_openclip_state_dict`).

    model = create_model("ViT-B-16")                          # 149.6M parameters, as OpenCLIP's
    keep = masking.keep_indices(B, model.visual.grid_size, 0.5, "gaussian", device=images.device)
    image_features = model.encode_image(images, keep)          # (B, 512), only 98 of 196 patches encoded
    text_features = model.encode_text(tokens)                  # (B, 512)
    pos = masking.text_keep_indices(tokens, 16, "prioritized")  # FLIP's text masking: 16 of the 77 tokens, (B, 16)
    text_features = model.encode_text(tokens.gather(1, pos), pos)  # (B, 512), each kept token at its own position
    model.load_state_dict(fit_state_dict_to(model, state_dict))  # e.g. trained at 160 px: positions resized to 14x14

Run `python model.py` to print the presets and their parameter counts.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # the shared image-text embedding
    # image tower
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    # text tower
    context_length: int = 77
    vocab_size: int = 49408  # CLIP's BPE vocabulary; overridden for a tokenizer trained on the captions
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    mlp_ratio: float = 4.0
    quick_gelu: bool = False  # OpenAI's original weights use x * sigmoid(1.702 x); OpenCLIP's ViT-B-16 uses nn.GELU

    @property
    def grid_size(self):  # patches per side: 14 for ViT-B-16 at 224 px
        return self.image_size // self.patch_size


# ViT-B-16 and ViT-S-16 are OpenCLIP's model configs; ViT-Ti-16 (DeiT-Ti's image tower) and `tiny` (tests, CPU demo)
# are ours. OpenAI's original weights need quick_gelu=True.
PRESETS = {
    "ViT-B-16": CLIPConfig(),
    "ViT-S-16": CLIPConfig(embed_dim=384, vision_width=384, vision_heads=6, text_width=384, text_heads=6),
    "ViT-Ti-16": CLIPConfig(embed_dim=256, vision_width=192, vision_heads=3, text_width=256, text_heads=4),
    "tiny": CLIPConfig(embed_dim=128, image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                       context_length=32, vocab_size=1024, text_width=128, text_layers=4, text_heads=4),
}


def create_model(name, **overrides):
    """A freshly initialised CLIP from a preset name; keyword arguments override config fields (e.g. vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets are {', '.join(PRESETS)}")
    return CLIP(replace(PRESETS[name], **overrides))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)  # q, k, v stacked, as nn.MultiheadAttention's in_proj_weight
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's init, which OpenCLIP's blocks have: xavier-uniform q, k, v, zero biases; out_proj
        # keeps nn.Linear's default weight
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, T, D = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # flash / memory-efficient kernels on GPU
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block (OpenCLIP's ResidualAttentionBlock)."""

    def __init__(self, width, heads, mlp_ratio, quick_gelu):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()  # a Sequential with names, so keys read mlp.c_fc.weight as in OpenCLIP
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg.vision_width
        self.grid_size = cfg.grid_size
        # OpenCLIP's init: these three are scale * randn; everything else (conv1, blocks, LayerNorms) keeps PyTorch's
        # defaults, since OpenAI CLIP defined no init for its image tower
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, cfg.vision_heads, cfg.mlp_ratio, cfg.quick_gelu) for _ in range(cfg.vision_layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images, keep=None):
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D): N = G*G patches, row-major
        x = x + self.positional_embedding[1:]  # positions are added before dropping, so kept patches remember where
        if keep is not None:  # FLIP / GDM-FLIP: encode only the kept patches, (B, N, D) -> (B, K, D)
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.class_embedding + self.positional_embedding[0]).expand(x.shape[0], 1, -1)  # always kept
        x = self.ln_pre(torch.cat([cls, x], dim=1))  # (B, 1+K, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj  # class token -> (B, embed_dim)


class TextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.blocks = nn.ModuleList(
            Block(cfg.text_width, cfg.text_heads, cfg.mlp_ratio, cfg.quick_gelu) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))  # OpenCLIP's text_projection
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's init
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=cfg.text_width ** -0.5)
        init_text_blocks(self.blocks, cfg.text_width, cfg.text_layers)

    def forward(self, tokens, positions=None):
        """tokens: (B, L) ids; positions: (B, L) where in the caption each one was (masking.text_keep_indices, with
        tokens gathered there), or None for the first L positions, as CLIP reads a whole caption."""
        pe = self.positional_embedding  # (T, D)
        pos = pe[: tokens.shape[1]] if positions is None else pe[positions]  # (L, D) or, per sample, (B, L, D)
        x = self.token_embedding(tokens) + pos  # (B, L, D): a kept token remembers where it stood
        for block in self.blocks:  # causal over the kept tokens in order, so the end-of-text one sees all before it
            x = block(x, causal=True)
        x = self.ln_final(x)
        # pool at the end-of-text token, which has the largest id in the vocabulary (CLIP's convention)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.proj


class CLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07, as CLIP

    def encode_image(self, images, keep=None):
        """(B, 3, S, S) -> (B, embed_dim), projected, not normalised. keep: (B, K) patch indices, None for all."""
        return self.visual(images, keep)

    def encode_text(self, tokens, positions=None):
        """(B, L) token ids -> (B, embed_dim), projected, not normalised. positions: (B, L) where the ids stood in the
        caption (kept by masking.text_keep_indices), None for 0..L-1."""
        return self.text(tokens, positions)

    def forward(self, images, tokens, keep=None, positions=None):
        image_features = F.normalize(self.encode_image(images, keep), dim=-1)
        text_features = F.normalize(self.encode_text(tokens, positions), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def init_text_blocks(blocks, width, layers):
    """CLIP's text-tower init of the block weights: residual projections shrink with depth (GPT-2 style).

    Only the weights, as OpenCLIP does: attention biases stay zero (nn.MultiheadAttention's) and the MLP biases keep
    nn.Linear's uniform default. Matching this tensor by tensor makes a from-scratch run the paper's recipe (its code is
    an OpenCLIP 2.24 fork).
    """
    attn_std, proj_std, fc_std = width ** -0.5, (width ** -0.5) * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in blocks:
        for linear, std in [(block.attn.in_proj, attn_std), (block.attn.out_proj, proj_std),
                            (block.mlp.c_fc, fc_std), (block.mlp.c_proj, proj_std)]:
            nn.init.normal_(linear.weight, std=std)


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE over a batch of normalised features, (B, E) each; pair i is the positive of row/column i."""
    logits = logit_scale * image_features @ text_features.T  # (B, B) image -> text; its transpose is text -> image
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def transformer_flops(tokens, width, layers, mlp_ratio):
    """Forward FLOPs of `layers` pre-LN blocks over `tokens` tokens, 2 FLOPs per multiply-add, matmuls only."""
    dense = 2 * tokens * (4 + 2 * mlp_ratio) * width * width  # q, k, v, out projections + the two MLP matmuls
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and att @ v (causal counted in full, as nanoGPT does)
    return layers * (dense + attention)


def flops_per_sample(cfg, kept_patches=None, text_tokens=None):
    """Forward FLOPs for one image-text pair when the image tower sees `kept_patches` patches and the text tower
    `text_tokens` tokens (None: all of them, cfg.context_length).

    A training step costs 3x this (the backward pass is about twice the forward). The patch embedding runs on all
    G*G patches (they are dropped after it) and is counted so; it is under 1% of ViT-B-16's cost. With it, the
    FLOP-ideal training speedups of ViT-B-16 over ratio 0 are about 1.76x at 50% masking, 2.78x at 75%, 4.28x at 90%.
    At 90% the text tower is 62% of the FLOPs; encoding 32 (16) of its 77 tokens raises the ideal speedup at 75% to
    3.65x (4.10x) and at 90% to 6.75x (8.46x).
    """
    n = cfg.grid_size ** 2
    k = n if kept_patches is None else kept_patches
    patch_embed = 2 * n * 3 * cfg.patch_size ** 2 * cfg.vision_width
    image = transformer_flops(1 + k, cfg.vision_width, cfg.vision_layers, cfg.mlp_ratio)
    t = cfg.context_length if text_tokens is None else text_tokens
    text = transformer_flops(t, cfg.text_width, cfg.text_layers, cfg.mlp_ratio)
    projections = 2 * (cfg.vision_width + cfg.text_width) * cfg.embed_dim
    return patch_embed + image + text + projections


# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; used for MFU. The first key found in the
# device name wins, so the PCIe and NVL cards (lower clocks and power) come before the SXM "H100" they also match.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


def peak_flops_by_name(name):
    """The dense bf16 peak of a GPU from its name (torch.cuda.get_device_name), or None when it is not in the table."""
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def peak_flops(device):
    """The bf16 peak of a CUDA device, or None for the CPU or an unknown GPU (MFU is then not reported)."""
    if torch.device(device).type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def autocast(device, precision=None):
    """bf16 autocast on a GPU by default, plain fp32 on the CPU (where bf16 matmuls are slow and fp32 is exact)."""
    device_type = torch.device(device).type
    precision = precision or ("bf16" if device_type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def convert_openclip_state_dict(state_dict):
    """An OpenCLIP (or OpenAI CLIP) ViT state dict -> this model's keys. Accepts DDP's `module.` prefix."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("attn_mask"):  # the causal mask is a buffer there; we use is_causal=True
            continue
        if key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archives carry these: config
            continue
        key = key.replace("transformer.resblocks.", "blocks.")
        key = key.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")
        if key == "text_projection":
            key = "text.proj"
        elif not key.startswith("visual.") and key != "logit_scale":
            key = "text." + key  # OpenCLIP keeps the text tower's parameters at the top level
        out[key] = value
    return out


def resize_pos_embed(positional_embedding, grid_size):
    """(1 + G0*G0, D) -> (1 + G*G, D): the class token's row kept, the G0 x G0 grid of position rows resampled to
    G x G. RECLIP trains at a low resolution (fewer patches) and evaluates or tunes at a higher one; resampling is
    OpenCLIP's (bicubic, antialiased, align_corners=False), so its checkpoints and ours load the same way."""
    n, width = positional_embedding.shape
    old = math.isqrt(n - 1)
    if old * old != n - 1:
        raise ValueError(f"positional embedding has {n} rows, not 1 + G*G for a square grid of patches")
    if old == grid_size:
        return positional_embedding
    cls, grid = positional_embedding[:1], positional_embedding[1:]
    grid = grid.reshape(1, old, old, width).permute(0, 3, 1, 2)  # (1, D, G0, G0): rows are row-major patches
    # in fp32: the antialiased kernel has no bf16 / fp16 version on the CPU
    grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, width).to(positional_embedding.dtype)
    return torch.cat([cls, grid])  # (1 + G*G, D)


def fit_state_dict_to(model, state_dict):
    """A state dict in this model's keys (ours, or converted from OpenCLIP) with `visual.positional_embedding`
    resized to `model`'s grid of patches; the other tensors are shared, not copied. Load with model.load_state_dict."""
    key = "visual.positional_embedding"
    return state_dict | {key: resize_pos_embed(state_dict[key], model.visual.grid_size)}


if __name__ == "__main__":
    for name in PRESETS:
        model = create_model(name)
        n_vis = sum(p.numel() for p in model.visual.parameters())
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{name:10s} {n_all / 1e6:7.2f}M parameters ({n_vis / 1e6:.2f}M image tower), {model.config}")
