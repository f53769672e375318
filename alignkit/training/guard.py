"""Keeping long runs safe: signals stop the loop at a step boundary, and non-finite steps are skipped.

SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) only set a flag: the loop finishes the step it is in,
saves a checkpoint and raises `Interrupted` (exit 130 or 143). A second SIGINT stops at once.
A step whose loss or gradient norm is NaN or infinite is not applied (its micro-batches are consumed and the lr
schedule advances); after `limit` such steps in a row the run stops with the last checkpoint untouched.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

from alignkit.errors import Interrupted, RunError
from alignkit.log import log


class StopOnSignal:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        self.received = signum
        log(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or 0)


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when the step may be applied; raises RunError once `limit` bad steps came in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; update skipped "
            f"({self.in_a_row} in a row, limit {self.limit})")
        if self.in_a_row >= self.limit:
            raise RunError(f"the loss or gradient norm was NaN/Inf for {self.limit} steps in a row (last at step "
                           f"{step}); stopped without saving, the last checkpoint is kept. Lower lr or check the data")
        return False


def agree_on_stop(stop, accelerator: Accelerator) -> bool:
    """Whether any process received SIGINT/SIGTERM, the same answer on all of them, once per step.

    A scheduler's signal can reach the processes a step apart; the process that has it must not start saving
    (a collective) while the others start another step, so each step ends with a max-reduce of the signal
    number, and a process that got none adopts it. The answer is the reduced number alone: a signal that lands
    during the reduce is seen by this process only, and counts at the next step's agreement."""
    if accelerator.num_processes == 1:
        return stop.received is not None
    flag = torch.tensor(float(stop.received or 0), device=accelerator.device)
    received = int(accelerator.reduce(flag, "max").item())
    if received and stop.received is None:
        stop.received = received
    return received != 0


def interrupt(stop, step: int, out: Path) -> Interrupted:
    """The exception that ends a run stopped by a signal, with how to continue it."""
    return Interrupted(f"stopped by {signal.Signals(stop.received).name} after step {step}; checkpoint saved in "
                       f"{out / 'checkpoints'}. Run the same command with --resume to continue", stop.exit_code)
