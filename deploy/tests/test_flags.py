"""Every env var and flag the manifests give a chipgate binary is one that binary accepts.

For each container that runs a chipgate binary (in every overlay), the test runs `<binary> --help`
and checks that each CHIPGATE_* / REDIS_URL env var appears as `[env: NAME=]` (clap prints it for
every env-backed flag), that each `--flag` in command/args is listed, and that values of flags with
a fixed set of possible values are among them. RUST_LOG is always allowed (tracing reads it).

Binaries are taken from $CHIPGATE_BIN_DIR, else $CARGO_TARGET_DIR/debug, else target/debug (build
them with `cargo build --workspace --bins`). A missing binary is a failure, not a skip.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import k8s  # noqa: E402

ALWAYS_ALLOWED_ENV = {"RUST_LOG"}


def checked_env(name: str) -> bool:
    return name.startswith("CHIPGATE_") or name == "REDIS_URL"


def bin_dir() -> Path:
    if os.environ.get("CHIPGATE_BIN_DIR"):
        return Path(os.environ["CHIPGATE_BIN_DIR"])
    if os.environ.get("CARGO_TARGET_DIR"):
        return Path(os.environ["CARGO_TARGET_DIR"]) / "debug"
    return k8s.REPO / "target" / "debug"


class Help:
    """What clap's long --help says about a binary's options."""

    _OPTION = re.compile(r"^\s{2,}(?:(-[A-Za-z0-9]), )?(--[A-Za-z0-9][A-Za-z0-9-]*)")

    def __init__(self, text: str):
        self.text = text
        self.flags: set[str] = set()
        self.envs: dict[str, str] = {}  # env var -> flag
        self.values: dict[str, set[str]] = {}  # flag -> possible values
        current = None
        in_values = False
        for line in text.splitlines():
            m = self._OPTION.match(line)
            if m:
                current = m.group(2)
                self.flags.add(current)
                if m.group(1):
                    self.flags.add(m.group(1))
                in_values = False
            if current is None:
                continue
            for env in re.findall(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)=", line):
                self.envs[env] = current
            short = re.search(r"\[possible values: ([^\]]+)\]", line)
            if short:
                self.values[current] = {v.strip() for v in short.group(1).split(",")}
            if line.strip() == "Possible values:":
                in_values = True
                self.values.setdefault(current, set())
                continue
            if in_values and not m:
                v = re.match(r"^\s+- ([A-Za-z0-9_.-]+)(?::|$)", line)
                if v:
                    self.values[current].add(v.group(1))
                elif line.strip():
                    in_values = False


@functools.lru_cache(maxsize=None)
def help_of(binary: str) -> Help:
    path = bin_dir() / binary
    if not path.is_file():
        raise AssertionError(
            f"{path} does not exist: build it (cargo build -p {k8s.BINARIES[binary]}) or set CHIPGATE_BIN_DIR"
        )
    proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{path} --help exited {proc.returncode}:\n{proc.stderr}")
    return Help(proc.stdout)


def uses_of(binary: str):
    """(overlay, workload, container, env, args) for every container in every overlay that runs `binary`."""
    for overlay in k8s.overlays():
        docs = k8s.render(overlay)
        for w in k8s.workloads(docs):
            for c in k8s.containers(k8s.pod_template(w)["spec"]):
                if k8s.binary_of(c) == binary:
                    env = k8s.container_env(c, k8s.namespace_of(w), docs)
                    yield overlay, f"{w['kind']}/{w['metadata']['name']}", c["name"], env, k8s.chipgate_args(c)


class FlagsAndEnv(unittest.TestCase):
    def check_binary(self, binary: str, must_be_used: bool = True):
        uses = list(uses_of(binary))
        if must_be_used:
            self.assertTrue(uses, f"no container in any overlay runs {binary}")
        if not uses:
            return
        help_ = help_of(binary)
        self.assertTrue(help_.envs, f"{binary} --help lists no [env: ...] at all; is it a clap binary?")
        for overlay, workload, container, env, args in uses:
            with self.subTest(overlay=overlay, workload=workload, container=container):
                for name, value in sorted(env.items()):
                    if name in ALWAYS_ALLOWED_ENV or not checked_env(name):
                        continue
                    self.assertIn(name, help_.envs, f"{binary} does not read env {name}")
                    flag = help_.envs[name]
                    if value is not None and flag in help_.values:
                        self.assertIn(value, help_.values[flag], f"{name}={value!r}: {binary} accepts {sorted(help_.values[flag])}")
                i = 0
                while i < len(args):
                    arg = args[i]
                    if arg.startswith("-"):
                        flag, eq, value = arg.partition("=")
                        self.assertIn(flag, help_.flags, f"{binary} does not accept {flag}")
                        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                            value = args[i + 1]
                            i += 1
                        if value and flag in help_.values:
                            self.assertIn(value, help_.values[flag], f"{flag} {value!r}")
                    i += 1

    def test_chipgate_licensing(self):
        self.check_binary("chipgate-licensing")

    def test_chipgate_inventory(self):
        self.check_binary("chipgate-inventory")

    def test_chipgate_orders(self):
        self.check_binary("chipgate-orders")

    def test_chipgate_cli(self):
        # The CLI is in the image but no manifest runs it (yet); check it if one does.
        self.check_binary("chipgate", must_be_used=False)

    def test_every_chipgate_container_is_covered(self):
        for overlay in k8s.overlays():
            for w in k8s.workloads(k8s.render(overlay)):
                for c in k8s.containers(k8s.pod_template(w)["spec"]):
                    if k8s.is_chipgate_image(c):
                        with self.subTest(overlay=overlay, container=c["name"]):
                            self.assertIn(k8s.binary_of(c), k8s.BINARIES)


SAMPLE_HELP = """\
Usage: chipgate-x [OPTIONS]

Options:
      --listen <LISTEN>
          Address to serve gRPC on

          [env: CHIPGATE_LISTEN=]

      --log-format <LOG_FORMAT>
          Log format

          Possible values:
          - pretty: Human-readable
          - json:   One JSON object per line

          [env: CHIPGATE_LOG_FORMAT=]
          [default: pretty]

      --mode <MODE>  [env: CHIPGATE_MODE=] [possible values: a, b]
  -h, --help
          Print help
"""


class HelpParser(unittest.TestCase):
    def test_parses_clap_long_help(self):
        h = Help(SAMPLE_HELP)
        self.assertEqual(h.envs, {"CHIPGATE_LISTEN": "--listen", "CHIPGATE_LOG_FORMAT": "--log-format",
                                  "CHIPGATE_MODE": "--mode"})
        self.assertEqual(h.values["--log-format"], {"pretty", "json"})
        self.assertEqual(h.values["--mode"], {"a", "b"})
        self.assertNotIn("--listen", h.values)
        self.assertTrue({"--listen", "--log-format", "--mode", "--help", "-h"} <= h.flags)


if __name__ == "__main__":
    unittest.main()
