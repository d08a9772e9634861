"""Run by tests/test_trainer.py under `accelerate launch`: train the tiny profile, then save
this rank's trainable weights so the test can compare ranks."""
import sys

import torch

from opsd_kit.config import load_profile
from opsd_kit.trainer import Trainer

run_dir, algorithm = sys.argv[1], sys.argv[2]
trainer = Trainer(load_profile("tiny", algorithm, run_dir=run_dir, progress=False, max_steps=2))
trainer.train()
rank = trainer.accelerator.process_index
torch.save(trainer.policy.lora_state_dict(), f"{run_dir}/rank{rank}.pt")
print(f"rank {rank} of {trainer.accelerator.num_processes} done")
