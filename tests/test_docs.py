"""
The documentation: the README stays a short introduction with the quick
start, the commands and files the docs name exist, and the generated
references (docs/_hooks/reference.py, run by mkdocs at build time) cover
every setting and every metric. The strict site build itself is part of
C{bin/dev test}.
"""

from __future__ import annotations

import importlib.util
import os
import re
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import SETTINGS

from .support import ROOT

DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def doc_pages() -> dict[str, str]:
    """
    Every hand-written page, by path relative to docs/.
    """
    pages = {}
    for folder, _, names in os.walk(DOCS):
        for name in names:
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                pages[os.path.relpath(path, DOCS)] = read(path)
    return pages


def generator() -> ModuleType:
    path = os.path.join(DOCS, "_hooks", "reference.py")
    spec = importlib.util.spec_from_file_location("docs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ReadmeTests(SynchronousTestCase):
    def test_short(self) -> None:
        """
        The README is an introduction of at most 400 lines; the rest of the
        documentation lives in docs/.
        """
        lines = read(README).count("\n")
        self.assertLessEqual(lines, 400, f"README.md has {lines} lines: move detail to docs/")

    def test_quick_start(self) -> None:
        """
        The README's quick start still has its two commands, in a shell block.
        """
        blocks = re.findall(r"```sh\n(.*?)```", read(README), re.S)
        commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
        self.assertIn("bin/dev run", commands)
        self.assertIn("bin/dev test", commands)

    def test_links_to_docs_exist(self) -> None:
        """
        Every relative link of the README names a file of the checkout.
        """
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", read(README)):
            self.assertTrue(os.path.exists(os.path.join(ROOT, target)), target)


class NamedThingsExistTests(SynchronousTestCase):
    def texts(self) -> dict[str, str]:
        texts = doc_pages()
        texts["README.md"] = read(README)
        return texts

    def test_bin_dev_commands(self) -> None:
        """
        Every C{bin/dev <command>} the README and the docs name is one that
        bin/dev knows.
        """
        script = read(os.path.join(ROOT, "bin", "dev"))
        known = set(re.findall(r"(?m)^    ([a-z-]+)\)", script))
        self.assertIn("docs", known)
        for page, text in self.texts().items():
            for command in re.findall(r"bin/dev ([a-z][a-z-]*)", text):
                self.assertIn(command, known, f"{page}: bin/dev {command}")

    def test_bench_scenarios(self) -> None:
        """
        Every C{bench/run.sh <scenario>} the docs name is a scenario of
        bench/run.sh.
        """
        script = read(os.path.join(ROOT, "bench", "run.sh"))
        known = set(re.findall(r"(?m)^\s+([a-z0-9-]+)\)", script))
        for page, text in self.texts().items():
            for line in re.findall(r"bench/run\.sh ([a-z0-9 -]+)", text):
                for scenario in line.split():
                    if scenario.startswith("-") or not re.match(r"^[a-z0-9-]+$", scenario):
                        break
                    self.assertIn(scenario, known, f"{page}: bench/run.sh {scenario}")

    def test_files(self) -> None:
        """
        Every example, test module and script the docs name by path exists.
        """
        for page, text in self.texts().items():
            for path in re.findall(
                r"`((?:examples|tests|bench|bin|wsproxy)/[A-Za-z0-9_./-]+)`", text
            ):
                self.assertTrue(os.path.exists(os.path.join(ROOT, path)), f"{page}: {path}")


class GeneratedReferenceTests(SynchronousTestCase):
    def test_every_setting(self) -> None:
        """
        The configuration reference has a section for every setting, with
        its option and default, straight from the settings table.
        """
        page = generator().configuration_page(doc_pages())
        for setting in SETTINGS:
            self.assertIn(f"## `{setting.env}` {{#{setting.env.lower()}}}", page)
            self.assertIn(f"`--{setting.option}`", page)

    def test_every_metric(self) -> None:
        """
        The metrics reference lists what a proxy process exposes, the
        optional families (cluster, canary) and the supervisor's too.
        """
        page = generator().metrics_page(doc_pages())
        for name in ("wsproxy_connections_total", "wsproxy_gc_pause_seconds_bucket",
                     "wsproxy_cluster_shard_up", "wsproxy_canary_rtt_seconds",
                     "wsproxy_worker_restarts_total", "wsproxy_workers"):
            self.assertIn(f"`{name}`", page)
        self.assertNotIn("_created", page)

    def test_nothing_generated_committed(self) -> None:
        """
        The generated pages exist only at build time.
        """
        for path in generator().GENERATED:
            self.assertFalse(os.path.exists(os.path.join(DOCS, path)), path)
