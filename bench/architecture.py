"""How the source tree reads, in numbers: the five places of the "one shape for every method" redesign.

Reads ``src/deltatune`` as text (runs nothing of it) and prints, for the tree at ``--repo`` (default: this
checkout), the sizes and counts a newcomer pays for:

- ``PeftModel``: lines of ``peft_model.py`` and ``prompt/``, branches on the prompt kind
  (``_is_prompt_learning``, ``peft_type == PREFIX_TUNING``) outside ``prompt/``.
- LoRA's layer: lines of ``lora/layer.py``, of the other files of ``lora/``, and the lines that name DoRA
  (``use_dora``/``magnitude``/``dora``) outside ``lora/``.
- CLI settings: lines of ``cli/common.py``, ``settings[...]`` subscripts in ``cli/``, the longest function of
  ``cli/train.py`` and ``training/trainer.py``.
- Methods named outside their rooms: ``registry.Method``'s fields, generic modules importing a method's package.
- Import cycles among ``deltatune`` modules: strongly connected components of the import graph, once for
  imports at module level and once counting imports inside functions too (a deferred import is still a cycle
  in the design).

Usage: ``python bench/architecture.py [--repo DIR]``; ``git worktree add /tmp/before <rev>`` and
``--repo /tmp/before`` gives the numbers of an earlier commit.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

PREFIX_BRANCH = r"==\s*PeftType\.PREFIX_TUNING"
WRITES_PEFT_MODEL = r"peft_model\._\w+\s*=[^=]"
NAMES_DORA = r"(?m)^.*(use_dora|DoRA|_dora).*$"
SETTINGS = r"settings\["
ROW_ADAPTERS = r"self\.row_adapters: list\[str\] \| None = None"
PROLOGUE = r"if self\._bypass|if self\.merged"

METHOD_PACKAGES = {
    "adalora", "bitfit", "boft", "bottleneck", "ia3", "ln_tuning", "loha", "lokr", "lora", "oft", "prompt",
    "trainable_tokens", "vera",
}  # fmt: skip


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.Module, name: str, is_pkg: bool, deep: bool) -> set[str]:
    """Modules ``name`` imports: at module level only, or (``deep``) inside functions too. ``TYPE_CHECKING``
    blocks are left out (they never run)."""
    found: set[str] = set()
    package = name if is_pkg else name.rpartition(".")[0]

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and (top or deep):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and (top or deep):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import mod`` names the module; ``from mod import name`` the module it is in.
                found.update(f"{base}.{a.name}|{base}" for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def import_graph(src: Path, deep: bool) -> dict[str, set[str]]:
    files = {module_name(p, src.parent): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = imports(ast.parse(path.read_text()), name, path.name == "__init__.py", deep)
        # An import of a package's own parent (``deltatune`` from ``deltatune.x``) is not an edge of the design.
        resolved = {t.split("|")[0] if t.split("|")[0] in files else t.split("|")[-1] for t in targets}
        graph[name] = {t for t in resolved if t in files and t != name and not name.startswith(t + ".")}
    return graph


def longest_function(path: Path) -> tuple[str, int]:
    best = ("", 0)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > best[1]:
                best = (node.name, n)
    return best


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def count(pattern: str, paths: list[Path]) -> int:
    return sum(len(re.findall(pattern, p.read_text())) for p in paths if p.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    src = args.repo / "src" / "deltatune"
    every = sorted(src.rglob("*.py"))
    outside = lambda room: [p for p in every if room not in p.relative_to(src).parts]  # noqa: E731

    print("1. PeftModel and prompt learning")
    print(f"   peft_model.py lines                     {lines(src / 'peft_model.py')}")
    print(f"   prompt/ lines                           {sum(lines(p) for p in (src / 'prompt').glob('*.py'))}")
    print(f"   _is_prompt_learning in peft_model.py    {count(r'_is_prompt_learning', [src / 'peft_model.py'])}")
    print(f"   PREFIX_TUNING branches outside prompt/  {count(PREFIX_BRANCH, outside('prompt'))}")
    print(f"   PREFIX_TUNING branches inside prompt/   "
          f"{count(PREFIX_BRANCH, list((src / 'prompt').glob('*.py')))}")  # fmt: skip
    print(f"   peft_model writes (peft_model._x = ...) {count(WRITES_PEFT_MODEL, every)}")

    lora = src / "lora"
    print("2. LoRA layer")
    print(f"   lora/layer.py lines                     {lines(lora / 'layer.py')}")
    others = {p.name: lines(p) for p in sorted(lora.glob('*.py')) if p.name != 'layer.py'}
    print(f"   other lora/ files                       {others}")
    print(f"   lines naming DoRA outside lora/         {count(NAMES_DORA, outside('lora'))}")

    cli = src / "cli"
    print("3. CLI settings")
    print(f"   cli/common.py lines                     {lines(cli / 'common.py')}")
    print(f"   settings[...] in cli/                   {count(SETTINGS, list(cli.glob('*.py')))}")
    print(f"   longest function in cli/train.py        {longest_function(cli / 'train.py')}")
    trainer = src / "training" / "trainer.py"
    if trainer.exists():
        print(f"   longest function in training/trainer.py {longest_function(trainer)}")

    print("4. Methods outside their rooms")
    registry = ast.parse((src / "registry.py").read_text())
    method = next(n for n in registry.body if isinstance(n, ast.ClassDef) and n.name == "Method")
    fields = [n.target.id for n in method.body if isinstance(n, ast.AnnAssign)]
    print(f"   registry.Method fields                  {len(fields)}")
    graph = import_graph(src, deep=True)
    generic = {
        m: sorted({t for t in ts if t.split(".")[1:2] and t.split(".")[1] in METHOD_PACKAGES})
        for m, ts in graph.items()
        if m.count(".") >= 1 and m.split(".")[1] not in METHOD_PACKAGES and m != "deltatune"
    }
    reach = {m: ts for m, ts in generic.items() if ts and not m.endswith(".registry")}
    print(f"   generic modules importing a method      {len(reach)}")
    for m, ts in sorted(reach.items()):
        print(f"     {m} -> {', '.join(t.removeprefix('deltatune.') for t in ts)}")
    prologue = count(ROW_ADAPTERS, every)
    print(f"   row_adapters set up in layer __init__s  {prologue}")
    print(f"   'if self._bypass' / 'self.merged' tests {count(PROLOGUE, every)}")

    for deep in (False, True):
        found = cycles(import_graph(src, deep))
        where = "counting imports inside functions" if deep else "module-level imports"
        print(f"5. Import cycles ({where}): {len(found)}")
        for c in found:
            print("     " + " <-> ".join(m.removeprefix("deltatune.") for m in c))


if __name__ == "__main__":
    main()
