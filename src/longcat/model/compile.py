"""``torch.compile`` of the dense blocks (``train.compile``).

Each decoder layer's two MLA blocks, two SwiGLU FFNs and four RMSNorms, and the MTP head, are compiled
module by module (``nn.Module.compile``: the module object stays, so the pipeline stages, FSDP2's
hooks, activation checkpointing and the checkpoint names see the same modules as without it). The MoE
stays eager: its shapes depend on the routing (the per-expert counts), its token dispatcher issues the
EP all-to-all and the ScMoE overlap interleaves the dense steps with those exchanges.

What compiling buys is inductor fusing the elementwise work around the GEMMs (RMSNorm's statistics,
RoPE, the q/kv scales, SiLU * up); the GEMMs themselves stay library calls. Measured on the `small`
preset's step (2048 tokens, fp32, one thread): 1.10-1.13x faster (benchmarks/README.md).

Every instance of a class shares one compiled graph per input shape (modules are inlined, their
parameters are graph inputs), so a model compiles a handful of graphs whatever its depth. Falling back
to eager after too many recompilations is made an error (``fail_on_recompile_limit_hit``), never a
silent slowdown.

Under tensor parallelism the blocks hold this repository's autograd collectives (``distributed/
collectives``: ``dist.all_reduce`` and friends inside ``autograd.Function``s). Dynamo traces them into
the graph as functional collectives, without a graph break (checked at tp = 2 on the ``tiny`` preset,
with and without sequence parallelism: 3 graphs, 0 breaks, ``torch._dynamo.utils.counters``); inductor's
compute/communication reordering is off by default, so they run in the eager model's order, on its
groups (``tests/distributed/test_compile_layouts.py`` holds the results to one process).
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from longcat.model.layer import DecoderLayer
from longcat.model.mtp import MTPHead

__all__ = ["compile_dense_blocks", "cpp_compiler_problem", "dense_blocks"]

_DENSE_CHILDREN = ("self_attn", "mlps", "input_layernorm", "post_attention_layernorm")


def dense_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every dense block ``compile_dense_blocks`` compiles, in ``named_modules`` order:
    each ``DecoderLayer``'s ``self_attn.{0,1}``, ``mlps.{0,1}``, ``input_layernorm.{0,1}``,
    ``post_attention_layernorm.{0,1}`` and the whole ``MTPHead`` (it has no MoE)."""
    for name, module in model.named_modules():
        if isinstance(module, DecoderLayer):
            for child in _DENSE_CHILDREN:
                for i, block in enumerate(getattr(module, child)):
                    yield f"{name}.{child}.{i}", block
        elif isinstance(module, MTPHead):
            yield name, module


def compile_dense_blocks(model: nn.Module) -> list[str]:
    """``torch.compile`` (inductor, static shapes) every dense block of ``model`` in place.

    Args:
        model: a ``LongcatFlashForCausalLM`` (or a pipeline's local model, or any module holding
            ``DecoderLayer`` s / an ``MTPHead``), after the TP / CP / EP plans were applied (they swap
            submodules) and before or after PP / FSDP2 (which keep these module objects).

    Returns:
        The names of the compiled blocks (empty if the model holds none).

    Compilation itself happens at each block's first call (tens of seconds on a CPU, cached on disk
    by inductor across runs).
    """
    names = []
    for name, block in dense_blocks(model):
        block.compile(dynamic=False)
        names.append(name)
    if names:
        # Too many recompilations would otherwise silently run the rest eagerly.
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        # Backward passes that keep the graph (the zero-bubble schedules' input pass, the router
        # gradient-norm ratio of Eq. 9, the SDC replay's first pass) cannot run a compiled backward
        # that reuses ("donates") its saved buffers.
        torch._functorch.config.donated_buffer = False
    return names


# Built and loaded by ``cpp_compiler_problem``: what inductor's CPU kernels need (a C++ shared library
# using the C++ standard library). A C compiler driver (gcc, cc) builds it but leaves libstdc++ out.
_PROBE_CPP = """
#include <sstream>
extern "C" int longcat_probe() { std::ostringstream s; s << 42; return static_cast<int>(s.str().size()); }
"""


def cpp_compiler_problem() -> str | None:
    """Why inductor cannot compile for the CPU on this machine, or None if it can: no C++ compiler in
    inductor's own search (``torch._inductor.config.cpp.cxx``, which follows ``CXX``), or one that cannot
    build and load a small C++ shared library (a C compiler such as ``gcc``, a broken toolchain).
    Checked once per process and compiler setting (about a second)."""
    from torch._inductor import config as inductor_config

    return _cpp_compiler_problem(tuple(inductor_config.cpp.cxx))


@functools.lru_cache(maxsize=8)
def _cpp_compiler_problem(cxx_setting: tuple) -> str | None:
    from torch._inductor.cpp_builder import get_cpp_compiler

    fix = "install one (e.g. g++), point CXX at it, or use train.compile=false"
    try:
        cxx = get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or whatever the search itself raised
        tried = ", ".join(repr(c) for c in cxx_setting if c is not None) or "nothing"
        return (f"train.compile=true on the CPU needs a C++ compiler for inductor's kernels and none works "
                f"(tried {tried}: {type(exc).__name__}); {fix}")
    with tempfile.TemporaryDirectory(prefix="longcat-cxx-probe-") as tmp:
        source, library = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        source.write_text(_PROBE_CPP)
        try:
            done = subprocess.run([cxx, "-shared", "-fPIC", str(source), "-o", str(library)], capture_output=True,
                                  text=True, timeout=300)
            detail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
            if done.returncode != 0:
                return (f"train.compile=true on the CPU: the C++ compiler {cxx!r} cannot build a shared library "
                        f"({detail}); {fix}")
            loaded = ctypes.CDLL(str(library))
            if loaded.longcat_probe() != 2:
                raise OSError("the probe returned a wrong value")
        except (OSError, subprocess.SubprocessError) as exc:
            return (f"train.compile=true on the CPU: a C++ library built by {cxx!r} does not load or run "
                    f"({exc}); is it a C++ compiler (g++, clang++; not gcc or cc)? {fix}")
    return None
