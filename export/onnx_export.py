"""Export one declared graph to ONNX with torch's dynamo exporter, then check it.

Dynamic axes come from the graph's declaration (``wan_trt.components``): every symbolic dim becomes
a ``torch.export.Dim`` (or an expression of one, e.g. ``4*F-3``), so one ONNX file serves every
resolution and segment length in range. Weights go to external data only when the model is over
protobuf's 2 GB limit. The legacy TorchScript exporter is not used: it fails on this model
(``aten::rms_norm``, ``nearest-exact`` upsampling).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import onnx
import torch

from wan_trt.components import SYMBOL_RANGES, GraphSpec, evaluate_dim, symbols_of

log = logging.getLogger(__name__)

OPSET = 19  # FLOAT8E4M3FN Q/DQ needs >= 19
EXPORT_SIZES = {"B": 2, "F": 2, "h2": 2, "w2": 3, "L": 16, "N": 5}  # example sizes; none 0/1 (export specialises those)
TWO_GB = 2 * 1024**3
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def dynamic_shapes_for(spec: GraphSpec, module: torch.nn.Module) -> dict[str, Any]:
    """The ``dynamic_shapes`` argument for ``module.forward``, keyed by its parameter names."""
    from torch.export import Dim

    dims = {s: Dim(s, min=SYMBOL_RANGES[s][0], max=SYMBOL_RANGES[s][1]) for s in symbols_of(spec)}

    def axes(tensor) -> dict[int, Any] | None:
        found = {i: evaluate_dim(d, dims) for i, d in enumerate(tensor.dims) if isinstance(d, str)}
        return found or None

    per_input = [axes(t) for t in spec.inputs]
    params = list(inspect.signature(module.forward).parameters.values())
    shapes: dict[str, Any] = {}
    for index, param in enumerate(params):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[param.name] = tuple(per_input[index:])
            break
        shapes[param.name] = per_input[index]
    return shapes


def export_graph(spec: GraphSpec, module: torch.nn.Module, path: Path, sizes: Mapping[str, int] | None = None) -> Path:
    """Export ``module`` (which computes ``spec``) to ``path`` and validate the file. Returns ``path``."""
    sizes = dict(EXPORT_SIZES if sizes is None else sizes)
    sample = spec.sample_inputs(sizes, seed=0)
    args = tuple(torch.from_numpy(sample[name]) for name in spec.input_names)
    start = time.monotonic()
    # torch's exporter logs one warning per missing torchvision op; this project uses none of them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes_for(spec, module),
            optimize=True,
            verbose=False,
        )
    make_reproducible(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=size > TWO_GB)
    check_onnx(path)
    log.info("exported %s in %.1f s (%s)", spec.name, time.monotonic() - start, _human(os.path.getsize(path)))
    return path


def make_reproducible(model) -> None:
    """Drop or normalise the exporter's annotations that differ between two exports of one module, so that
    re-exporting unchanged weights gives the same bytes wherever and in whichever process it runs (a LoRA build
    then copies, not refits, every engine whose graph it did not change). Nothing compiles them:
    - the graph's own (torch.export's range constraints print in an order that follows Python's hash seed);
    - each node's stack trace (absolute paths of this checkout and its site-packages);
    - object addresses in the nodes' module paths (``<function sym_float at 0x7f...>``).
    The nodes' module paths stay: calibration.qdq finds each Linear's module in them."""
    model.graph.metadata_props.clear()
    for node in model.graph.all_nodes():
        props = node.metadata_props
        props.pop(STACK_TRACE_KEY, None)
        for key, value in props.items():
            props[key] = _ADDRESS.sub("", value)


def check_onnx(path: Path) -> None:
    """``onnx.checker`` (full check) and shape inference, both through the path so external data works."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in model.graph.input]
    if not names:
        raise RuntimeError(f"{path}: exported graph has no inputs")


def _human(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes} B"
