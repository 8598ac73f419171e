"""Runs training jobs one after another in each process of a torchrun launch (tests/test_fsdp2.py,
tests/test_lm_trainer.py).

``python -m torch.distributed.run --nproc_per_node 2 tests/launch_runs.py RUNS.json``, RUNS.json a list of
[config file or null, [overrides]]: each is ``diffalign.train.train`` on the config, as ``diffalign train`` runs
it, in the environment the launch gives (DDP; FSDP2 with the environment ``accelerate launch --config_file
configs/accelerate/fsdp2.yaml`` sets). One launch for several runs: torchrun and the imports cost more than the
tiny runs themselves. A run ends with accelerate's ``end_training``, which destroys the process group; here it is
kept until the last run.
"""

from __future__ import annotations

import json
import os
import sys

from accelerate.state import AcceleratorState, PartialState

from diffalign.train import load_config, train

if __name__ == "__main__":
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = AcceleratorState.destroy_process_group = lambda self, group=None: None
    for config, overrides in json.loads(open(sys.argv[1]).read()):
        train(load_config(config, overrides))
    PartialState().wait_for_everyone()
    destroy(PartialState())
    # every run is written; leave without the interpreter's teardown, which can abort on gloo's worker threads
    # ("terminate called without an active exception", as the trainer's last barrier explains)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
