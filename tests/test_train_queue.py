"""The trainer's --travel-queue: batch 1 trains, and a resumed run continues with the same queue."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_train import assert_states_equal, tiny_config

from reference.checkpoint import load_checkpoint
from reference.train import TrainConfig, build_parser, check_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batch_one_with_a_queue_resumes_exactly(tmp_path, tiny_clip_dir, tiny_folders):
    config = tiny_config(tmp_path / "full", tiny_clip_dir, data=tiny_folders, steps=4, batch_size=1, travel_queue=2)
    train(config, progress=False)
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), steps=2), progress=False)
    halfway = load_checkpoint(tmp_path / "halves" / "latest.pt")
    assert halfway["travel_queue"]["_extra_state"]["src"].shape[0] == 2  # two steps of one row
    train(dataclasses.replace(config, out=str(tmp_path / "halves"), resume=True), progress=False)
    full = load_checkpoint(tmp_path / "full" / "latest.pt")
    halves = load_checkpoint(tmp_path / "halves" / "latest.pt")
    for key in ("generator", "discriminator", "optimizers", "travel_queue", "step"):
        assert_states_equal(full[key], halves[key], key)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss_travel"] == 0.0  # the first step has no partner yet
    assert all(record["loss_travel"] > 0 for record in records[1:])
    resumed = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_travel"] for r in resumed] == [r["loss_travel"] for r in records]


def test_queue_flag_and_its_checks():
    assert build_parser().parse_args(["--travel-queue", "8"]).travel_queue == 8
    with pytest.raises(ValueError, match="batch_size: expected an int >= 2 .*or any with travel_queue > 0"):
        check_config(TrainConfig(data="data", batch_size=1))
    with pytest.raises(ValueError, match="travel_queue: expected an int >= 0"):
        check_config(TrainConfig(data="data", travel_queue=-1))
    with pytest.raises(ValueError, match="travel_queue: expected 0 with travel_objective 'notebook'"):
        check_config(TrainConfig(data="data", travel_queue=4, travel_objective="notebook"))
    check_config(TrainConfig(data="data", batch_size=1, travel_queue=4))
