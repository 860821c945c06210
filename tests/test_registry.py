"""The graph registry (``wan_trt.registry``): every graph declared once, and read from there.

Graph names are written out only in the registry and in the pipeline's calls; everywhere else in the
package they are the registry's constants. Four graphs share their name with a part of the model
(``transformer``, ``text_encoder``, ``image_encoder``: checkpoint components; ``motion_encoder``: the DiT's
sub-module), which the package names freely as such (dict keys, attribute names, folder names); what
picks out a graph — indexing (``engines["transformer"]``) and comparing (``name == "transformer"``,
``name in (...)``, ``.get("transformer")``) — must use the constants for those too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_layers import ROOT, package_modules

from wan_trt.buckets import is_bucketed
from wan_trt.components import CacheSlot
from wan_trt.presets import Component, get_preset
from wan_trt.registry import GRAPH_NAMES, GRAPHS, graph_specs

DECLARED_IN = {ROOT / "wan_trt" / "registry.py", ROOT / "runtime" / "pipeline.py"}
SHARED_NAMES = frozenset(name for name, graph in GRAPHS.items() if name == graph.component) | (
    frozenset(GRAPH_NAMES) & {v for k, v in vars(Component).items() if not k.startswith("_")})
LOOKUPS = {"get", "pop", "setdefault"}  # a dict's lookup by key


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _selects(node: ast.Constant, parents: dict[ast.AST, ast.AST]) -> str | None:
    """How a string constant picks out a graph: as a subscript's key, a comparison's operand (or an element
    of one, as in ``name in ("a", "b")``) or a lookup's key; None when it is just a value."""
    parent = parents.get(node)
    if isinstance(parent, (ast.Tuple, ast.List, ast.Set)) and isinstance(parents.get(parent), ast.Compare):
        return "compared"
    if isinstance(parent, ast.Subscript) and parent.slice is node:
        return "subscript"
    if isinstance(parent, ast.Compare):
        return "compared"
    if (isinstance(parent, ast.Call) and parent.args and parent.args[0] is node
            and isinstance(parent.func, ast.Attribute) and parent.func.attr in LOOKUPS):
        return "lookup"
    return None


def literal_violations(sources: dict[Path, str]) -> list[str]:
    """Each graph-name literal in ``sources`` (path → text) outside the registry and the pipeline."""
    found = []
    for path, text in sorted(sources.items()):
        if path in DECLARED_IN:
            continue
        tree = ast.parse(text)
        parents = _parents(tree)
        names = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in GRAPH_NAMES]
        for node in sorted(names, key=lambda n: (n.lineno, n.col_offset)):
            how = "literal" if node.value not in SHARED_NAMES else _selects(node, parents)
            if how:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: '{node.value}' ({how})")
    return found


def test_graph_names_are_written_only_in_the_registry_and_the_pipeline():
    sources = {path: path.read_text() for path in package_modules()}
    assert literal_violations(sources) == [], "use the constants of wan_trt.registry"


def test_the_checker_finds_a_graph_name_but_not_a_component_name():
    path = ROOT / "runtime" / "x.py"
    planted = """
from wan_trt.presets import Component
seeds = {"transformer": 53, "vae": 37}             # components' names as keys: fine
part = getattr(dit, "motion_encoder")                # the DiT's sub-module: fine
module = models[Component.TRANSFORMER]               # a component, by its constant: fine
engine = engines["vae_decoder_step"]                 # a graph only: always a graph name
if name == "transformer": pass                       # selects the transformer graph
offload = name in ("text_encoder", "image_encoder")  # selects two graphs
entry = manifest.graphs.get("motion_encoder")
dit = modules["transformer"]
"""
    assert literal_violations({path: planted}) == [
        "runtime/x.py:6: 'vae_decoder_step' (literal)",
        "runtime/x.py:7: 'transformer' (compared)",
        "runtime/x.py:8: 'text_encoder' (compared)",
        "runtime/x.py:8: 'image_encoder' (compared)",
        "runtime/x.py:9: 'motion_encoder' (lookup)",
        "runtime/x.py:10: 'transformer' (subscript)",
    ]
    assert literal_violations({ROOT / "wan_trt" / "registry.py": planted}) == []  # where they are declared
    assert SHARED_NAMES == {"transformer", "text_encoder", "image_encoder", "motion_encoder"}


def test_every_graph_has_exactly_one_module_factory():
    from wan_trt.models.graphs import GRAPH_FACTORIES

    assert list(GRAPH_FACTORIES) == list(GRAPH_NAMES)


def test_declared_batching_and_bucketing_agree_with_the_tensors():
    """``bucketed`` is what the shapes say (``buckets.is_bucketed``); a batched graph has a batch dim."""
    specs = graph_specs(get_preset("tiny"), [CacheSlot(4, 1)], [CacheSlot(4, 1)], vocab_size=64)
    assert list(specs) == list(GRAPH_NAMES)
    for name, graph in GRAPHS.items():
        assert graph.bucketed == is_bucketed(specs[name]), name
        if graph.batched:
            assert all(t.dims[0] == "B" for t in specs[name].inputs), name


def test_parameter_shares_cover_each_component_once():
    """Every parameter of the four components is in exactly one graph, the VAE's once per side: the first
    and step graphs of a side hold the same weights."""
    from wan_trt import preflight

    modules = preflight.meta_modules(get_preset("tiny"), 64)
    counts = preflight.graph_parameter_counts(modules)
    sides = {name: count for name, count in counts.items() if not name.endswith("_first")}
    assert counts["vae_encoder_first"] == counts["vae_encoder_step"] > 0
    assert counts["vae_decoder_first"] == counts["vae_decoder_step"] > 0
    vae = modules[Component.VAE]
    vae_held = sum(p.numel() for m in (vae.encoder, vae.quant_conv, vae.decoder, vae.post_quant_conv)
                   for p in m.parameters())
    total = sum(p.numel() for m in modules.values() for p in m.parameters())
    assert sum(sides.values()) == total - (sum(p.numel() for p in vae.parameters()) - vae_held)
