"""Running the decode step fast: captured as CUDA graphs, or compiled with torch.compile.

A decode step with B rows launches hundreds of small kernels (per layer: 4-bit dequantize and
matmul for seven projections, the LoRA gathers, attention, norms); on a GPU the launches, not
the arithmetic, set its speed. `GraphedSteps` captures the step once per (batch bucket, view
bucket) with `torch.cuda.CUDAGraph` — as vLLM does — and replays it: the step reads only the
batch's persistent buffers (last tokens, positions, each row's LoRA-bank slot, the KV cache),
so a replay after those change computes the new step. Rows beyond the active ones in a bucket
compute garbage that nobody reads. Graphs are recaptured when the buffers they read are
reallocated (the KV cache grows, the LoRA bank grows), and if capture fails the batch decodes
eagerly from then on, logged once.

`CompiledSteps` compiles the same step with `torch.compile(fullgraph=True)`: on the CPU that is
both a speed option and the test that the step has no host synchronisation and no
data-dependent Python branch — what capture needs.
"""

from __future__ import annotations

import logging
import os

import torch

from adaptory.adapters.serving.decode import SMALLEST_VIEW, StepRunner
from adaptory.adapters.serving.kv_cache import bucket

log = logging.getLogger("adaptory.serving")
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS workspaces, lazy init)


def cuda_graphs_usable() -> bool:
    """CUDA is there and capture was not switched off (ADAPTORY_CUDA_GRAPHS=0)."""
    return torch.cuda.is_available() and os.environ.get("ADAPTORY_CUDA_GRAPHS", "1") != "0"


class GraphedSteps(StepRunner):
    """The decode step as CUDA graphs, one per (batch bucket, view bucket), captured lazily."""

    name = "cuda-graphs"

    def __init__(self, batch) -> None:
        super().__init__(batch)
        self.graphs: dict[tuple[int, int], tuple] = {}  # (size, view) -> (graph, logits)
        self.pool = None  # one memory pool shared by every graph of this batch
        self.captured_for: tuple = ()
        self.failed: str | None = None
        self.captures = 0

    def run(self, n: int, longest: int) -> torch.Tensor:
        if self.failed:
            return super().run(n, longest)
        batch = self.batch
        size = bucket(n, largest=batch.cache.slots)
        view = bucket(longest, smallest=SMALLEST_VIEW, largest=batch.cache.length)
        batch.groups(size)  # refresh the grouped path's static buffers outside any capture
        offsets = batch.group_offsets.data_ptr() if batch.group_offsets is not None else 0
        version = (
            batch.cache.version,
            batch.rt._bank.version,
            batch.last_tokens.data_ptr(),
            offsets,
        )
        if version != self.captured_for:  # what the graphs read was reallocated
            self.graphs.clear()
            self.captured_for = version
        entry = self.graphs.get((size, view))
        if entry is None:
            try:
                entry = self.graphs[(size, view)] = self._capture(size, view)
            except Exception as exc:  # capture impossible here: decode eagerly, say so once
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed (%s); decoding eagerly", self.failed)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                return super().run(n, longest)
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self, size: int, view: int):
        batch = self.batch
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # writes the same K/V a replay writes: harmless
                batch.decode_step(size, view, static=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            logits = batch.decode_step(size, view, static=True)
        self.captures += 1
        return graph, logits


class CompiledSteps(StepRunner):
    """The decode step compiled by torch.compile (fullgraph, static shapes per bucket)."""

    name = "compile"

    def __init__(self, batch) -> None:
        super().__init__(batch)
        self.compiled = torch.compile(batch.step_body, fullgraph=True, dynamic=False)

    def run(self, n: int, longest: int) -> torch.Tensor:
        batch = self.batch
        size = bucket(n, largest=batch.cache.slots)
        view = bucket(longest, smallest=SMALLEST_VIEW, largest=batch.cache.length)
        with torch.no_grad(), batch.rt._bank_rows(batch.bank_rows[:size], static=True):
            return self.compiled(size, view)
