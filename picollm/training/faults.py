"""Fault injection for the reliability tests: the process ends at once (as a SIGKILL would end it) at a
named point of the training run, at a given step.

Nothing is armed in normal use. A test arms a point by setting `ARMED` (`faults.ARMED["before_rename"]
= 4`, or monkeypatch), in the process that trains. The points, in the order a step meets them:

- `inside_step`: the step's update is done in memory, nothing of it is counted, logged or saved;
- `during_eval`: a periodic evaluation is about to start;
- `between_weights_and_state`: a checkpoint's model files are written, its training state is not;
- `before_rename`: a checkpoint is complete in its temporary directory, not yet renamed into place.
"""

from __future__ import annotations

import os

EXIT_CODE = 99
ARMED: dict[str, int] = {}  # point -> the step at which it fires


def reached(point: str, step: int) -> None:
    """Exit with `EXIT_CODE`, running no cleanup, if a test armed `point` for `step`."""
    if ARMED.get(point) == step:
        os._exit(EXIT_CODE)
