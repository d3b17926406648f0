"""
Ranks: the launcher's environment (torchrun or SLURM), the process group, values every rank agrees
on (rank 0's, or all ranks'), the feature gathers with gradient that the contrastive loss over the
global batch needs, and its per-rank share (local_clip_loss); the wrappers a model trains under
(DDP, or FSDP2's fully_shard with --fsdp); plus what the scripts share about the device: the
precision and autocast, syncs_raise, compile_blocks, and the GPU peaks that MFU is taken against. A
plain `python` run is rank 0 of 1, and every helper works there.

    rank, local_rank, world, device = setup_distributed()
    all_images = gather_features(image_features)   # (B, E) -> (W*B, E), gradient to my rows
    model = wrap_model(model, device, world, fsdp=False)  # DDP's wrapper; fsdp: sharded in place
"""

import atexit
import contextlib
import os
import re
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

# rank 0 alone writes checkpoints (~1.8 GB for ViT-B-16)
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def launch_env():
    """(rank, local rank, world size, ranks on this machine) from the launcher's environment:
    torchrun's RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE; else SLURM's, for `srun python
    train.py` with one task per GPU (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS /
    SLURM_NTASKS_PER_NODE, as OpenCLIP reads them); else a plain `python`: rank 0 of 1."""
    env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:
        world = int(env.get("WORLD_SIZE", 1))
        return (int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), world,
                int(env.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        # SLURM_TASKS_PER_NODE reads "4(x2)" for 4 tasks on each of 2 nodes
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", str(world))
        return (int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world,
                int(re.match(r"\d+", per_node).group()))
    return 0, 0, 1, 1


def setup_distributed(timeout=PROCESS_GROUP_TIMEOUT):
    """(rank, local_rank, world_size, device): one GPU per process (NCCL), or the CPU (gloo). The
    rendezvous is MASTER_ADDR:MASTER_PORT from the environment (torchrun sets them; under SLURM the
    sbatch script does, as OpenCLIP's does)."""
    rank, local_rank, world, _ = launch_env()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        if not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            raise ValueError(f"rank {rank} of {world}: set MASTER_ADDR and MASTER_PORT (e.g. "
                             "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n "
                             "1) MASTER_PORT=29500) to start the process group")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                rank=rank, world_size=world, store=restart_store(world, timeout))
        atexit.register(teardown)  # every way out: the end, a one-line error, sys.exit
    return rank, local_rank, world, device


def teardown():
    """Destroy the process group while the interpreter is whole. A gloo group left to the
    interpreter's shutdown can abort the process ("terminate called without an active
    exception", SIGABRT) after its work is done. A no-op once destroyed."""
    if dist.is_initialized():
        dist.destroy_process_group()


def restart_store(world, timeout):
    """The rendezvous store of a rank that torchrun restarted (--max-restarts), else None (env://).
    torchrun's agent keeps one store for every attempt, and the process group's keys are not
    named by attempt, so a restarted rank would read the dead ranks' addresses and fail to connect
    ("Connection refused"): each attempt gets keys of its own."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"gdm-flip/attempt_{attempt}", agent)


def rank_and_world():
    """(this process's rank, number of ranks) in an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank_zero(value):
    """Rank 0's `value` (any picklable object) on every rank: what one rank decides, no other
    recomputes."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    """Wait for every rank (nothing to wait for alone)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_ranks(obj):
    """[rank 0's obj, rank 1's, ...] on every rank (small, picklable: CPU tensors); [obj] alone.
    all_gather_object works on gloo and NCCL alike (with NCCL after torch.cuda.set_device)."""
    if rank_and_world()[1] == 1:
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def gather_features(features):
    """(B, E) on each rank -> (W*B, E) on every rank, rank by rank; the gradient flows back to this
    rank's own (B, E) slice only (the others' slices are constants here, and get theirs on their own
    rank)."""
    rank, world = rank_and_world()
    if world == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(gathered, features.detach())
    gathered[rank] = features  # put back the tensor that autograd knows
    return torch.cat(gathered)


class GatherWithGrad(torch.autograd.Function):
    """gather_features whose backward also reaches the other ranks: the gradient that every rank's
    loss sends to this rank's rows is summed here (a reduce-scatter). What a loss over each rank's
    own rows needs (local_clip_loss), where no rank computes the whole loss."""

    @staticmethod
    def forward(ctx, features):  # (B, E) -> (W*B, E), rank by rank
        gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, features.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):  # (W*B, E) on every rank -> the sum of their rows of this rank, (B, E)
        shares = list(grad.contiguous().chunk(dist.get_world_size()))
        own = torch.empty_like(shares[0])
        dist.reduce_scatter(own, shares)
        return own


def local_clip_loss(image_features, text_features, logit_scale):
    """This rank's share of clip_loss over the global batch (OpenCLIP's --local-loss with
    --gather-with-grad): its B images against all W*B texts and its B texts against all W*B images,
    so the logits are two (B, W*B) matrices instead of (W*B, W*B). The mean of the W shares is the
    global loss; the gather carries gradients back to the rank whose features they are, so the
    ranks' gradients, averaged, are the global loss's."""
    rank, world = rank_and_world()
    gather = GatherWithGrad.apply if world > 1 else (lambda features: features)
    all_images, all_texts = gather(image_features), gather(text_features)  # (W*B, E) each
    B = image_features.shape[0]
    labels = torch.arange(rank * B, (rank + 1) * B, device=image_features.device)  # where mine are
    return (F.cross_entropy(logit_scale * image_features @ all_texts.T, labels)
            + F.cross_entropy(logit_scale * text_features @ all_images.T, labels)) / 2


# ----------------------------------------------------------------------------- DDP and FSDP2


def wrap_model(model, device, world_size, fsdp=False, precision="fp32"):
    """The module a training step calls. One rank: the model itself. Several: DDP's wrapper, which
    keeps the whole model, its gradients and AdamW's moments on every rank (16 bytes a parameter in
    fp32). fsdp: the same model sharded in place over the ranks (shard_model), each rank holding
    1/W of those bytes; the object stays `model` and its parameters become DTensors, so build the
    optimizer after this."""
    if fsdp:
        return shard_model(model, device, precision)
    if world_size == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True)  # gradients live in DDP's buckets: no copy


def shard_model(model, device, precision="fp32"):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over every rank of the process group: each
    Transformer block is its own unit (its weights gathered just before it runs, freed after, its
    gradients reduce-scattered as soon as its backward is done), and the root holds the rest (patch
    and token embeddings, positions, final norms, projections). bf16: blocks and root compute in
    bf16 from fp32 master shards and reduce their gradients in fp32 (MixedPrecisionPolicy); fp32:
    no casts. One rank is a group of one (legal, and what a test on one process uses).

    The logit scale stays whole on every rank: fully_shard refuses 0-d parameters, and CLIP's (and
    OpenCLIP's checkpoints') logit_scale is one. Its gradient is averaged over the ranks here as
    DDP would (average_over_ranks)."""
    if not dist.is_initialized():  # plain `python train.py --fsdp`: a process group of one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(teardown)
    bf16 = precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    for block in [*model.visual.blocks, *model.text.blocks]:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, ignored_params={model.logit_scale})
    model.logit_scale.register_post_accumulate_grad_hook(average_over_ranks)
    return model


def average_over_ranks(param):
    """After a backward has added to param.grad: the mean of every rank's. With accumulation it
    runs on every micro-batch, and that is still right: the sum so far is already the same on every
    rank, and averaging (same + mine) gives same + the mean of the new parts."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)


def is_sharded(model):
    """Whether `model` is sharded by FSDP2 (wrap_model with fsdp): its state must be gathered."""
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(model):
    """Within it, backward adds this micro-batch's gradients to the local ones without reducing them
    over the ranks (all but the last micro-batch of an accumulated step): DDP's no_sync, FSDP2's
    set_requires_gradient_sync(False) (whose unsharded gradients then wait for the last
    micro-batch); nothing to skip on one rank."""
    if isinstance(model, DDP):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ----------------------------------------------------------------------------- device contexts


@contextlib.contextmanager
def syncs_raise(enabled):
    """Within it, with `enabled`, a host-device synchronisation raises (CUDA's sync debug mode)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# the --precision flag of train.py, eval.py and bench.py
PRECISIONS = ("bf16", "fp32")
PRECISION_HELP = ("bf16 autocast or fp32 (default: bf16 on a GPU or on a CPU with AMX or "
                  "AVX512-BF16, else fp32; distributed.default_precision)")


def default_precision(device_type):
    """bf16 autocast where bf16 matmuls are fast: a GPU, or a CPU with bf16 instructions, AMX tiles
    (Intel Xeon since Sapphire Rapids: ~6x the fp32 matmul rate on 2 cores) or AVX512-BF16 (AMD EPYC
    since Zen 4, Intel since Cooper Lake: ~3x), docs/speed.md; plain fp32 on other CPUs, where bf16
    is emulated and slower than fp32."""
    if device_type == "cuda":
        return "bf16"
    fast = [getattr(torch.cpu, name, lambda: False)
            for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bf16" if device_type == "cpu" and any(f() for f in fast) else "fp32"


def autocast(device, precision=None):
    """bf16 autocast, or a no-op for fp32; by default default_precision's choice for the device."""
    device_type = torch.device(device).type
    precision = precision or default_precision(device_type)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; used for MFU. The first
# key found in the device name wins, so the PCIe and NVL cards (lower clocks and power) come before
# the SXM "H100" and "H200" they also match.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12,
              "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


def peak_flops_by_name(name):
    """The dense bf16 peak of a GPU from its name (torch.cuda.get_device_name), or None when
    unknown."""
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def peak_flops(device):
    """The bf16 peak of a CUDA device, or None for the CPU or an unknown GPU (MFU is then not
    reported)."""
    if torch.device(device).type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def compile_blocks(model, dynamic=False):
    """torch.compile every Transformer block in place (PyTorch's regional compilation): the blocks
    of a tower are one module class, so they share one compiled graph, and compiling takes seconds
    where the whole model took minutes. The parameter names stay as they are (no `_orig_mod.`). A
    new number of tokens (another masking ratio) compiles the blocks again, not the model; run
    evaluation under torch.compiler.set_stance("force_eager") to use the eager blocks."""
    for block in [*model.visual.blocks, *model.text.blocks]:
        block.compile(dynamic=dynamic)
    return model
