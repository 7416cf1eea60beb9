#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a circle.

For every module, the modules it names (`use crate::a::b`, `super::x`,
`crate::a::b::f()` in code) are collected. Then, for each parent module,
its child modules must form an acyclic graph, where child A depends on child
B when anything inside A's subtree names anything inside B's subtree. Edges
between a module and its own ancestors (a `mod.rs` re-exporting its
children, a child using its parent's error type) are not circles in this
sense and are ignored.

Usage: check-cycles.py CRATE_SRC_DIR...   (exit 1 and the circles found)
"""

import re
import sys
from pathlib import Path

PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\};", re.S)


def module_of(src: Path, f: Path):
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("lib", "main", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # strings: crude, enough for paths inside format strings
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return text


def strip_tests(text: str) -> str:
    # Drop `#[cfg(test)] mod tests { ... }` blocks: test-only imports are not
    # part of the module graph.
    out, i = [], 0
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text[i:])
        if not m:
            out.append(text[i:])
            break
        start = i + m.start()
        out.append(text[i:start])
        depth, j = 0, i + m.end() - 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1
    return "".join(out)


def resolve(base, kind, segs, modules):
    if kind == "crate":
        path = []
    elif kind == "self":
        path = list(base)
    else:  # super (possibly repeated: super::super::x)
        path = list(base[:-1])
        while segs and segs[0] == "super":
            path = path[:-1]
            segs = segs[1:]
    cand = tuple(path)
    best = cand if cand in modules else None
    for s in segs:
        cand = cand + (s,)
        if cand in modules:
            best = cand
        else:
            break
    return best


def deps(src: Path):
    files = sorted(src.rglob("*.rs"))
    files = [f for f in files if "bin" not in f.relative_to(src).parts[:1]]
    modules = {module_of(src, f): f for f in files}
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        text = strip_tests(strip_comments(f.read_text()))
        base = m
        refs = []
        for g in USE_GROUP_RE.finditer(text):
            kind, prefix, body = g.group(1), g.group(2), g.group(3)
            pre = [s for s in prefix.split("::") if s]
            for item in re.split(r"[,{}]", body):
                item = item.strip().split(" as ")[0].strip()
                if not item:
                    continue
                refs.append((kind, pre + [s for s in item.split("::") if s]))
        for p in PATH_RE.finditer(text):
            refs.append((p.group(1), [s for s in p.group(2).split("::") if s]))
        for kind, segs in refs:
            t = resolve(base, kind, segs, modules)
            if t is not None and t != m:
                graph[m].add(t)
    return graph


def is_ancestor(a, b):
    return len(a) < len(b) and b[: len(a)] == a


def cycles(graph):
    found = []
    parents = {m[:-1] for m in graph if m}
    for parent in sorted(parents):
        children = sorted({m[: len(parent) + 1] for m in graph if is_ancestor(parent, m)})
        edges = {c: set() for c in children}
        for a, targets in graph.items():
            ca = next((c for c in children if a == c or is_ancestor(c, a)), None)
            if ca is None:
                continue
            for b in targets:
                cb = next((c for c in children if b == c or is_ancestor(c, b)), None)
                if cb is None or cb == ca:
                    continue
                edges[ca].add(cb)
        # Tarjan-free: DFS for back edges
        state, stack = {}, []

        def dfs(u):
            state[u] = 1
            stack.append(u)
            for v in sorted(edges[u]):
                if state.get(v) == 1:
                    found.append(stack[stack.index(v):] + [v])
                elif v not in state:
                    dfs(v)
            stack.pop()
            state[u] = 2

        for c in children:
            if c not in state:
                dfs(c)
    return found


def main():
    bad = False
    for d in sys.argv[1:]:
        src = Path(d)
        for cyc in cycles(deps(src)):
            bad = True
            names = ["::".join(m) or "crate" for m in cyc]
            print(f"{src}: import circle: {' -> '.join(names)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
