"""Run train.py under `torchrun --nproc_per_node=2` with rank 1's clock a second and a half ahead of
rank 0's, as two machines' clocks (or two processes' start-up moments) can be. Every argument is
passed to train.py.

With no --name, each rank computing the timestamped run name itself would pick a different folder;
with no --tokenizer, rank 1 would then look for a tokenizer that rank 0 saved elsewhere. What one
rank decides must be shared."""

import os
import sys
import time

import train

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        real_strftime = time.strftime
        def ahead(fmt, t=None):
            return real_strftime(fmt, time.localtime(time.time() + 1.5) if t is None else t)
        time.strftime = ahead
    train.main(sys.argv[1:])
