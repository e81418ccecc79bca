"""The package's layout: folders by job in layers, every module imports, no library module imports a
command-line module, and the module import graph (every import statement, also those inside
functions) has no cycle.

A command-line module is one that defines ``console_main`` (the console-script entry points of setup.py).

The layers, lowest first (``LAYERS``): a module may import its own folder and lower layers only.
utils/ (errors, files, caches, the device) < data/, models/, diffusion/ (independent of each other:
the diffusion math takes the network as an argument) < config < factory < evaluation/, interop/ <
training/ < pipeline (the one loader, DDPMPipeline) < the commands and command_line.
"""

import ast
import os
import subprocess
import sys

PACKAGE = "ddpm_ms"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def module_files():
    """{module name: path} of every .py file in the package."""
    out = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(directory, name), os.path.dirname(ROOT))[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(directory, name)
    return out


def imported_modules(module, path, known):
    """The package modules that ``module`` names in its import statements (anywhere in the file)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule, else a name of base
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    # only modules of the package; the package root (its __init__ caps oneDNN, imports nothing of ours) is left out
    return {name for name in found if name in known and name != PACKAGE and name != module}


def import_graph():
    files = module_files()
    return files, {m: imported_modules(m, p, files) for m, p in files.items()}


def cli_modules(files):
    def defines_console_main(path):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        return any(isinstance(n, ast.FunctionDef) and n.name == "console_main" for n in tree.body)

    return {m for m, p in files.items() if defines_console_main(p)}


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None (depth-first search)."""
    state = {}  # module -> "open" while on the stack, "done" after
    stack = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


LAYERS = {  # folder or top-level module -> layer
    "utils": 0,
    "data": 1, "models": 1, "diffusion": 1,
    "config": 2,
    "factory": 3,
    "evaluation": 4, "interop": 4,
    "training": 5,
    "pipeline": 6,
    "command_line": 7,  # and every command-line module
}
COMMANDS = 7


def unit_of(module):
    """The folder (``ddpm_ms.<folder>.x`` -> folder) or top-level module name of a package module."""
    return module.split(".")[1]


def layer_of(module, commands):
    return COMMANDS if module in commands else LAYERS.get(unit_of(module))


def layer_violations(graph, commands):
    """[`a imports b` for every import of a higher layer or of another folder of the same layer]."""
    bad = []
    for m, imported in graph.items():
        if m == PACKAGE:
            continue
        for n in imported:
            same_unit = unit_of(m) == unit_of(n)
            if not same_unit and layer_of(n, commands) >= layer_of(m, commands) and layer_of(m, commands) != COMMANDS:
                bad.append(f"{m} (layer {layer_of(m, commands)}) imports {n} (layer {layer_of(n, commands)})")
    return sorted(bad)


def test_the_scan_sees_relative_absolute_and_lazy_imports():
    files, graph = import_graph()
    assert "ddpm_ms.utils.checkpoint" in graph["ddpm_ms.pipeline"]  # from ddpm_ms.utils import checkpoint as ckpt
    assert "ddpm_ms.utils.cache" in graph["ddpm_ms.models.kernels"]  # (in a package __init__)
    assert "ddpm_ms.utils.errors" in graph["ddpm_ms.data.mnist"]  # from ddpm_ms.utils.errors import UserError
    assert "ddpm_ms.pipeline" in graph["ddpm_ms.command_line"]  # imported inside a function
    assert {"ddpm_ms.sample", "ddpm_ms.evaluate", "ddpm_ms.train", "ddpm_ms.gif"} <= cli_modules(files)
    assert "ddpm_ms.pipeline" not in cli_modules(files)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_module_sits_in_a_layer():
    """A new top-level module is a command or is given its layer here; no other folders."""
    files, _ = import_graph()
    commands = cli_modules(files)
    unplaced = sorted(m for m in files if m != PACKAGE and layer_of(m, commands) is None)
    assert not unplaced, f"put these in a folder of LAYERS or give them a layer: {unplaced}"


def test_each_folder_imports_only_lower_layers():
    files, graph = import_graph()
    violations = layer_violations(graph, cli_modules(files))
    assert not violations, violations


def test_the_layer_rule_catches_a_module_in_the_wrong_folder():
    """The rule fails for the misplacements it is for: a model that reaches into training, the
    diffusion math importing a network, and a utility importing the config."""
    files, graph = import_graph()
    commands = cli_modules(files)
    for module, imported in [("ddpm_ms.models.tutorial_unet", "ddpm_ms.training.trainer"),
                             ("ddpm_ms.diffusion.samplers", "ddpm_ms.models.layers"),
                             ("ddpm_ms.utils.checkpoint", "ddpm_ms.config"),
                             ("ddpm_ms.evaluation.metrics", "ddpm_ms.training.trainer"),
                             ("ddpm_ms.training.trainer", "ddpm_ms.pipeline")]:
        wrong = dict(graph, **{module: graph[module] | {imported}})
        assert layer_violations(wrong, commands) == [
            f"{module} (layer {layer_of(module, commands)}) imports {imported} (layer {layer_of(imported, commands)})"]
    # a command may import anything, and a folder its own modules
    command = dict(graph, **{"ddpm_ms.sample": graph["ddpm_ms.sample"] | {"ddpm_ms.training.trainer"}})
    assert not layer_violations(command, commands)


def test_no_library_module_imports_a_command_line_module():
    files, graph = import_graph()
    cli = cli_modules(files)
    offenders = sorted(f"{m} imports {n}" for m in graph if m not in cli for n in graph[m] & cli)
    assert not offenders, offenders


def test_the_module_import_graph_has_no_cycle():
    _, graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_module_imports_in_a_fresh_interpreter():
    files = module_files()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *sorted(files)], capture_output=True, text=True,
                          cwd=os.path.dirname(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
