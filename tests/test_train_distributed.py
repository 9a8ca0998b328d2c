"""Two CPU processes (gloo, launched with torchrun): identical LoRA weights on both ranks, one set of
checkpoints, each rank training on its own share of the batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from _train_helpers import REPO, tiny_args

WRAPPER = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch
import train_lora
from midi.lora import lora_state_dicts

original = train_lora.finish

def finish(r, state):  # dump this rank's LoRA weights before the export
    path = os.path.join(os.environ["DUMP_DIR"], f"rank{r.accelerator.process_index}.pt")
    torch.save({"weights": lora_state_dicts(r.pipe), "world": r.accelerator.num_processes}, path)
    original(r, state)

train_lora.finish = finish
sys.exit(train_lora.main(sys.argv[1:]))
"""


def test_two_processes_keep_identical_weights_and_write_one_run(data_root, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(textwrap.dedent(WRAPPER))
    out = tmp_path / "run"
    env = {**os.environ, "DUMP_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(wrapper), *tiny_args(data_root, out, "--validation.preview_every_n_steps", "4")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    a, b = ranks[0]["weights"]["transformer"], ranks[1]["weights"]["transformer"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-2", "checkpoint-4", "config.yaml",
                                                     "lora-final", "previews"]  # fmt: skip
    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["consumed_batches"] == 8  # 4 steps x 2 processes, each with its own batches
    assert json.loads((out / "lora-final" / "midi_adapter.json").read_text())["export_check"]["ok"]
    assert "2 process(es)" in result.stderr
