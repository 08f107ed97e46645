"""The test package. Importing it takes a snapshot of the working tree (out/ and results/ included), so that
tests/test_zz_clean_tree.py, the last test module, can check that the suite wrote nothing outside its temporary
folders."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def tree_snapshot():
    """{path: (size, mtime)} of every file under the project root, caches excluded."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP]
        for name in names:
            path = os.path.join(folder, name)
            st = os.stat(path)
            files[os.path.relpath(path, ROOT)] = (st.st_size, st.st_mtime_ns)
    return files


BEFORE = tree_snapshot()
