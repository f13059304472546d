"""
What the topics benchmark prints: per scenario one JSON line on stdout
(every round's figures per column, the medians of the headline figure,
the ratios taken within each round and their medians) and a table on
stderr.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional

Line = dict[str, Any]
Figures = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """A scenario's line: its headline figure and the ratio it is judged by."""

    label: str
    metric: str
    ratio_of: tuple[str, str]  # numerator column / denominator column
    ratios: tuple[str, ...]  # the figures a ratio is given for
    target: str = ""  # the issue's target for the headline ratio, if it has one


KINDS = {
    "fanout": Kind("fan-out, one topic: proxy CPU µs/delivery", "cpu_us_per_delivery",
                   ("wsproxy", "node"), ("cpu_us_per_delivery", "user_us_per_delivery",
                                         "sys_us_per_delivery", "last_p50_ms", "last_p99_ms"),
                   "wsproxy CPU per delivery <= half of node's"),
    "per-session": Kind("one message to every socket: proxy CPU µs/delivery",
                        "cpu_us_per_delivery", ("topic", "per-session"),
                        ("cpu_us_per_delivery", "redis_cpu_us_per_delivery", "last_p99_ms")),
    "centrifugo": Kind("personal + group of 10: deliveries per proxy CPU second",
                       "deliveries_per_cpu_s", ("wsproxy", "node"),
                       ("deliveries_per_cpu_s", "p99_ms")),
    "resume-mix": Kind("fan-out, half resuming + labelled: proxy CPU µs/delivery",
                       "cpu_us_per_delivery", ("recoverable", "plain"), ("cpu_us_per_delivery",)),
}


def kind_of(name: str) -> Kind:
    return KINDS[name.partition("@")[0]]


def _median(values: list[Any]) -> Optional[float]:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(numbers), 3) if numbers else None


def _ratio(ours: Any, theirs: Any) -> Optional[float]:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0:
        return round(ours / theirs, 3)
    return None


def summary(name: str, rounds: list[dict[str, Figures]], targets: list[str],
            node_unavailable: Optional[str]) -> Line:
    """The JSON line of one scenario."""
    kind = kind_of(name)
    top, bottom = kind.ratio_of
    columns = sorted({c for r in rounds for c in r}, key=lambda c: (c != top, c))
    line: Line = {"scenario": name, "metric": kind.metric, "ratio_of": f"{top}/{bottom}",
                  "columns": columns, "rounds": []}
    for figures in rounds:
        entry: dict[str, Any] = dict(figures)
        if top in figures and bottom in figures:
            entry["ratios"] = {key: _ratio(figures[top].get(key), figures[bottom].get(key))
                               for key in kind.ratios}
            entry["ratio"] = entry["ratios"][kind.metric]
        line["rounds"].append(entry)
    for column in columns:
        line[column] = _median([r[column].get(kind.metric) for r in rounds if column in r])
    if "node" in kind.ratio_of and node_unavailable is not None:
        line["node"] = None
        line["node_unavailable"] = node_unavailable
    line["ratios"] = {key: _median([r.get("ratios", {}).get(key) for r in line["rounds"]])
                      for key in kind.ratios}
    line["ratio"] = line["ratios"][kind.metric]
    line["lost"] = sum(f.get("lost") or 0 for r in rounds for f in r.values())
    line["duplicates"] = sum(f.get("duplicates") or 0 for r in rounds for f in r.values())
    line["host_busy_max"] = _median([max((f.get("host_busy") or 0) for f in r.values())
                                     for r in rounds])
    if kind.target and line["ratio"] is not None:
        line["target"] = kind.target
        line["target_met"] = line["ratio"] <= 0.5
    return line


def _cell(values: list[Any]) -> str:
    return ", ".join("-" if v is None else f"{v:g}" for v in values) or "-"


def _notes(figs: Figures) -> str:
    notes = [f"last p50/p99 {_cell([figs.get('last_p50_ms')])}/"
             f"{_cell([figs.get('last_p99_ms')])} ms",
             f"p99 {_cell([figs.get('p99_ms')])} ms",
             f"CPU {figs.get('proxy_cpu_s')} s (user/sys µs/delivery "
             f"{_cell([figs.get('user_us_per_delivery')])}/{_cell([figs.get('sys_us_per_delivery')])})"]
    if figs.get("redis_cpu_us_per_delivery") is not None:
        notes.append(f"Redis {figs['redis_cpu_us_per_delivery']:g} µs/delivery")
    notes.append(f"delivered {figs.get('delivered')}/{figs.get('expected')}")
    if figs.get("lost") or figs.get("duplicates") or figs.get("corrupt"):
        notes.append(f"LOST {figs.get('lost')} dup {figs.get('duplicates')} "
                     f"corrupt {figs.get('corrupt')}")
    if figs.get("host_busy") is not None:
        notes.append(f"host {figs['host_busy']:.0%}")
    return "; ".join(notes)


def table(lines: list[Line]) -> str:
    """Per scenario a row per column: each round's headline figure, the ratio, notes."""
    rows = [f"{'scenario / column':<30} {'per round':>22} {'ratio':>14}  notes (per round)"]
    for line in lines:
        kind = kind_of(line["scenario"])
        name = line["scenario"]
        size = f" ({name.partition('@')[2]} sockets)" if "@" in name else ""
        rows.append(f"{kind.label}{size}  [ratio {line['ratio_of']}, median {line['ratio']}]")
        for column in line["columns"] + (["node"] if line.get("node_unavailable") else []):
            mine = [r[column] for r in line["rounds"] if column in r]
            text = _cell([f.get(kind.metric) for f in mine])
            if column == "node" and line.get("node_unavailable"):
                text = f"n/a ({line['node_unavailable']})"
            ratio = (_cell([r.get("ratio") for r in line["rounds"]])
                     if column == kind.ratio_of[0] else "")
            rows.append(f"  {column:<28} {text:>22} {ratio:>14}  "
                        + " | ".join(_notes(f) for f in mine))
        if "target_met" in line:
            rows.append(f"  target {line['target']}: {'met' if line['target_met'] else 'NOT met'}"
                        f" (median ratio {line['ratio']:g})")
    rows.append("(one value per round; ratios taken within a round; last = from a publish to "
                "its LAST socket's receipt; CPU from /proc, 10 ms ticks)")
    return "\n".join(rows)
