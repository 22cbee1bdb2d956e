#!/usr/bin/env python3
"""Prints the import graph of src/commands/ (from `super::…` and `crate::commands::…` paths, and
the parent's uses of its children) and exits 1 when it has a cycle."""
import pathlib, re, sys

root = pathlib.Path(__file__).resolve().parent.parent / "src" / "commands"
files = {p.stem: p.read_text() for p in root.glob("*.rs")}
modules = set(files) - {"mod"}
# Drop comments, so that a doc comment naming a module is not an import.
code = {m: re.sub(r"//.*", "", text) for m, text in files.items()}

def targets(text, prefix):
    found = set()
    for m in re.finditer(prefix + r"\{([^}]*)\}", text):
        found |= {part.strip().split("::")[0] for part in m.group(1).split(",") if part.strip()}
    found |= set(re.findall(prefix + r"([a-z_][a-z0-9_]*)", text))
    return found

graph = {m: set() for m in files}
for m, text in code.items():
    names = targets(text, r"\bcrate::commands::")
    if m == "mod":
        names |= set(re.findall(r"\b([a-z_][a-z0-9_]*)::", text))
        graph[m] |= {n for n in names if n in modules}
    else:
        names |= targets(text, r"\bsuper::")
        graph[m] |= {n if n in modules else "mod" for n in names} - {m}

for m in sorted(graph):
    print(f"{m:10} -> {', '.join(sorted(graph[m])) or '-'}")

def cycle():
    state = {}
    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None

found = cycle()
if found:
    print("cycle: " + " -> ".join(found))
    sys.exit(1)
print("no cycle")
