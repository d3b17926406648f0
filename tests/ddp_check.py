"""Run under `torchrun --nproc_per_node=2`: the loss and gradients of a global batch split over two
gloo ranks must equal those of one process over the same samples, with the global loss or each
rank's share of it (--local-loss), with and without accumulation. Rank 0 writes, per case,
{"loss_diff", "grad_diff", "grad_scale", "logits"} to the path in argv[1]; "logits" is the largest
logits matrix a rank made, in elements."""

import json
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import masking
import distributed as D
import model as M
import train
from conftest import synthetic_batch

# name: (local_loss, accum_freq); each rank's 4 samples in accum_freq micro-batches
CASES = {"global": (False, 1), "global, accum 2": (False, 2), "local": (True, 1),
         "local, accum 2": (True, 2)}


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    images, tokens = synthetic_batch(M.PRESETS["tiny"], n, g)
    keep = masking.keep_indices(n, 8, 0.5, "gaussian", generator=g)
    return images, tokens, keep


def grads_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


logits_seen = []
cross_entropy = F.cross_entropy


def recorded_cross_entropy(logits, labels):  # the loss's logits, as both losses make them
    logits_seen.append(logits.numel())
    return cross_entropy(logits, labels)


if __name__ == "__main__":
    rank, _, world, _ = D.setup_distributed()
    images, tokens, keep = batch()
    F.cross_entropy = recorded_cross_entropy
    shard = slice(rank * 4, rank * 4 + 4)
    results = {}
    for name, (local_loss, accum) in CASES.items():
        torch.manual_seed(0)
        ddp = DDP(M.create_model("tiny"))
        micro = list(zip(images[shard].chunk(accum), tokens[shard].chunk(accum)))
        logits_seen.clear()
        loss = train.forward_backward(ddp, micro, list(keep[shard].chunk(accum)), nullcontext(),
                                      world, local_loss=local_loss)
        results[name] = loss.item(), grads_of(ddp.module), max(logits_seen)
    if rank == 0:
        torch.manual_seed(0)
        single = M.create_model("tiny")
        ref = M.clip_loss(*single(images, tokens, keep))
        ref.backward()
        with open(sys.argv[1], "w") as f:
            json.dump({name: {"loss_diff": abs(loss - ref.item()),
                              "grad_diff": (grads - grads_of(single)).abs().max().item(),
                              "grad_scale": grads_of(single).abs().max().item(), "logits": logits}
                       for name, (loss, grads, logits) in results.items()}, f)
    dist.barrier()  # a rank that tears down gloo while its peer still works can abort the run
    dist.destroy_process_group()
