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


def test_step_seconds_is_a_recent_moving_average_of_decode_steps():
    turns = Turns()
    assert turns.step_seconds() is None  # nothing decoded yet
    turns.note_step(0.010)
    assert turns.step_seconds() == 0.010
    turns.note_step(0.020)
    assert abs(turns.step_seconds() - (0.8 * 0.010 + 0.2 * 0.020)) < 1e-12
    turns._last_step -= Turns.STEP_RECENT_S + 1  # the last step is no longer recent
    assert turns.step_seconds() is None


def test_classify_chunks_shrink_to_a_decode_step_while_generation_runs(
    tmp_path, tiny_bert_dir, monkeypatch
):
    """A real classifier scheduler: with no generation on the device, a 48-text request runs in
    chunks of `classify_rows`; while another base's decode steps are recent and far shorter
    than a chunk, chunks shrink (down to one text). Results are the same either way."""
    import asyncio

    from serving_helpers import make_classifier, register

    from adaptory.adapters.serving.runtime import Runtime
    from adaptory.adapters.serving.scheduler import Job, Scheduler
    from adaptory.registry import Registry

    labels = ["neg", "pos"]
    reg = Registry(tmp_path / "home")
    folder = make_classifier(tiny_bert_dir, tmp_path / "cls", seed=5, labels=labels)
    register(reg, folder, "cls", tiny_bert_dir, task="seq-cls", labels=labels)
    runtime = Runtime(str(tiny_bert_dir), registry=reg, task="seq-cls")
    turns = Turns()  # this test's own device turns, so no other test's steps count
    monkeypatch.setattr("adaptory.adapters.serving.scheduler.device_turns", lambda _d: turns)
    chunks: list[int] = []
    real = runtime.classify_mixed

    def counted(rows):
        chunks.append(len(rows))
        return real(rows)

    runtime.classify_mixed = counted
    texts = [f"text number {i} is {'good' if i % 2 else 'bad'}" for i in range(48)]

    async def classify(scheduler) -> list[dict]:
        job = Job(asyncio.get_running_loop(), asyncio.Queue(), classify=[("cls", t) for t in texts])
        scheduler.submit(job)
        kind, value = await asyncio.wait_for(job.events.get(), 120)
        assert kind == "done", value
        return value

    scheduler = Scheduler(runtime, classify_rows=16, classify_tokens=4096)
    try:
        quiet = asyncio.run(classify(scheduler))
        assert chunks == [16, 16, 16]
        chunks.clear()
        turns._step_s, turns._last_step = 1e-9, 1e12  # decode steps of ~0 s, always recent
        busy = asyncio.run(classify(scheduler))
        assert chunks == [1] * 48
    finally:
        scheduler.stop(timeout=60)
    assert [r["label"] for r in busy] == [r["label"] for r in quiet]
    for a, b in zip(busy, quiet, strict=True):
        assert all(abs(a["scores"][k] - b["scores"][k]) < 1e-5 for k in labels)
