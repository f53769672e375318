"""Processes stopping on a signal agree on the step: the answer is the reduced signal number, never a local one."""

import signal
import types

import torch

from alignkit.training.guard import StopOnSignal, agree_on_stop


def processes(count: int, others_received: int, signal_during_reduce: bool, stop: StopOnSignal):
    """A stand-in accelerator: its max-reduce sees the other processes' numbers and can let a signal land."""
    def reduce(flag, how):
        assert how == "max"
        if signal_during_reduce:
            stop.received = signal.SIGTERM  # what the handler does when the signal arrives mid-collective
        return torch.maximum(flag, torch.tensor(float(others_received)))

    return types.SimpleNamespace(num_processes=count, device=torch.device("cpu"), reduce=reduce)


def test_a_signal_during_the_reduce_counts_at_the_next_step():
    stop = StopOnSignal()
    assert agree_on_stop(stop, processes(2, 0, signal_during_reduce=True, stop=stop)) is False  # as the others
    assert stop.received == signal.SIGTERM
    assert agree_on_stop(stop, processes(2, 0, signal_during_reduce=False, stop=stop)) is True


def test_a_process_without_the_signal_adopts_another_ones():
    stop = StopOnSignal()
    assert agree_on_stop(stop, processes(2, int(signal.SIGINT), signal_during_reduce=False, stop=stop)) is True
    assert stop.received == signal.SIGINT


def test_one_process_answers_locally():
    stop = StopOnSignal()
    assert agree_on_stop(stop, processes(1, 0, signal_during_reduce=False, stop=stop)) is False
    stop.received = signal.SIGTERM
    assert agree_on_stop(stop, processes(1, 0, signal_during_reduce=False, stop=stop)) is True
