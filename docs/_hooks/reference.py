"""
The documentation's two generated pages, built from the code at each
``mkdocs build`` (an mkdocs hook, see ``mkdocs.yml``), so that nothing
generated is committed and the pages cannot drift from the code:

- ``reference/configuration.md`` from the settings table,
  ``wsproxy.config.SETTINGS`` (every setting is declared once there: its
  variable, default, parser and help text);
- ``reference/metrics.md`` from what ``/metrics`` exposes: a ``Stats``
  rendered with every optional family present, and the supervisor's own
  families with ``WORKERS`` > 1, parsed back from the Prometheus text.

Each entry links to the hand-written pages that mention it, found by
searching them for the name, so the reference and the guides point at each
other without a second list to maintain.

Run as a script to print a page: ``python docs/_hooks/reference.py
configuration`` (or ``metrics``), from the repository root.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkout_first() -> None:
    """
    Import the checkout's C{wsproxy}, whichever Python runs mkdocs (mkdocs
    restores C{sys.path} after loading a hook, so this runs at build time).
    """
    if not sys.path or sys.path[0] != ROOT:
        sys.path.insert(0, ROOT)

CONFIGURATION = "reference/configuration.md"
METRICS = "reference/metrics.md"

#: what each of config.py's parsers accepts, in words; a parser missing here
#: fails the build, so a new kind of value cannot go undocumented
PARSERS: dict[str, str] = {
    "_host": "an IP address or a host name (empty: every interface)",
    "_port": "a port number, 0–65535",
    "_endpoint": "a Twisted server endpoint string (checked at start-up without listening)",
    "_positive_int": "an integer ≥ 1",
    "_non_negative_int": "an integer ≥ 0",
    "_positive_float": "a number of seconds > 0 (fractions allowed)",
    "_non_negative_float": "a number of seconds ≥ 0 (fractions allowed)",
    "_boolean": "`true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`)",
    "parse_redis_url": "`redis://[user:pass@]host[:port][/db]`, `rediss://…` (TLS) or "
                       "`unix:///path/redis.sock[?db=N]`",
    "_sentinels": "a comma list of `host:port` (`[v6]:port` for IPv6)",
    "_cluster_nodes": "a comma list of `host:port` (`[v6]:port` for IPv6)",
    "_name": "a name without spaces",
    "_optional_text": "text (empty: none)",
    "_optional_file": "the path of a readable file (empty: none)",
    "_networks": "a comma list of IP addresses or CIDR networks (`10.0.0.0/8, 2001:db8::/32`)",
    "_origins": "a comma list of origins (`https://host[:port]`, `null`, or `*`)",
    "_event_targets": "a comma list of `session`, `all`, `stream` (empty: off)",
    "_frame_mode": "`auto` or `tagged`",
    "_upstream": "`pubsub` or `stream`",
    "_partitions": "an integer from 1 to 1024",
    "_log_level": "`debug`, `info`, `warn` (or `warning`) or `error`",
    "_log_format": "`text` or `json`",
    "_auth_mode": "`redis`, `jwt` or `jwt,redis`",
    "str": "text (empty: none)",
    "_optional_files": "a comma list of paths of readable files (empty: none)",
    "_http_url": "an `http://` or `https://` URL (empty: none)",
    "_jwt_algorithms": "a comma list of `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, "
                       "`PS256`, `PS384`, `PS512`, `ES256`, `ES384`, `ES512`, `EdDSA`",
    "_names": "a comma list of names (empty: none)",
    "_deny_list": "`off`, `session` or `jti`",
    "_claim_values": "a comma list of claim values, without control characters (empty: none)",
    "_claim_value": "a claim value, without control characters (empty: not checked)",
}


def _anchor(name: str) -> str:
    return name.lower()


def _mentions(
    name: str, pages: Mapping[str, str], exclude: str, pattern: str = r"(?<![A-Za-z0-9_]){}(?![A-Za-z0-9_])"
) -> list[str]:
    """
    The pages (by path) whose text names C{name} as a whole word.
    """
    regex = re.compile(pattern.format(re.escape(name)))
    return sorted(path for path, text in pages.items() if path != exclude and regex.search(text))


def _relative(target: str, origin: str) -> str:
    return os.path.relpath(target, os.path.dirname(origin)).replace(os.sep, "/")


def _page_title(text: str, path: str) -> str:
    match = re.search(r"(?m)^# (.+)$", text)
    return match.group(1).strip() if match else path


def _see(name: str, pages: Mapping[str, str], origin: str, **kw: Any) -> str:
    found = _mentions(name, pages, origin, **kw)
    if not found:
        return ""
    links = ", ".join(f"[{_page_title(pages[p], p)}]({_relative(p, origin)})" for p in found)
    return f"Mentioned in: {links}."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def configuration_page(pages: Mapping[str, str] | None = None) -> str:
    """
    The configuration reference, from C{wsproxy.config.SETTINGS}.

    @param pages: the hand-written pages' Markdown by path (relative to
        the docs directory), to link each setting to those that explain it.
    """
    _checkout_first()
    from wsproxy.config import SETTINGS

    pages = pages or {}
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by docs/_hooks/reference.py from wsproxy/config.py at build time -->",
        "",
        "Every setting is an environment variable, a line of a `.env` file in the working",
        "directory (loaded if present; the real environment wins over it) and a",
        "command-line option of `twistd wsproxy` / `python -m wsproxy` (the variable's name",
        "in lower case with dashes, e.g. `--auth-timeout-secs`; options win over both).",
        "`twistd wsproxy --help` lists the same settings. This page is generated from the",
        "settings table in `wsproxy/config.py`, where each is declared once.",
        "",
        "An invalid value stops start-up with one line naming the variable and exit status 2,",
        "e.g. `wsproxy: configuration error: PORT: invalid value 'http': must be a number`",
        "(values of secret settings are never repeated). So do combinations that cannot work",
        "together, such as `WORKERS` > 1 with `LISTEN`, `REDIS_CLUSTER` with `REDIS_SENTINELS`,",
        "or `RESUME` on a cluster without `KEY_HASH_TAGS`.",
        "",
        "| variable | option | default |",
        "|---|---|---|",
    ]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        out.append(f"| [`{s.env}`](#{_anchor(s.env)}) | `--{s.option}` | {_cell(default)} |")
    out.append("")
    for s in SETTINGS:
        parser = getattr(s.parse, "__name__", "")
        if parser not in PARSERS:
            raise ValueError(
                f"docs/_hooks/reference.py: no description of the parser {parser!r} "
                f"of {s.env}: add it to PARSERS"
            )
        out += [
            f"## `{s.env}` {{#{_anchor(s.env)}}}",
            "",
            s.help[0].upper() + s.help[1:] + ("" if s.help.endswith(".") else "."),
            "",
            f"- option: `--{s.option}`",
            f"- default: `{s.default}`" if s.default else "- default: empty",
            f"- value: {PARSERS[parser]}",
        ]
        if s.secret:
            out.append("- secret: never repeated in error messages or logs")
        see = _see(s.env, pages, CONFIGURATION)
        if see:
            out += ["", see]
        out.append("")
    return "\n".join(out)


# -- metrics ---------------------------------------------------------------------


def _families() -> list[tuple[str, str, str, list[str], str]]:
    """
    (name, type, help, label names, exposed by) of every metric family a
    proxy process or a supervisor exposes.
    """
    _checkout_first()
    from prometheus_client.parser import text_string_to_metric_families

    from wsproxy.metrics import Stats

    stats = Stats()
    # every optional or labelled family present once, so that it is listed
    # with its labels (the values mean nothing)
    stats.outcomes["accepted"] += 1
    stats.redis_connect_failures = lambda: Counter({"refused": 1})
    stats.cluster_shards = lambda: [("127.0.0.1:7000", True, 1)]
    stats.cluster_redirects = lambda: Counter({"moved": 1})
    stats.canary_rtt = lambda: 0.001
    stats.jwt_keys = lambda: 1
    stats.gc_pause.labels("0").observe(0.001)
    found = [(family, "every process") for family in
             text_string_to_metric_families(stats.render().decode())]
    found += [(family, "the supervisor (`WORKERS` > 1)") for family in
              text_string_to_metric_families(_supervisor_metrics().decode())]
    out = []
    seen = set()
    for family, where in found:
        if family.name in seen or (
            family.name.endswith("_created") and family.name[:-len("_created")] in seen
        ):
            # a histogram's creation time, parsed as a family of its own
            continue
        seen.add(family.name)
        labels: list[str] = []
        for sample in family.samples:
            for label in sample.labels:
                if label not in ("le", "quantile") and label not in labels:
                    labels.append(label)
        out.append((family.name, family.type, family.documentation, labels, where))
    return out


def _supervisor_metrics() -> bytes:
    """
    What a supervisor with no workers renders: its own families only.
    """
    from wsproxy.process.workers import Supervisor

    fake = SimpleNamespace(workers={}, _retired=[], restarts=0)
    coroutine = Supervisor.metrics(fake)  # type: ignore[arg-type]
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise RuntimeError("Supervisor.metrics did not finish at once")


def _exposed(name: str, kind: str) -> str:
    if kind == "counter":
        return f"{name}_total"
    if kind == "histogram":
        return f"{name}_bucket`, `{name}_sum`, `{name}_count"
    return name


def metrics_page(pages: Mapping[str, str] | None = None) -> str:
    """
    The metrics reference, from what the code exposes.
    """
    pages = pages or {}
    out = [
        "# Metrics reference",
        "",
        "<!-- generated by docs/_hooks/reference.py from wsproxy/metrics.py and "
        "wsproxy/process/workers.py at build time -->",
        "",
        "`GET /metrics` answers in the Prometheus text format. With `WORKERS` > 1 the",
        "answer is the sum over all workers, whichever worker the scrape reaches (see",
        "[Running the proxy](../operations/deployment.md)). This page is generated from the code",
        "that exposes the metrics; the help text is the one a scrape shows.",
        "",
        "| metric | type | labels | help |",
        "|---|---|---|---|",
    ]
    families = _families()
    for name, kind, doc, labels, _ in families:
        label_text = ", ".join(f"`{label}`" for label in labels) or ""
        out.append(f"| [`{_exposed(name, kind)}`](#{_anchor(name)}) | {kind} | {label_text} | "
                   f"{_cell(doc)} |")
    out.append("")
    for name, kind, doc, labels, where in families:
        out += [
            f"## `{name}` {{#{_anchor(name)}}}",
            "",
            doc + ("" if doc.endswith(".") else "."),
            "",
            f"- type: {kind}, exposed as `{_exposed(name, kind)}`",
        ]
        if labels:
            out.append("- labels: " + ", ".join(f"`{label}`" for label in labels))
        out.append(f"- exposed by: {where}")
        see = _see(name, pages, METRICS,
                   pattern=r"(?<![A-Za-z0-9_]){}(?:_total|_bucket|_sum|_count)?(?![A-Za-z0-9_])")
        if see:
            out += ["", see]
        out.append("")
    return "\n".join(out)


GENERATED: dict[str, Callable[[Mapping[str, str]], str]] = {
    CONFIGURATION: configuration_page,
    METRICS: metrics_page,
}


# -- the mkdocs hook ----------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    """
    Add the generated pages to the site (in memory: never written to the
    docs directory).
    """
    from mkdocs.structure.files import File

    pages: dict[str, str] = {}
    for file in files.documentation_pages():
        if file.src_uri not in GENERATED and file.abs_src_path:
            with open(file.abs_src_path, encoding="utf-8") as f:
                pages[file.src_uri] = f.read()
    for path, build in GENERATED.items():
        if files.get_file_from_path(path) is not None:
            raise ValueError(f"docs/{path} is generated at build time: remove the file")
        files.append(File.generated(config, path, content=build(pages)))
    return files


def _pages_on_disk(docs: str) -> dict[str, str]:
    pages = {}
    for folder, _, names in os.walk(docs):
        for name in names:
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    pages[os.path.relpath(path, docs).replace(os.sep, "/")] = f.read()
    return pages


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "configuration"
    docs = os.path.join(ROOT, "docs")
    print(GENERATED[f"reference/{which}.md"](_pages_on_disk(docs)))
