"""Run under `torchrun --nproc_per_node=2`: the loss and gradients of a global batch split over two
gloo ranks must equal those of one process over the same samples. Rank 0 writes {"loss_diff",
"grad_diff"} to the path in argv[1]."""

import json
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import masking
import model as M
import train
from conftest import synthetic_batch


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    images, tokens = synthetic_batch(M.PRESETS["tiny"], n, g)
    keep = masking.keep_indices(n, 8, 0.5, "gaussian", generator=g)
    return images, tokens, keep


def grads_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


if __name__ == "__main__":
    rank, _, world, _ = M.setup_distributed()
    images, tokens, keep = batch()
    torch.manual_seed(0)
    ddp = DDP(M.create_model("tiny"))
    shard = slice(rank * 4, rank * 4 + 4)
    micro = [(images[shard], tokens[shard])]
    loss = train.forward_backward(ddp, micro, [keep[shard]], nullcontext(), world)
    if rank == 0:
        torch.manual_seed(0)
        single = M.create_model("tiny")
        ref = M.clip_loss(*single(images, tokens, keep))
        ref.backward()
        result = {"loss_diff": abs(loss.item() - ref.item()),
                  "grad_diff": (grads_of(ddp.module) - grads_of(single)).abs().max().item(),
                  "grad_scale": grads_of(single).abs().max().item()}
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.barrier()  # a rank that tears down gloo while its peer still works can abort the run
    dist.destroy_process_group()
