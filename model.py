"""
CLIP in plain PyTorch: a Vision Transformer that encodes only the patches it is told to keep, a
causal text Transformer, the symmetric contrastive (InfoNCE) loss (its gathers over ranks are in
distributed.py), and what training needs to know about the model (nanoGPT's
`configure_optimizers` and `estimate_mfu`): its weight-decay groups and its FLOPs (the GPU peaks
that MFU divides by are in distributed.py).

Shapes and parameter names follow OpenAI CLIP / OpenCLIP (`class_embedding`, `positional_embedding`,
`ln_pre`, `ln_post`, `proj`, `token_embedding`, `ln_final`, `logit_scale`), so an OpenCLIP
`ViT-B-16` state dict loads after a small renaming (checkpoint.py).

    model = create_model("ViT-B-16")                       # 149.6M parameters, as OpenCLIP's
    keep = masking.keep_indices(B, 14, 0.5, "gaussian", device=images.device)  # (B, 98)
    image_features = model.encode_image(images, keep)       # (B, 512): 98 of 196 patches encoded
    text_features = model.encode_text(tokens)               # (B, 512)
    pos = masking.text_keep_indices(tokens, 16, "prioritized")  # FLIP's text masking: (B, 16)
    text_features = model.encode_text(tokens.gather(1, pos), pos)  # each token at its position

Run `python model.py` to print the presets and their parameter counts.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import masking

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 0.01


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
    # CLIP's BPE vocabulary; overridden for a tokenizer trained on the captions
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # an MLP's hidden width is int(width * mlp_ratio), OpenCLIP's rule, in both towers unless the
    # image tower has its own (vision_mlp_ratio: ViT-g-14's and ViT-bigG-14's)
    mlp_ratio: float = 4.0
    vision_mlp_ratio: float | None = None
    # OpenAI's original weights use x * sigmoid(1.702 x); OpenCLIP's ViT-B-16 uses nn.GELU
    quick_gelu: bool = False

    @property
    def grid_size(self):  # patches per side: 14 for ViT-B-16 at 224 px
        return self.image_size // self.patch_size

    @property
    def image_mlp_ratio(self):  # the image tower's MLP ratio
        return self.vision_mlp_ratio or self.mlp_ratio


# ViT-B-16, ViT-L-16, ViT-H-14, ViT-g-14, ViT-bigG-14 and ViT-S-16 are OpenCLIP's model configs
# (model_configs/*.json; its image heads: width / head_width, 64 unless the config says otherwise:
# 80 for ViT-H-14, 88 for ViT-g-14, 104 for ViT-bigG-14, all 16 heads); ViT-Ti-16 (DeiT-Ti's image
# tower) and `tiny` (tests, CPU demo) are ours. OpenAI's original weights need quick_gelu=True.
PRESETS = {
    "ViT-B-16": CLIPConfig(),
    "ViT-L-16": CLIPConfig(embed_dim=768, vision_width=1024, vision_layers=24, vision_heads=16,
                           text_width=768, text_heads=12),
    "ViT-H-14": CLIPConfig(embed_dim=1024, patch_size=14, vision_width=1280, vision_layers=32,
                           vision_heads=16, text_width=1024, text_layers=24, text_heads=16),
    # the image MLPs 6144 and 8192 wide: OpenCLIP's mlp_ratio 4.3637 and 4.9231, rounded down
    "ViT-g-14": CLIPConfig(embed_dim=1024, patch_size=14, vision_width=1408, vision_layers=40,
                           vision_heads=16, vision_mlp_ratio=4.3637, text_width=1024,
                           text_layers=24, text_heads=16),
    "ViT-bigG-14": CLIPConfig(embed_dim=1280, patch_size=14, vision_width=1664, vision_layers=48,
                              vision_heads=16, vision_mlp_ratio=4.9231, text_width=1280,
                              text_layers=32, text_heads=20),
    "ViT-S-16": CLIPConfig(embed_dim=384, vision_width=384, vision_heads=6, text_width=384,
                           text_heads=6),
    "ViT-Ti-16": CLIPConfig(embed_dim=256, vision_width=192, vision_heads=3, text_width=256,
                            text_heads=4),
    "tiny": CLIPConfig(embed_dim=128, image_size=64, patch_size=8, vision_width=128,
                       vision_layers=4, vision_heads=4, context_length=32, vocab_size=1024,
                       text_width=128, text_layers=4, text_heads=4),
}


def create_model(name, **overrides):
    """A freshly initialised CLIP from a preset name; keyword arguments override config fields (e.g.
    vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets are {', '.join(PRESETS)}")
    return CLIP(replace(PRESETS[name], **overrides))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output has its input's dtype, as OpenCLIP's: CUDA autocast runs layer_norm
    in fp32, and without the cast back a bf16 residual stream would turn fp32 after the first
    one."""

    def forward(self, x):
        return super().forward(x).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        # q, k, v stacked, as nn.MultiheadAttention's in_proj_weight
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's init, which OpenCLIP's blocks have: xavier-uniform q, k, v, zero
        # biases; out_proj keeps nn.Linear's default weight
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, T, D = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        if x.is_cpu and q.dtype == torch.bfloat16:
            # the CPU's bf16 attention backward is 4-15x slower than its fp32 one (PyTorch 2.13,
            # docs/speed.md): attend in fp32 there, autocast off so that it stays fp32
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   is_causal=causal).to(q.dtype)
        else:  # flash / memory-efficient kernels on GPU
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block (OpenCLIP's ResidualAttentionBlock)."""

    def __init__(self, width, heads, mlp_ratio, quick_gelu):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        # a Sequential with names, so keys read mlp.c_fc.weight as in OpenCLIP
        self.mlp = nn.Sequential()
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
        # OpenCLIP's init: these three are scale * randn; everything else (conv1, blocks,
        # LayerNorms) keeps PyTorch's defaults: OpenAI CLIP defined no init for its image tower
        scale, patch = width ** -0.5, cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        num_patches = self.grid_size ** 2
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + num_patches, width))
        self.ln_pre = LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, cfg.vision_heads, cfg.image_mlp_ratio,
                                          cfg.quick_gelu) for _ in range(cfg.vision_layers))
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))
        self.grad_checkpointing = False  # CLIP.set_grad_checkpointing

    def forward(self, images, keep=None):
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D): N = G*G patches, row-major
        # positions are added before dropping, so kept patches remember where
        x = x + self.positional_embedding[1:].to(x.dtype)  # in the activations' dtype, as OpenCLIP
        # FLIP / GDM-FLIP: encode only the kept patches, (B, N, D) -> (B, K, D)
        if keep is not None:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype)  # (D,): always kept
        cls = cls.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = self.ln_pre(torch.cat([cls, x], dim=1))  # (B, 1+K, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.ln_post(x[:, 0]) @ self.proj  # class token -> (B, embed_dim)


class TextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, width))
        self.blocks = nn.ModuleList(Block(width, cfg.text_heads, cfg.mlp_ratio, cfg.quick_gelu)
                                    for _ in range(cfg.text_layers))
        self.ln_final = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, cfg.embed_dim))  # OpenCLIP's text_projection
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's init
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=width ** -0.5)
        init_text_blocks(self.blocks, width, cfg.text_layers)
        self.grad_checkpointing = False

    def forward(self, tokens, positions=None):
        """tokens: (B, L) ids; positions: (B, L) where in the caption each one was
        (masking.text_keep_indices, with tokens gathered there), or None for the first L positions,
        as CLIP reads a whole caption."""
        pe = self.positional_embedding  # (T, D)
        # (L, D) or, per sample, (B, L, D)
        pos = pe[: tokens.shape[1]] if positions is None else pe[positions]
        x = self.token_embedding(tokens) + pos  # (B, L, D): a kept token remembers where it stood
        # causal over the kept tokens in order, so the end-of-text one sees all before it
        x = run_blocks(self.blocks, x, self.grad_checkpointing, causal=True)
        x = self.ln_final(x)
        # pool at the end-of-text token, the largest id in the vocabulary (CLIP's convention)
        eot = tokens.argmax(dim=-1)  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.proj


class CLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        # temperature 0.07, as CLIP
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images, keep=None):
        """(B, 3, S, S) -> (B, embed_dim), projected, not normalised. keep: (B, K) patch indices,
        None for all."""
        return self.visual(images, keep)

    def encode_text(self, tokens, positions=None):
        """(B, L) token ids -> (B, embed_dim), projected, not normalised. positions: (B, L) where
        the ids stood in the caption (kept by masking.text_keep_indices), None for 0..L-1."""
        return self.text(tokens, positions)

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of every Transformer block (OpenCLIP's method and
        --grad-checkpointing): a training forward keeps each block's input only, and backward runs
        the block's forward again for the rest. Less activation memory (docs/speed.md) for one more
        forward of the blocks; the same loss and gradients."""
        self.visual.grad_checkpointing = self.text.grad_checkpointing = enable

    def forward(self, images, tokens, keep=None, positions=None):
        image_features = F.normalize(self.encode_image(images, keep), dim=-1)
        text_features = F.normalize(self.encode_text(tokens, positions), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def run_blocks(blocks, x, grad_checkpointing, causal=False):
    """x (B, T, D) through the blocks in turn. Checkpointed (in training only: without gradients
    there is nothing to keep), a block's forward saves nothing for backward but its input: the
    non-reentrant checkpoint, which composes with compiled blocks, DDP and torch.autograd.grad."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, causal, use_reentrant=False)
        else:
            x = block(x, causal)
    return x


def init_text_blocks(blocks, width, layers):
    """CLIP's text-tower init of the block weights: residual projections shrink with depth (GPT-2
    style).

    Only the weights, as OpenCLIP does: attention biases stay zero (nn.MultiheadAttention's) and the
    MLP biases keep nn.Linear's uniform default. Matching this tensor by tensor makes a from-scratch
    run the paper's recipe (its code is an OpenCLIP 2.24 fork).
    """
    attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    for block in blocks:
        for linear, std in [(block.attn.in_proj, attn_std), (block.attn.out_proj, proj_std),
                            (block.mlp.c_fc, fc_std), (block.mlp.c_proj, proj_std)]:
            nn.init.normal_(linear.weight, std=std)


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE over a batch of normalised features, (B, E) each; pair i is the positive of
    row/column i."""
    # (B, B) image -> text; .T: text -> image
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clamp_logit_scale(model):
    """After every optimizer step: the temperature no lower than 0.01 (logit scale <= ln 100), as
    CLIP."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


# ----------------------------------------------------------------------------- optimisation


def param_groups(model, weight_decay):
    """OpenCLIP's rule, as the paper trained: decay every parameter of 2+ dimensions unless its name
    has bn, ln, bias or logit_scale. So both positional embeddings, the token embedding and the
    projections decay; the 1-D class embedding, LayerNorm gains and biases do not."""
    def no_decay(name, p):
        return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0}]


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.98), eps=1e-6):
    """AdamW over param_groups (OpenCLIP's betas and eps for ViTs), with PyTorch's fused kernel on
    a GPU and on the CPU: on the CPU the default is a loop over the tensors, and the fused step
    made a tiny-preset training step about 1.17x faster (docs/speed.md)."""
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


# ----------------------------------------------------------------------------- FLOPs


def transformer_flops(tokens, width, layers, mlp_ratio):
    """Forward FLOPs of `layers` pre-LN blocks over `tokens` tokens, 2 FLOPs per multiply-add,
    matmuls only."""
    dense = 2 * tokens * (4 + 2 * mlp_ratio) * width * width  # q, k, v, out + the two MLP matmuls
    # q @ k^T and att @ v (causal counted in full, as nanoGPT)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (dense + attention)


def flops_per_sample(cfg, kept_patches=None, text_tokens=None):
    """Forward FLOPs for one image-text pair when the image tower sees `kept_patches` patches and
    the text tower `text_tokens` tokens (None: all of them).

    The patch embedding runs on all G*G patches (they are dropped after it) and is counted so; it is
    under 1% of ViT-B-16's cost. The FLOP-ideal training speedups of ViT-B-16 over ratio 0 are then
    about 1.76x at 50% masking, 2.78x at 75%, 4.28x at 90%. At 90% the text tower is 62% of the
    FLOPs; encoding 32 (16) of its 77 tokens raises the ideal speedup at 75% to 3.65x (4.10x) and at
    90% to 6.75x (8.46x).
    """
    n = cfg.grid_size ** 2
    k = n if kept_patches is None else kept_patches
    patch_embed = 2 * n * 3 * cfg.patch_size ** 2 * cfg.vision_width
    image = transformer_flops(1 + k, cfg.vision_width, cfg.vision_layers, cfg.image_mlp_ratio)
    t = cfg.context_length if text_tokens is None else text_tokens
    text = transformer_flops(t, cfg.text_width, cfg.text_layers, cfg.mlp_ratio)
    projections = 2 * (cfg.vision_width + cfg.text_width) * cfg.embed_dim
    return patch_embed + image + text + projections


def encoded_tokens(cfg, ratio, text_length=None):
    """(image patches, text tokens) one training sample encodes at masking `ratio` (every patch at
    0) and --text-length (None: the whole context)."""
    text = min(text_length or cfg.context_length, cfg.context_length)
    return masking.num_kept(cfg.grid_size, ratio), text


def train_flops_per_sample(cfg, ratio, text_length=None):
    """Training FLOPs per image-text pair, for MFU and the compute curves: forward + backward (2x
    forward) of the tokens it encodes."""
    return 3 * flops_per_sample(cfg, *encoded_tokens(cfg, ratio, text_length))


if __name__ == "__main__":
    for name in PRESETS:
        with torch.device("meta"):  # shapes only: ViT-bigG-14's 2.5B parameters never allocated
            model = create_model(name)
        n_vis = sum(p.numel() for p in model.visual.parameters())
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{name:10s} {n_all / 1e6:7.2f}M parameters ({n_vis / 1e6:.2f}M image tower), "
              f"{model.config}")
