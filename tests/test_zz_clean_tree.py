"""Runs last (file order): the suite left the working tree as it found it, the user's out/ included."""
import unittest

from tests import BEFORE, tree_snapshot


class TestCleanTree(unittest.TestCase):
    def test_the_suite_wrote_nothing_outside_its_temporary_folders(self):
        after = tree_snapshot()
        added = sorted(set(after) - set(BEFORE))
        changed = sorted(p for p in set(after) & set(BEFORE) if after[p] != BEFORE[p])
        removed = sorted(set(BEFORE) - set(after))
        self.assertEqual((added, changed, removed), ([], [], []))


if __name__ == "__main__":
    unittest.main()
