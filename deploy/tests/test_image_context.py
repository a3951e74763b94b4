"""deploy/image_context.py applies .dockerignore rules as BuildKit does, and the real context holds
what `cargo build` reads (check-image-context.sh then compiles it in CI)."""

from __future__ import annotations

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import image_context as ic  # noqa: E402


class Rules(unittest.TestCase):
    def admits(self, rules: str, path: str) -> bool:
        return ic.admitted(path, ic.parse(rules))

    def test_allow_list_with_exceptions(self):
        rules = "*\n!Cargo.toml\n!crates/\n**/target/\n"
        self.assertTrue(self.admits(rules, "Cargo.toml"))
        self.assertTrue(self.admits(rules, "crates/cli/src/main.rs"), "a directory exception admits what is under it")
        self.assertFalse(self.admits(rules, "data/catalogue.json"))
        self.assertFalse(self.admits(rules, "README.md"))
        self.assertFalse(self.admits(rules, "crates/cli/target/debug/x"), "** spans directories")

    def test_last_match_wins_and_star_stays_in_one_component(self):
        self.assertTrue(self.admits("docs\n!docs/keep.md\n", "docs/keep.md"))
        self.assertFalse(self.admits("!docs/keep.md\ndocs\n", "docs/keep.md"))
        self.assertFalse(self.admits("*.md\n", "README.md"))
        self.assertTrue(self.admits("*.md\n", "docs/guide.md"), "* does not cross /")
        self.assertFalse(self.admits("**/*.md\n", "docs/guide.md"))
        self.assertFalse(self.admits("/secret\n", "secret/key"), "a leading / is the context root")

    def test_the_real_context_has_the_sources_and_nothing_else(self):
        files = ic.context_files()
        self.assertIn("Cargo.lock", files)
        self.assertIn("data/catalogue.json", files, "include_str! of the default catalogue")
        self.assertIn("proto/chipgate/orders/v1/orders.proto", files)
        self.assertFalse([f for f in files if f.startswith(("deploy/", "target/", "node_modules/", "fuzz/"))])


if __name__ == "__main__":
    unittest.main()
