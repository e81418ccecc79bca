"""A guard for what CPU cannot show (issue 28): the dtypes and ops of the compiled train step's IR.

The CPU backend runs float64 and int64 kernels and ddpm_ms's own CPU kernels; Ascend has few or none.
So each train step (both U-Nets, float32 and float16, the fast kernels off as on Ascend/GPU) is compiled
with MindSpore's IR dump on (tests/ir_worker.py in subprocesses: the dump variables and
DDPM_MS_FAST_KERNELS are read when a process starts) and the kernel graphs it runs (the
``graph_build_*.ir`` files, after every backend pass) are checked:

* no node takes or returns float64 (a tensor, a constant or a scalar);
* no node takes or returns a computed int64 tensor. Allowed: int64 scalars and tuples (axes, shapes,
  tuple indices: host values the kernels take as attributes), int64 constants (the shape operands of
  the conv gradients), and the 0-d int64 overflow flags of MindSpore's own ``ms.amp.all_finite``
  where it does not use its AllFinite kernel (CPU; see ``ALL_FINITE_INT64_OPS``);
* with ``DDPM_MS_FAST_KERNELS=0`` no ``Custom`` (aot) op is in the graph, while with the kernels on
  (float32, CPU) the same detector finds them; and a tiny Cell computing in float64 and int64 is
  flagged: the checks can fail.

A node of a dump reads (inputs -> outputs; the second type line is the kernel's device dtype/format):

  %19(CNode_163) = PrimFunc_Cast(%para10_t) primitive_attrs: {... dst_type: F32} cnode_attrs: {...}
      : (<Tensor[Int32], (2)>) -> (<Tensor[Float32], (2)>)
      : (<Int32xDefaultFormat[const vector]{2}>) -> (<Float32xDefaultFormat[const vector]{2}>)
"""
import collections
import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ir_worker.py")
CASES = ("tutorial:float32", "tutorial:float16", "ddpm:float32", "ddpm:float16")
KERNEL_CASES = ("tutorial:float32", "ddpm:float32")  # the fast kernels are float32 CPU kernels
PROBE = "probe"

# ----- the checker (plain text parsing: no MindSpore in this process) -----

NODE = re.compile(r"^  (?:%\d+\([^)]*\) = )?([@A-Za-z_][\w.@]*)\(")
PARAM = re.compile(r"^%para\d+_\S+: (.*)$")
ENTRY = re.compile(r"<[^<>]*>")
TENSOR = re.compile(r"Tensor\[(\w+)\]")
SCALAR = re.compile(r"\b(Int\d+|UInt\d+|Float\d+|BFloat16|Bool|Complex\d+)\b")
FLOAT64 = re.compile(r"(?<![A-Za-z0-9])(Float64|F64)(?![0-9])")
FUNC_NAME = re.compile(r'func_name: "(?:[^"]*:)?(\w+)"')  # "<library>:<kernel function>"

# MindSpore 2.10's ms.amp.all_finite where its AllFinite kernel is not used (CPU; on Ascend only with
# RANK_TABLE_FILE set, a custom-op package that fails its version check, a global jit_level O2 or the
# GE backend; GPU uses FloatStatus, float32): per gradient flag = 1 - isfinite(g).all(), a 0-d int64
# tensor (Cast, Sub), then addn(flags).reshape(()) < 1 (mindspore/amp.py, _overflow and _all_finite).
# With the fast kernels ddpm_ms's own all_finite op replaces it.
ALL_FINITE_INT64_OPS = {"PrimFunc_Cast", "PrimFunc_Sub", "PrimFunc_AddN", "PrimFunc_Reshape", "PrimFunc_Less"}

Node = collections.namedtuple("Node", "op header types")


def parse_ir(text):
    """The nodes of a .ir dump: op name, header line and type lines (abstract first); params as ``Parameter``."""
    nodes, cur, in_graph = [], None, False
    for line in text.splitlines():
        if line.startswith("subgraph @"):
            in_graph = True
        elif line.startswith("}"):
            in_graph, cur = False, None
        elif not in_graph:
            m = PARAM.match(line)
            if m:
                nodes.append(Node("Parameter", line, [m.group(1).split(" : ")[0]]))
        elif line.lstrip().startswith(": "):
            if cur is not None:
                cur.types.append(line.lstrip()[2:])
        elif not line.lstrip().startswith("#") and NODE.match(line):
            cur = Node(NODE.match(line).group(1), line, [])
            nodes.append(cur)
    return nodes


def entries(typeline):
    """[(entry, "in" | "out")] of an abstract type line ``(<a>, <b>) -> (<c>)``."""
    ins, arrow, outs = typeline.partition(" -> ")
    if not arrow:  # Return and parameters: one side only
        return [(e, "out") for e in ENTRY.findall(ins)]
    return [(e, "in") for e in ENTRY.findall(ins)] + [(e, "out") for e in ENTRY.findall(outs)]


def classify(entry):
    """[(kind, dtype)]: kind "tensor" (computed at run time), "const" (a value node) or "host" (scalar, tuple)."""
    tensors = TENSOR.findall(entry)
    if tensors:
        return [("const" if "value=" in entry else "tensor", d) for d in tensors]
    return [("host", d) for d in SCALAR.findall(entry)]


def _zero_d(entry):
    return re.match(r"<Tensor\[\w+\], \(\)>", entry) is not None


def dtype_violations(nodes):
    """[(what, op, types)] of the nodes that would not suit Ascend: float64 anywhere, computed int64 tensors."""
    bad = []
    for node in nodes:
        shown = (node.types[0] if node.types else node.header)[:300]
        if FLOAT64.search(node.header) or any(FLOAT64.search(t) for t in node.types):
            bad.append(("float64", node.op, shown))
        int64 = [e for e, _ in entries(node.types[0]) if ("tensor", "Int64") in classify(e)] if node.types else []
        if int64 and not (node.op in ALL_FINITE_INT64_OPS and all(_zero_d(e) for e in int64)):
            bad.append(("int64", node.op, shown))
    return bad


def custom_ops(nodes):
    """Names of the Custom (aot) ops in the graph (the kernel function names, e.g. ``all_finite``)."""
    names = set()
    for node in nodes:
        if node.op == "Custom" or 'func_type: "aot"' in node.header:
            name = FUNC_NAME.search(node.header)
            names.add(name.group(1) if name else node.header.strip()[:80])
    return sorted(names)


def dtype_summary(nodes):
    """{(kind, dtype): count} over every node's inputs and outputs (for messages and the README)."""
    counts = collections.Counter()
    for node in nodes:
        for e, _ in entries(node.types[0]) if node.types else ():
            counts.update(classify(e))
    return dict(counts)


def load(paths):
    nodes = []
    for path in paths:
        with open(path) as f:
            nodes += parse_ir(f.read())
    return nodes


# ----- the dumps -----

def _launch(out, cases, kernels_on):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=os.path.join(out, "ir"),
               MS_DEV_DUMP_IR_PASSES="graph_build",  # only the kernel graphs, not ~100 files per graph
               DDPM_MS_FAST_KERNELS="1" if kernels_on else "0")
    env.pop("MS_WORKER_NUM", None)
    return subprocess.Popen([sys.executable, WORKER, out, *cases], env=env, cwd=out, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def worker_split():
    """The worker processes, run side by side: name -> (kernels on, cases); about 10-20 s of compiling each case.
    On one core (a pytest-xdist worker, pinned by tests/conftest.py) the kernels-off cases share one process:
    side by side they would only take turns on it, and each process pays for importing MindSpore."""
    one_core = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < 2
    off = {"off": (False, CASES)} if one_core else {"off-tutorial": (False, CASES[:2]), "off-ddpm": (False, CASES[2:])}
    return {**off, "on": (True, (*KERNEL_CASES, PROBE))}


WORKERS = worker_split()


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """{worker name: (manifest or None, log)} (manifest: see tests/ir_worker.py)."""
    root = tmp_path_factory.mktemp("ir")
    procs = {name: _launch(str(root / name), cases, on) for name, (on, cases) in WORKERS.items()}
    result = {}
    for name, proc in procs.items():
        try:
            log, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0] + "\n(killed after 600 s)"
        manifest = None
        if proc.returncode == 0:
            with open(root / name / "manifest.json") as f:
                manifest = json.load(f)
        result[name] = manifest, log
    return result


def dump(dumps, kernels_on, case):
    """(nodes, manifest) of ``case`` compiled with the fast kernels on or off; fails if its worker did."""
    name = next(n for n, (on, cases) in WORKERS.items() if on == kernels_on and case in cases)
    manifest, log = dumps[name]
    assert manifest is not None, f"ir_worker {name} failed:\n{log[-4000:]}"
    files = manifest["cases"][case]
    assert files, f"{case}: MindSpore wrote no graph_build_*.ir (have its dump variables changed?)\n{log[-2000:]}"
    return load(files), manifest


# ----- the checker itself -----

SAMPLE = """\
# Params:
%para1_t: <Tensor[Int32], (2)> : [2]  :  <Int32xDefaultFormat[const vector]{2}>  :  IsWeight: false
subgraph @kernel_graph0() {
  %0(CNode_1) = PrimFunc_Reshape(%para1_t, (I64(2), I64(1))) primitive_attrs: {IsFeatureMapOutput: Bool(1)}
      : (<Tensor[Int32], (2)>, <Tuple[Int64*2], TupleShape(NoShape, NoShape)>) -> (<Tensor[Int32], (2, 1)>)
      : (<Int32xDefaultFormat[const vector]{2}>, <Int64xDefaultFormat[const vector]{}>) -> (<Int32x...>)
      # In file model.py:3/    x = ops.cast(t, ms.int64)/
  %1(CNode_2) = Conv2DBackpropInput(%2, %3, Tensor(shape=[4], dtype=Int64, value=[2 8 8 8]))
      : (<Tensor[Float32], (2, 8, 8, 8)>, <Tensor[Float32], (8, 8, 3, 3)>, <Tensor[Int64], (4), value=...>) \
-> (<Tensor[Float32], (2, 8, 8, 8)>)
  %4(CNode_3) = PrimFunc_Sub(Tensor(shape=[], dtype=Int64, value=1), %5)
      : (<Tensor[Int64], (), value=...>, <Tensor[Int64], ()>) -> (<Tensor[Int64], ()>)
  %6(CNode_4) = PrimFunc_Cast(%0) primitive_attrs: {dst_type: I64}
      : (<Tensor[Int32], (2, 1)>) -> (<Tensor[Int64], (2, 1)>)
  %7(CNode_5) = Custom(%0) primitive_attrs: {func_type: "aot", func_name: "/c/ddpm_ms_kernels_1.so:ema_update"}
      : (<Tensor[Float32], (2)>) -> (<Tensor[Float64], (2)>)
  Return(%7)
      : (<Tensor[Float32], (2)>)
}
"""


def test_checker_rules_on_a_written_dump():
    nodes = parse_ir(SAMPLE)
    assert [n.op for n in nodes] == ["Parameter", "PrimFunc_Reshape", "Conv2DBackpropInput", "PrimFunc_Sub",
                                     "PrimFunc_Cast", "Custom", "Return"]
    # int64 host tuples (shapes), constants and all_finite's 0-d flags pass; a computed [2, 1] int64 does not
    assert [v[:2] for v in dtype_violations(nodes)] == [("int64", "PrimFunc_Cast"), ("float64", "Custom")]
    assert custom_ops(nodes) == ["ema_update"]
    summary = dtype_summary(nodes)
    assert (summary[("tensor", "Int32")], summary[("host", "Int64")], summary[("const", "Int64")]) == (4, 1, 2)


def test_checker_flags_a_cell_that_computes_in_float64_and_int64(dumps):
    nodes, _ = dump(dumps, True, PROBE)
    bad = {v[:2] for v in dtype_violations(nodes)}
    # the casts into float64 and int64, and the float64 x * 2 itself
    assert {("float64", "PrimFunc_Cast"), ("float64", "PrimFunc_Mul"), ("int64", "PrimFunc_Cast")} <= bad, bad


# ----- the train steps -----

@pytest.mark.parametrize("case", CASES)
def test_train_step_has_no_float64_or_int64_device_tensors(dumps, case):
    nodes, _ = dump(dumps, False, case)
    summary = dtype_summary(nodes)
    assert summary.get(("tensor", "Float32"), 0) > 1000, f"{case}: the parser found too little: {summary}"
    # the config reached the graph: float16 compute (and the float32 master weights) or float32 only
    assert (summary.get(("tensor", "Float16"), 0) > 100) == case.endswith("float16"), summary
    bad = dtype_violations(nodes)
    assert not bad, f"{case}: {len(bad)} nodes:\n" + "\n".join(map(str, bad[:20]))


@pytest.mark.parametrize("case", CASES)
def test_no_custom_kernel_in_the_graph_when_switched_off(dumps, case):
    nodes, manifest = dump(dumps, False, case)
    assert manifest["kernels_enabled"] is False, manifest["kernels"]
    assert custom_ops(nodes) == []


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_custom_kernels_show_in_the_dump_when_on(dumps, case):
    """The other side of the check above: with the kernels on the detector finds them (and dtypes still pass)."""
    nodes, manifest = dump(dumps, True, case)
    if not manifest["kernels_enabled"]:
        pytest.skip(f"the fast CPU kernels are not available here: {manifest['kernels']}")
    found = custom_ops(nodes)
    assert {"all_finite", "ema_update", "group_norm_fwd", "group_norm_bwd", "silu_fwd"} <= set(found), found
    assert not dtype_violations(nodes)
