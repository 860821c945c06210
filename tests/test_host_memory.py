"""CPU runs are planned too (issue 23): the host-memory pre-flight of ``infer --device cpu`` and the one-line
error for an allocation failure that still happens inside an engine."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wan_trt import preflight
from wan_trt.errors import EngineError
from wan_trt.presets import get_preset
from wan_trt.runtime.guard import out_of_memory
from wan_trt.runtime.manifest import GraphEntry, Manifest

MEASURED_ORT_SCORE_BUFFER = 45_722_880_000  # ORT's failed request: tiny DiT, 1280x720 x 77 frames, CPU (issue 23)
NOWHERE = Path("/nonexistent")


def _tiny_manifest() -> Manifest:
    """The tiny preset's fp32 manifest with file sizes = parameters × 4 (sizes are all the estimate reads)."""
    tiny = get_preset("tiny")
    counts = preflight.graph_parameter_counts(preflight.meta_modules(tiny, preflight._tiny_vocab()))
    graphs = {name: GraphEntry(spec=None, file=f"{name}.onnx", sha256="", dtype="fp32", size=4 * params)
              for name, params in counts.items()}
    return Manifest(preset=tiny, seed=0, weights_hash="", precision="fp32", tokenizer_file="", graphs=graphs)


def test_the_estimate_holds_the_score_buffer_onnx_runtime_asked_for():
    manifest = _tiny_manifest()
    ort = preflight.estimate_host_bytes(manifest, NOWHERE, 1280, 720, 77, backend="onnxruntime")
    assert ort.attention_scores == preflight.ORT_SCORE_COPIES * MEASURED_ORT_SCORE_BUFFER
    assert ort.total > ort.attention_scores + ort.weights
    torch_run = preflight.estimate_host_bytes(manifest, NOWHERE, 1280, 720, 77, backend="torch")
    assert torch_run.attention_scores == 0 and torch_run.total < ort.total / 10
    with_guidance = preflight.estimate_host_bytes(manifest, NOWHERE, 1280, 720, 77, backend="onnxruntime", batch=2)
    assert with_guidance.attention_scores == 2 * ort.attention_scores


def test_a_run_that_does_not_fit_is_refused_naming_the_largest_size_that_fits():
    manifest = _tiny_manifest()
    available = 18 * 1024**3
    with pytest.raises(EngineError) as info:
        preflight.check_host_memory(manifest, NOWHERE, 1280, 720, 77, backend="onnxruntime", available=available)
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message
    assert "1280x720" in message and f"{available} bytes" in message and "--backend torch" in message
    suggested = message.split("--resolution ")[1].split(":")[0]
    width, height = (int(side) for side in suggested.split("x"))
    assert width % 16 == 0 and height % 16 == 0 and abs(width / height - 1280 / 720) < 0.05

    def total(w: int, h: int) -> int:
        return preflight.estimate_host_bytes(manifest, NOWHERE, w, h, 77, backend="onnxruntime").total

    assert total(width, height) <= available < total(width + 16 * width // height, height + 16)  # the largest
    assert preflight.check_host_memory(manifest, NOWHERE, width, height, 77, backend="onnxruntime",
                                       available=available).total == total(width, height)
    with pytest.raises(EngineError, match="no smaller size fits"):
        preflight.check_host_memory(manifest, NOWHERE, 1280, 720, 77, backend="torch", available=1024**2)


def test_available_host_memory_respects_an_address_space_limit():
    """``ulimit -v`` (RLIMIT_AS) in a child process: what is available is below the limit."""
    code = textwrap.dedent("""
        import resource
        from wan_trt import preflight
        unlimited = preflight.available_host_bytes()
        limit = 6 * 1024**3
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        limited = preflight.available_host_bytes()
        print(unlimited, limited, limit)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    unlimited, limited, limit = (int(v) for v in out)
    assert 0 <= limited < limit and limited <= unlimited


def test_an_allocation_failure_inside_onnx_runtime_is_one_line(tmp_path):
    """A real one: an ONNX graph whose output is 4 GiB, run through the guard under a tight address-space limit."""
    code = textwrap.dedent(f"""
        import resource, onnx, torch
        from onnx import TensorProto, helper
        from wan_trt.components import GraphSpec, TensorSpec
        from wan_trt.errors import EngineError
        from wan_trt.runtime.engines import OrtEngine
        from wan_trt.runtime.guard import FiniteGuard
        n = 32768
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "outer",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 1]),
             helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "n"])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", "n"])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "{tmp_path}/outer.onnx")
        spec = GraphSpec("outer", "test", (TensorSpec("a", "float32", ("N", 1)), TensorSpec("b", "float32", (1, "N"))),
                         (TensorSpec("c", "float32", ("N", "N")),))
        engine = FiniteGuard(OrtEngine("{tmp_path}/outer.onnx", spec))
        engine.run({{"a": torch.ones(4, 1), "b": torch.ones(1, 4)}})  # opens the session within the limit
        used = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (used + 2 * 1024**3, resource.RLIM_INFINITY))
        try:
            engine.run({{"a": torch.ones(n, 1), "b": torch.ones(1, n)}})
        except EngineError as error:
            print(error)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.startswith("outer ran out of memory (it asked for 4.0 GiB in one buffer)"), out
    assert out.count("\n") == 1


def test_only_allocation_failures_are_turned_into_one_line():
    torch_cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                             "tried to allocate 91445760000 bytes. Error code 12 (Cannot allocate memory)")
    error = out_of_memory("transformer", torch_cpu)
    assert isinstance(error, EngineError) and "transformer ran out of memory (it asked for 85.2 GiB" in str(error)
    assert out_of_memory("transformer", MemoryError()) is not None
    assert out_of_memory("transformer", RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is not None
    assert out_of_memory("transformer", RuntimeError("shape mismatch")) is None
    assert out_of_memory("transformer", EngineError("x ran out of memory")) is None  # already one line
