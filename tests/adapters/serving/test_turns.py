"""Turns on one device between the schedulers of several bases: one at a time, first come first
served, shared per device."""

from __future__ import annotations

import threading

import torch

from adaptory.adapters.serving.scheduler import Turns, device_turns


def _wait_for_tickets(turns: Turns, n: int) -> None:
    """Until n tickets have been handed out (a thread has asked for its turn)."""
    for _ in range(10_000):
        if turns._next >= n:
            return
        threading.Event().wait(0.001)
    raise AssertionError(f"only {turns._next} of {n} tickets were ever taken")


def test_waiting_workers_get_their_turns_in_the_order_they_asked():
    turns, order = Turns(), []
    held = turns.turn()
    held.__enter__()  # the main thread holds the device

    def worker(name: str) -> None:
        with turns.turn():
            order.append(name)

    threads = []
    for i, name in enumerate("BCD"):
        threads.append(threading.Thread(target=worker, args=(name,)))
        threads[-1].start()
        _wait_for_tickets(turns, i + 2)  # B asked before C, C before D
    assert order == []  # nobody computes while the turn is held
    held.__exit__(None, None, None)
    for t in threads:
        t.join(timeout=30)
    assert order == ["B", "C", "D"]


def test_one_worker_at_a_time_and_none_starves():
    turns = Turns()
    inside, most, counts = [0], [0], {}
    lock = threading.Lock()

    def worker(name: str) -> None:
        for _ in range(200):
            with turns.turn():
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    counts[name] = counts.get(name, 0) + 1
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most[0] == 1
    assert counts == {f"w{i}": 200 for i in range(4)}


def test_schedulers_on_one_device_share_turns_and_other_devices_do_not():
    assert device_turns("cpu") is device_turns(torch.device("cpu"))
    assert device_turns("cuda:0") is not device_turns("cpu")
    assert device_turns("cuda:0") is device_turns(torch.device("cuda", 0))
