"""
The package's layout is its architecture: each room imports only the rooms
below it, so that a change to one can be understood by reading it and what
lies under it.

From the top: the process (C{wsproxy.process}), the edge (C{wsproxy.edge}),
the WebSocket protocol (C{wsproxy.websocket}), session decisions
(C{wsproxy.session}), Redis (C{wsproxy.redis}), the fast path's borrowed
internals (C{wsproxy.fast}), and at the bottom the shared base modules at
the package's top level (settings, names, refusals, metrics, logs).
C{wsproxy.backend} is the public library for backends: it stands apart and
the proxy never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "wsproxy"

#: each room's height: a module may import its own room and lower ones
RANK = {"": 0, "fast": 1, "redis": 2, "session": 3, "websocket": 4, "edge": 5, "process": 6}
#: the rooms a newcomer finds by name, with the modules each must hold
ROOMS = {
    "process": {"tap", "daemon", "workers", "build", "fdlimit"},
    "edge": {"site", "upgrade", "handoff", "sse"},
    "websocket": {"protocol", "states", "closing", "admission", "downstream", "upstream",
                  "footprint", "fanout"},
    "session": {"proxy", "auth", "authn", "webtoken", "keys", "limits", "resume", "upstream",
                "control", "frames", "backpressure", "topics"},
    "redis": {"redislink", "redisendpoint", "pubsub", "sentinel", "cluster", "hold"},
    "fast": {"__main__", "borrowed", "poll", "sockwrite", "sockread", "inframes", "timers", "heap",
             "lazyformat", "handshake"},
    "": {"config", "names", "refusal", "metrics", "logs", "backend"},
}
#: top-level modules that are not part of the base: the entry point and the
#: public library
OUTSIDE = {"__main__", "backend"}


def modules() -> Iterator[tuple[str, Path]]:
    """
    Every module of the package, as a dotted name below C{wsproxy}.
    """
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(parts), path


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """
    Every node of C{tree} that runs, at import or later: all but the
    bodies of C{if TYPE_CHECKING:} blocks (imports for annotations only,
    which never run and so make no cycle and no dependency).
    """
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _type_checking(node):
            assert isinstance(node, ast.If)
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """
    (line, module below C{wsproxy}) of every import of the package in a
    module, relative or absolute, at any depth in the file (lazy imports
    inside functions included). C{from package import module} names the
    module.
    """
    known = {other for other, _ in modules()}
    # the package a relative import starts from (for an __init__, its own)
    package = name.split(".")[:-1]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                start = package[: len(package) - (node.level - 1)]
                target = ".".join(start + ([node.module] if node.module else []))
            elif node.module == "wsproxy" or (node.module or "").startswith("wsproxy."):
                target = (node.module or "").removeprefix("wsproxy").lstrip(".")
            else:
                continue
            for alias in node.names:
                module = f"{target}.{alias.name}" if target else alias.name
                yield node.lineno, module if module in known else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("wsproxy."):
                    yield node.lineno, alias.name.removeprefix("wsproxy.")


def import_graph() -> dict[str, set[str]]:
    """
    Which modules of the package each module imports (packages' own
    C{__init__} modules included under the package's name).
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules():
        node = name.removesuffix(".__init__") if name.endswith(".__init__") else name
        graph[node] = {target for _, target in imported(name, path)
                       if target and target != node}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """
    One import cycle of C{graph} (as the list of modules along it), or [].
    """
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for target in sorted(graph.get(module, ())):
            cycle = visit(target, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


def room_of(module: str) -> str:
    """
    The room of a module below C{wsproxy} (C{""}: the base).
    """
    head = module.split(".")[0]
    return head if head in RANK and head != "" else ""


class LayoutTests(SynchronousTestCase):

    def test_rooms_hold_their_modules(self) -> None:
        """
        Each room is a subpackage holding the modules the architecture
        names for it, and nothing sits at the top level but the base, the
        public library and the entry point.
        """
        found: dict[str, set[str]] = {}
        for name, _ in modules():
            parts = name.split(".")
            if parts[-1] == "__init__":
                continue
            found.setdefault(parts[0] if len(parts) > 1 else "", set()).add(parts[-1])
        self.assertEqual(found.pop("", set()) - {"__main__"}, ROOMS[""])
        self.assertEqual(found, {r: m for r, m in ROOMS.items() if r})

    def test_imports_point_down(self) -> None:
        """
        No module imports a room above its own: the process may use the
        edge, the edge the WebSocket protocol, and so on down to the base,
        never the other way.
        """
        upward = []
        for name, path in modules():
            if name.split(".")[-1] in OUTSIDE and "." not in name:
                continue
            mine = RANK[room_of(name)]
            for line, target in imported(name, path):
                if RANK[room_of(target)] > mine:
                    upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
        self.assertEqual(upward, [])

    def test_backend_stands_apart(self) -> None:
        """
        C{wsproxy.backend}, the library backends import, uses only the key
        and channel names; and the proxy never imports it.
        """
        for name, path in modules():
            targets = {target for _, target in imported(name, path)}
            if name == "backend":
                self.assertEqual(targets, {"names"})
            else:
                self.assertNotIn("backend", targets, name)

    def test_imported_modules_exist(self) -> None:
        """
        Every import this test reads resolves to a module of the package
        (the test reads the layout it checks).
        """
        names = {name for name, _ in modules()} | {
            name.rpartition(".")[0] for name, _ in modules() if name.endswith("__init__")}
        names |= {n.removesuffix(".__init__") for n in names}
        missing = [(name, target) for name, path in modules() for _, target in imported(name, path)
                   if target and target not in names]
        self.assertEqual(missing, [])

    def test_no_import_cycles(self) -> None:
        """
        No module imports, even lazily inside a function, a module that
        imports it back (directly or through others), within a room too.
        """
        graph = import_graph()
        self.assertIn("process.workers", graph["process.tap"])
        self.assertIn("session.proxy", graph["websocket.protocol"])
        self.assertEqual(find_cycle(graph), [])

    def test_cycle_finder_finds_cycles(self) -> None:
        """
        The check above can fail: a lazy import of workers from daemon (as
        there used to be) is a cycle.
        """
        graph = import_graph()
        graph["process.daemon"] = graph["process.daemon"] | {"process.workers"}
        self.assertEqual(find_cycle(graph),
                         ["process.daemon", "process.workers", "process.daemon"])
