"""Run train.py under `torchrun --max-restarts 1` with rank 1 dying in its DIE_AT-th step
(os._exit, as a crash or the OOM killer ends a process: no handler runs), once: the file DIE_MARKER
says it has died, so the ranks torchrun restarts train on. Restarted, rank 1 starts two seconds
after rank 0, as on a slower node. Every argument is passed to train.py."""

import os
import sys
import time

import train

if __name__ == "__main__":
    marker, at = os.environ["DIE_MARKER"], int(os.environ["DIE_AT"])
    if os.environ.get("RANK") == "1" and not os.path.exists(marker):
        step, calls = train.train_step, []

        def dies_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                open(marker, "w").close()
                os._exit(1)
            return step(*args, **kwargs)
        train.train_step = dies_once
    elif os.environ.get("RANK") == "1":
        time.sleep(2)
    train.main(sys.argv[1:])
