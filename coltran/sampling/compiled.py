"""How the sampler's row and pixel steps are compiled: torch.compile with Inductor, dynamic batch, a C++ graph
wrapper and single-row matmuls generated inline on CPU, guards skipped in the steady loop, and one row of pixel
steps captured as a CUDA graph on CUDA (written for CUDA but not run on a GPU here)."""

from __future__ import annotations

import contextlib
import functools

import torch

aten = torch.ops.aten


def _row_mm(a: torch.Tensor, b: torch.Tensor):
    """(1, K) @ (K, N) as a reduction Inductor fuses and vectorises: for one pixel of one image, a BLAS call
    costs several times its arithmetic."""
    return (a.view(-1, 1) * b).sum(0, keepdim=True)


def _cpu_backend(gm, example_inputs):
    # sympy (0.3 s, by symbolic_shapes) is imported here, when compiling, not by every process that imports
    # the sampler
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    table = select_decomp_table()
    mm, addmm = table.get(aten.mm.default), table.get(aten.addmm.default)

    def row_mm(a, b):
        if statically_known_true(a.shape[0] == 1):
            return _row_mm(a, b)
        return NotImplemented if mm is None else mm(a, b)

    def row_addmm(bias, a, b, beta=1, alpha=1):
        if beta == 1 and alpha == 1 and statically_known_true(a.shape[0] == 1):
            return bias + _row_mm(a, b)
        return NotImplemented if addmm is None else addmm(bias, a, b, beta=beta, alpha=alpha)

    table = {**table, aten.mm.default: row_mm, aten.addmm.default: row_addmm}
    return compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True}, decompositions=table)


@functools.cache
def compiled(fn, device_type: str):
    """One compiled version per step function and device type. torch.compile keeps a graph per model structure,
    autocast setting and batch of 1 or more; mode, temperature and positions are tensors and never recompile.
    On CPU the graph's wrapper is C++, which halves the per-call cost, and batch 1's matmuls are inlined."""
    return torch.compile(fn, backend=_cpu_backend if device_type == "cpu" else "inductor")


def mark_batch_dynamic(tensors) -> None:
    """Let the first compile serve every batch size above 1 (batch 1 keeps its own, specialised graph)."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def steady(skip_guards: bool):
    """After a first call, a loop that calls compiled steps with the very same objects cannot change their
    guards' outcome: only the guards that tell compiled entries apart need to run."""
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip_guards else contextlib.nullcontext()


def capture(run, calls: int) -> torch.cuda.CUDAGraph:
    """Record `calls` calls of `run()` as one CUDA graph (capture runs nothing). The calls must already have run,
    and compiled, outside capture, and read and write only buffers that outlive the graph."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            run()
    return graph
