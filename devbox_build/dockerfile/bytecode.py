"""Compile an installed tree's Python sources to bytecode, as the image will import them.

Run by assemble-groups.sh in the builder container, by the venv's Python (the standard library
only):

    python bytecode.py TREE FOLDER

compiles every ``.py`` under FOLDER (inside TREE) to its ``__pycache__`` entry, recording each
file's path as the image sees it (TREE's part cut off: ``/opt/venv/...``), which is what
``python -m compileall -s TREE -p / FOLDER`` writes, byte for byte, in less time: the sources are
split among one process per core up front, where compileall sends every file to its process pool
on its own (the default CPU stack's 12,403 sources on 2 cores: 12.9 s, compileall 18.3 s). A
source that does not compile (a test fixture written for Python 2, say) is left without
bytecode, as compileall leaves it.
"""

from __future__ import annotations

import os
import py_compile
import sys
from concurrent.futures import ProcessPoolExecutor


def sources(folder: str) -> list[str]:
    """Every ``.py`` file under ``folder``, sorted; symlinked folders are not followed."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if name != "__pycache__")
        found += [os.path.join(root, name) for name in sorted(files) if name.endswith(".py")]
    return found


def compile_files(tree: str, paths: list[str]) -> int:
    """Compile ``paths``, each recorded as its path below ``tree``; how many did not compile."""
    failed = 0
    for path in paths:
        try:
            py_compile.compile(path, dfile="/" + os.path.relpath(path, tree), doraise=True)
        except (py_compile.PyCompileError, OSError, ValueError):
            failed += 1
    return failed


def compile_tree(tree: str, folder: str, workers: int | None = None) -> int:
    """Compile every source under ``folder`` in ``workers`` processes (one per core by
    default); how many did not compile."""
    paths = sources(folder)
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths)))
    if workers == 1:
        return compile_files(tree, paths)
    # Every worker's share runs from the smallest path to the largest alike.
    shares = [paths[index::workers] for index in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(compile_files, [tree] * workers, shares))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: bytecode.py TREE FOLDER", file=sys.stderr)
        return 2
    compile_tree(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
