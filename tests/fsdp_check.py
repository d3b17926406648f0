"""Run under `torchrun --nproc_per_node=2`: a few of train.py's steps (train.train_step) under DDP
and under FSDP2 (distributed.wrap_model with fsdp) from the same weights on the same batches, per
case; then the FSDP run's gathered checkpoint state against the DDP run's own. Rank 0 writes, per
case, {"ddp", "fsdp": the losses, "weight_diff", "moment_diff", "same_layout"}, and
"whole_blocks" (the most blocks whose weights were whole at once), "bf16" (the dtypes of a bf16
step) and "reduce_scatters" (per step, by accum_freq) to the path in argv[1]."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import checkpoint as ckpt
import distributed as D
import masking
import model as M
import train
from conftest import synthetic_batch

# name: (local_loss, accum_freq, grad_checkpointing); each rank's 4 samples in accum_freq
# micro-batches
CASES = {"global": (False, 1, False), "global, accum 2": (False, 2, False),
         "local": (True, 1, False), "local, accum 2": (True, 2, False),
         "checkpointed, accum 2": (False, 2, True)}
STEPS, LR = 4, 1e-3


def batches(rank):
    """STEPS batches of this rank's 4 samples: (images, tokens, keep)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        images, tokens = synthetic_batch(M.PRESETS["tiny"], 8, g)
        keep = masking.keep_indices(8, 8, 0.5, "gaussian", generator=g)
        mine = slice(rank * 4, rank * 4 + 4)
        out.append((images[mine], tokens[mine], keep[mine]))
    return out


def train_steps(fsdp, local_loss, accum, checkpointed, rank, world):
    """(losses, the gathered (weights, optimizer state) on rank 0) of STEPS steps."""
    torch.manual_seed(0)
    orig_model = M.create_model("tiny")
    orig_model.set_grad_checkpointing(checkpointed)
    model = D.wrap_model(orig_model, torch.device("cpu"), world, fsdp=fsdp)
    optimizer = M.configure_optimizer(orig_model, LR, 0.2)
    losses = []
    for images, tokens, keep in batches(rank):
        micro = list(zip(images.chunk(accum), tokens.chunk(accum)))
        loss = train.train_step(model, orig_model, optimizer, micro, list(keep.chunk(accum)),
                                None, torch.autocast("cpu", enabled=False), LR, world,
                                local_loss)
        losses.append(loss.item())
    return losses, ckpt.full_state(orig_model, optimizer)


def largest_difference(a, b):
    """The largest absolute difference between two nests of tensors of the same layout."""
    if torch.is_tensor(a):
        return (a.float() - b.float()).abs().max().item()
    if isinstance(a, dict):  # keys missing on one side: no comparison holds
        return (max(largest_difference(a[k], b[k]) for k in a) if a.keys() == b.keys()
                else float("inf"))
    return 0.0


def layout(state):
    """A nest's keys, shapes and dtypes, and its plain values: what DDP must match to load it."""
    if torch.is_tensor(state):
        return (tuple(state.shape), str(state.dtype))
    if isinstance(state, dict):
        return [(k, layout(v)) for k, v in state.items()]
    if isinstance(state, list):
        return [layout(v) for v in state]
    return state


def whole_blocks_at_once(rank, world):
    """The most Transformer blocks whose weights are whole (not DTensor shards) while any one block
    runs its forward, in an FSDP forward: sharded block by block, the running one and the next,
    prefetched; sharded at the root only, all of them."""
    torch.manual_seed(0)
    model = D.wrap_model(M.create_model("tiny"), torch.device("cpu"), world, fsdp=True)
    blocks, counts = [*model.visual.blocks, *model.text.blocks], []

    def count(module, args):
        counts.append(sum(not isinstance(b.attn.in_proj.weight, DTensor) for b in blocks))
    for block in blocks:
        block.register_forward_pre_hook(count)
    images, tokens, keep = batches(rank)[0]
    model(images, tokens, keep)
    return max(counts)


def reduce_scatters_per_step(accum, rank, world):
    """The gradient reduce-scatters one FSDP step of accum_freq micro-batches makes: one per unit
    (8 blocks and the root) when only the last micro-batch syncs."""
    torch.manual_seed(0)
    orig_model = M.create_model("tiny")
    model = D.wrap_model(orig_model, torch.device("cpu"), world, fsdp=True)
    optimizer = M.configure_optimizer(orig_model, LR, 0.2)
    images, tokens, keep = batches(rank)[0]
    calls, reduce_scatter = [], dist.reduce_scatter_single

    def counted(*args, **kwargs):
        calls.append(1)
        return reduce_scatter(*args, **kwargs)
    dist.reduce_scatter_single = counted  # what FSDP2's default reduce-scatter calls
    try:
        train.train_step(model, orig_model, optimizer, list(zip(images.chunk(accum),
                                                                tokens.chunk(accum))),
                         list(keep.chunk(accum)), None, torch.autocast("cpu", enabled=False), LR,
                         world)
    finally:
        dist.reduce_scatter_single = reduce_scatter
    return len(calls)


def bf16_dtypes(rank, world):
    """{"compute": a block's weights' dtype in its forward, "master": the shards' the optimizer
    steps, "gradient": theirs} of an FSDP step under --precision bf16."""
    torch.manual_seed(0)
    model = D.wrap_model(M.create_model("tiny"), torch.device("cpu"), world, fsdp=True,
                         precision="bf16")
    block, seen = model.visual.blocks[0], []
    block.register_forward_pre_hook(lambda module, args: seen.append(block.mlp.c_fc.weight.dtype))
    images, tokens, keep = batches(rank)[0]
    train.forward_backward(model, [(images, tokens)], [keep], D.autocast("cpu", "bf16"), world)
    weight = block.mlp.c_fc.weight
    return {"compute": str(seen[0]), "master": str(weight.dtype),
            "gradient": str(weight.grad.dtype)}


if __name__ == "__main__":
    rank, _, world, _ = D.setup_distributed()
    results = {}
    for name, case in CASES.items():
        ddp_losses, (ddp_weights, ddp_optimizer) = train_steps(False, *case, rank, world)
        fsdp_losses, (fsdp_weights, fsdp_optimizer) = train_steps(True, *case, rank, world)
        if rank == 0:
            results[name] = {
                "ddp": ddp_losses, "fsdp": fsdp_losses,
                "weight_diff": largest_difference(ddp_weights, fsdp_weights),
                "moment_diff": largest_difference(ddp_optimizer["state"], fsdp_optimizer["state"]),
                "same_layout": layout(ddp_weights) == layout(fsdp_weights)
                and layout(ddp_optimizer) == layout(fsdp_optimizer)}
    results["whole_blocks"] = whole_blocks_at_once(rank, world)
    results["bf16"] = bf16_dtypes(rank, world)
    results["reduce_scatters"] = {accum: reduce_scatters_per_step(accum, rank, world)
                                  for accum in (1, 2)}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()  # a rank that tears down gloo while its peer still works can abort the run
    dist.destroy_process_group()
