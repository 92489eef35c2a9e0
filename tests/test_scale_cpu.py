"""Eight ranks on CPU (issue 11's CPU part): the same global batch gives the same training as one
rank, the checkpoint holds every rank's files, and an 8-rank checkpoint resumes on 4 ranks."""

from __future__ import annotations

import json

import pytest
import torch

from tests._runs import DEMO, FAST, NO_DROPOUT, checkpoint_model, run_cli

pytestmark = pytest.mark.slow


def test_eight_ranks_match_one_rank_and_resume_on_four(tmp_path):
    common = [str(DEMO), f"data.cache_dir={tmp_path}/cache", *FAST, *NO_DROPOUT,
              "train.max_steps=8", "checkpoint.save_steps=4"]
    one, scaled = tmp_path / "one", tmp_path / "scaled"
    run_cli(["train", *common, f"train.output_dir={one}", "train.per_device_batch_size=32"])
    run_cli(["train", *common, f"train.output_dir={scaled}", "train.per_device_batch_size=4",
             "train.stop_after_steps=4"], procs=8, launcher="torchrun", timeout=600)
    manifest = json.loads((scaled / "checkpoints" / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["world_size"] == 8
    assert manifest["rng_files"] == [f"rng_state_{r}.pth" for r in range(8)]
    run_cli(["train", *common, f"train.output_dir={scaled}", "train.per_device_batch_size=8",
             "train.resume=auto"], procs=4, launcher="torchrun", timeout=600)
    # Same samples at every step (global batch 32); only the order of float sums differs.
    for step in (4, 8):
        a, b = checkpoint_model(one, step), checkpoint_model(scaled, step)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
