"""After a resume, TensorBoard's event files hold each step once (the steps the interrupted session logged
after its checkpoint are dropped, then logged again), whichever loader reads them."""

from __future__ import annotations

from collections import Counter

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from test_train import interrupt_training_batch, tiny_config

from sandbox.train import RunInterrupted, resume, train


def scalar_steps(folder, tag: str) -> Counter:
    """How often each step of ``tag`` occurs over all event files of the folder, read raw (no purging)."""
    steps = Counter()
    for path in folder.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            steps.update(event.step for value in event.summary.value if value.tag == tag)
    return steps


def test_resumed_run_has_each_step_once_in_the_event_files(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, steps=16, checkpoint_every=8, eval_every=4)
    with monkeypatch.context() as patch:
        interrupt_training_batch(patch, at_step=11)   # steps 9-11 logged after the checkpoint at step 8
        with pytest.raises(RunInterrupted):
            train(config, progress=False)
    folder = tmp_path / "run"
    assert scalar_steps(folder, "train/loss") == Counter(range(1, 12))
    resume(folder, progress=False)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    assert scalar_steps(folder, "train/loss") == Counter(range(1, 17))
    assert scalar_steps(folder, "valid/loss") == Counter([4, 8, 12, 16])
