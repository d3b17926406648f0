"""
Export: our checkpoints as files the field's tools load unchanged, OpenCLIP's state dict
(open_clip, CLIP_benchmark; with a model config and the tokenizer beside it when OpenCLIP has
neither) or a Hugging Face CLIPModel folder (transformers). Each gives our features in its library
(docs/reference.md#export) and reads back in checkpoint.load_checkpoint tensor for tensor.

    python export.py logs/RUN/checkpoints/epoch_30.pt out.pt --format open_clip
    python export.py logs/RUN/checkpoints/epoch_30.pt out-hf --format hf

(`python checkpoint.py export CKPT OUT --format ...` is the same command.)
"""

import json
import os
import sys
from dataclasses import replace

import data
import model as M
from checkpoint import (HF_NAMES, LAYER_NORM_EPS, PROJECTIONS, load_checkpoint, rename,
                        safetensors_torch, save_atomic, write_atomic, write_text_atomic)
from tokenizer import PAD, hf_tokenizer_files, is_clip_bpe


# OpenCLIP's own model configs that are presets of ours: for these its name is all OpenCLIP needs
OPENCLIP_BUILTIN = {"ViT-B-16": M.PRESETS["ViT-B-16"],
                    "ViT-B-16-quickgelu": replace(M.PRESETS["ViT-B-16"], quick_gelu=True),
                    "ViT-S-16": M.PRESETS["ViT-S-16"]}


def to_openclip_state_dict(state_dict):
    """This model's keys -> OpenCLIP's: the inverse of convert_openclip_state_dict. The tensors are
    shared, not copied."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("blocks.", "transformer.resblocks.")
        key = key.replace("attn.in_proj.", "attn.in_proj_")  # nn.MultiheadAttention's names
        # OpenCLIP keeps the text tower's parameters at the top level
        out["text_projection" if key == "text.proj" else key.removeprefix("text.")] = value
    return out


def openclip_builtin_name(config):
    """The name of OpenCLIP's own model config that is `config`, or None."""
    return next((name for name, c in OPENCLIP_BUILTIN.items() if c == config), None)


def openclip_model_config(config, tokenizer_folder=None):
    """OpenCLIP's model config (the fields of its model_configs/*.json) of a CLIPConfig; OpenCLIP
    counts the image tower's heads as width / head_width. tokenizer_folder: CLIPTokenizer files for
    OpenCLIP's HFTokenizer, whose clean-up "lower" is clean_caption's."""
    c = config
    vision = {"image_size": c.image_size, "patch_size": c.patch_size, "width": c.vision_width,
              "layers": c.vision_layers, "head_width": c.vision_width // c.vision_heads,
              "mlp_ratio": c.image_mlp_ratio}
    text = {"context_length": c.context_length, "vocab_size": c.vocab_size, "width": c.text_width,
            "heads": c.text_heads, "layers": c.text_layers, "mlp_ratio": c.mlp_ratio}
    if tokenizer_folder is not None:
        text |= {"hf_tokenizer_name": os.path.abspath(tokenizer_folder),
                 "tokenizer_kwargs": {"clean": "lower"}}
    return {"embed_dim": c.embed_dim, "quick_gelu": c.quick_gelu, "vision_cfg": vision,
            "text_cfg": text}


def export_openclip(model, tokenizer, out):
    """`out` (e.g. out.pt): the state dict in OpenCLIP's keys, which
    open_clip.create_model_and_transforms(name, pretrained=out) loads strictly. Beside it, for a
    model OpenCLIP has no config of, STEM.json, its config under the name STEM; for a tokenizer
    other than CLIP's BPE, STEM-tokenizer/ (CLIPTokenizer files), which STEM.json names. Returns
    (the paths written, Python lines that load them)."""
    stem = os.path.splitext(out)[0]
    name = openclip_builtin_name(model.config)
    written, usage = [], []
    tokenizer_folder = None if is_clip_bpe(tokenizer) else stem + "-tokenizer"
    if tokenizer_folder:
        write_files(tokenizer_folder, hf_tokenizer_files(tokenizer))
        written.append(os.path.join(tokenizer_folder, ""))
    if name is None or tokenizer_folder:  # a config for the name, or one naming the tokenizer
        name = os.path.basename(stem)
        config = openclip_model_config(model.config, tokenizer_folder)
        write_text_atomic(stem + ".json", json.dumps(config, indent=1))
        written.append(stem + ".json")
        usage.append(f"open_clip.add_model_config({stem + '.json'!r})")
    save_atomic(to_openclip_state_dict(model.state_dict()), out)
    usage.append(f"model, _, preprocess = open_clip.create_model_and_transforms({name!r}, "
                 f"pretrained={out!r})")
    usage.append(f"tokenizer = open_clip.get_tokenizer({name!r})  # " + (
        "OpenCLIP's default: CLIP's BPE" if tokenizer_folder is None else
        f"HFTokenizer on {tokenizer_folder} (needs transformers)"))
    return [out, *written], usage


def to_hf_state_dict(state_dict):
    """This model's keys -> transformers' CLIPModel's: q, k, v split from the stacked in_proj
    (nn.MultiheadAttention's order), the projections transposed into nn.Linear weights. The tensors
    are ones safetensors stores: contiguous, none sharing memory with another."""
    out = {}
    for key, value in state_dict.items():
        if ".attn.in_proj." in key:
            for part, chunk in zip("qkv", value.chunk(3)):  # (3D, ...) -> (D, ...) each
                out[rename(key.replace("in_proj", f"{part}_proj"), HF_NAMES)] = chunk.clone()
        else:
            out[rename(key, HF_NAMES)] = (value.T if key in PROJECTIONS else value).contiguous()
    return out


def hf_config(config, tokenizer):
    """transformers' CLIPConfig (config.json) of a CLIPConfig. transformers pools the text tower at
    the first eos_token_id (at the ids' argmax only when it is 2, a legacy value); ours pools at the
    argmax, the end-of-text token, the largest id: the same position with eos_token_id = eot."""
    c, act = config, "quick_gelu" if config.quick_gelu else "gelu"
    tower = {"hidden_act": act, "layer_norm_eps": LAYER_NORM_EPS, "projection_dim": c.embed_dim,
             "attention_dropout": 0.0}
    pad = tokenizer.hf.get_vocab().get(PAD, tokenizer.eot)  # as hf_tokenizer_files pads
    text = tower | {
        "model_type": "clip_text_model", "vocab_size": c.vocab_size, "hidden_size": c.text_width,
        "intermediate_size": int(c.text_width * c.mlp_ratio), "num_hidden_layers": c.text_layers,
        "num_attention_heads": c.text_heads, "max_position_embeddings": c.context_length,
        "bos_token_id": tokenizer.sot, "eos_token_id": tokenizer.eot, "pad_token_id": pad}
    vision = tower | {
        "model_type": "clip_vision_model", "hidden_size": c.vision_width,
        "intermediate_size": int(c.vision_width * c.image_mlp_ratio),
        "num_hidden_layers": c.vision_layers, "num_attention_heads": c.vision_heads,
        "image_size": c.image_size, "patch_size": c.patch_size, "num_channels": 3}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
            "text_config": text, "vision_config": vision, "dtype": "float32"}


def hf_image_processor(image_size):
    """transformers' CLIPImageProcessor settings of data.eval_transform: the shorter side resized to
    S (bicubic), an S x S centre crop, [0, 1], OpenAI's mean and std."""
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,  # PIL bicubic
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(data.OPENAI_MEAN), "image_std": list(data.OPENAI_STD)}


def write_files(folder, files):
    """{name: text} into `folder` (made if need be), each file written whole."""
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        write_text_atomic(os.path.join(folder, name), text)


def export_hf(model, tokenizer, out):
    """The folder `out` that transformers.CLIPModel.from_pretrained loads: model.safetensors (fp32,
    transformers' keys), the tokenizer as CLIPTokenizer files, preprocessor_config.json (so
    CLIPProcessor loads too) and, last, config.json. Returns (the paths written, Python lines that
    load them)."""
    save_file = safetensors_torch().save_file
    tensors = to_hf_state_dict(model.state_dict())
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    files = hf_tokenizer_files(tokenizer) | {
        "preprocessor_config.json": json.dumps(hf_image_processor(model.config.image_size),
                                               indent=1),
        "config.json": json.dumps(hf_config(model.config, tokenizer), indent=1)}
    write_files(out, files)  # config.json last: a folder without it is no model
    usage = [f"model = transformers.CLIPModel.from_pretrained({out!r})",
             f"processor = transformers.CLIPProcessor.from_pretrained({out!r})"]
    return [f"{os.path.join(out, '')} ({', '.join(['model.safetensors', *files])})"], usage


def check_export_path(out, fmt):
    """One line for an OUT the format cannot write, before the checkpoint is read."""
    if fmt == "hf":
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"{out} is a file; --format hf writes a folder")
        safetensors_torch()
    elif os.path.isdir(out):
        raise ValueError(f"{out} is a folder; --format open_clip writes a file (e.g. "
                         f"{os.path.join(out, 'model.pt')})")
    elif out.endswith(".json"):
        raise ValueError(f"{out}: the model config beside the weights is STEM.json; name the "
                         "weights otherwise (e.g. model.pt)")


def main(argv=None):
    parser = data.OneLineParser(prog="export.py", description=__doc__.strip().split("\n\n")[0])
    p = parser
    p.add_argument("checkpoint", help="train.py checkpoint, OpenCLIP checkpoint or state dict, or "
                                      "a Hugging Face CLIPModel folder")
    p.add_argument("out", help="open_clip: the file to write (e.g. out.pt); hf: the folder")
    p.add_argument("--format", required=True, choices=["open_clip", "hf"],
                   help="open_clip: for open_clip.create_model_and_transforms and CLIP_benchmark; "
                        "hf: for transformers.CLIPModel.from_pretrained")
    p.add_argument("--model", default="ViT-B-16", choices=list(M.PRESETS),
                   help="preset for state dicts and OpenCLIP checkpoints")
    p.add_argument("--tokenizer", help="vocabulary for state dicts and OpenCLIP checkpoints "
                                       "(CLIP's bpe_simple_vocab_16e6.txt.gz or tokenizer.json)")
    args = parser.parse_args(argv)
    try:
        check_export_path(args.out, args.format)
        model, tokenizer = load_checkpoint(args.checkpoint, args.model, args.tokenizer)
        export = export_openclip if args.format == "open_clip" else export_hf
        written, usage = export(model, tokenizer, args.out)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"export.py: error: {e}")
    print(f"export.py: wrote {', '.join(written)}; in Python:")
    print("\n".join("    " + line for line in usage))


if __name__ == "__main__":
    main()
