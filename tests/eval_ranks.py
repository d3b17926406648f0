"""Run under `torchrun --nproc_per_node=2`: every gloo rank evaluates its share of a class folder
with eval.py's evaluate_folder, unmasked, masked and with two masked views, and writes what it
returns to ARGV[3].RANK.json; test_eval.py compares each with one process's pass over the same
folder.

    torchrun --standalone --nproc_per_node=2 tests/eval_ranks.py CHECKPOINT FOLDER OUT
"""

import json
import sys

import torch.distributed as dist

import eval as zeroshot  # `eval` would shadow the builtin
from checkpoint import load_checkpoint

# fp32: the figures are then the same to the bit whatever the batches; bf16 (the default on a CPU
# with AMX or AVX512-BF16) rounds differently in batches of other sizes
PASSES = {"unmasked": {}, "masked": {"mask": "gaussian", "ratio": 0.5},
          "views": {"mask": "random", "ratio": 0.5, "views": 2}}  # two complementary masked views
PASSES = {name: settings | {"precision": "fp32"} for name, settings in PASSES.items()}
BATCH_SIZE = 2  # several batches per rank, the last one short

if __name__ == "__main__":
    checkpoint, folder, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    model, tokenizer = load_checkpoint(checkpoint)
    results = {name: zeroshot.evaluate_folder(model, tokenizer, folder, batch_size=BATCH_SIZE,
                                              workers=0, **settings)
               for name, settings in PASSES.items()}
    with open(f"{out}.{dist.get_rank()}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()  # a rank that tears down gloo while its peer still works can abort the run
    dist.destroy_process_group()
