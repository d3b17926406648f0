"""Run train.py with rank 1 sent SIGTERM (as SLURM sends it before a time limit) during its
PREEMPT_AT-th step since the start: every rank stops at that step and rank 0 saves it, at the same
step however fast the machine. Every argument is passed to train.py."""

import os
import signal
import sys

import train

if __name__ == "__main__":
    at = int(os.environ["PREEMPT_AT"])
    if os.environ.get("RANK") == "1":
        step, calls = train.train_step, []

        def preempted(*args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                os.kill(os.getpid(), signal.SIGTERM)  # noted now, acted on after the step
            return step(*args, **kwargs)
        train.train_step = preempted
    train.main(sys.argv[1:])
