"""SVG plots for the benchmark report, written by hand (no plotting library): throughput and
authorizer CPU per request of each scenario against both floors (E2, E2s), and latency CDFs of the
constant-rate runs. Small, self-contained files that any Markdown viewer shows."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

WIDTH = 760
BAR_HEIGHT = 18
LEFT = 70
RIGHT = 110
COLOURS = {"E2": "#d62728", "E2s": "#ff7f0e"}
CURVES = ("#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd")


def _text(x: float, y: float, text: str, *, anchor: str = "start", fill: str = "#000") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{html.escape(text)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, dash: str = "") -> str:
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{dashed}/>'


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )


def bars(title: str, unit: str, values: Mapping[str, float], floors: Mapping[str, float]) -> str:
    """One horizontal bar per scenario, with a dashed line at each floor's value."""
    names = list(values)
    top = 34
    height = top + BAR_HEIGHT * 1.5 * len(names) + 40
    largest = max([*values.values(), *floors.values(), 1.0])
    span = WIDTH - LEFT - RIGHT

    def x(value: float) -> float:
        return LEFT + span * value / largest

    body = []
    for i, name in enumerate(names):
        y = top + i * BAR_HEIGHT * 1.5
        value = values[name]
        fill = COLOURS.get(name, "#1f77b4")
        body.append(_text(LEFT - 6, y + 13, name, anchor="end"))
        body.append(
            f'<rect x="{LEFT}" y="{y}" width="{x(value) - LEFT:.1f}" height="{BAR_HEIGHT}" fill="{fill}"/>'
        )
        body.append(_text(x(value) + 4, y + 13, f"{value:,.0f} {unit}"))
    bottom = top + BAR_HEIGHT * 1.5 * len(names)
    for name, value in floors.items():
        colour = COLOURS.get(name, "#555")
        body.append(_line(x(value), top - 4, x(value), bottom, colour, "4 3"))
        body.append(_text(x(value), bottom + 14, name, anchor="middle", fill=colour))
    return _svg(WIDTH, int(height), body, title)


def cdf(title: str, samples: Mapping[str, Sequence[float]]) -> str:
    """Latency CDFs (ms on a log axis from the smallest to the largest sample shown)."""
    height, top, bottom = 360, 34, 300
    series = {name: sorted(values) for name, values in samples.items() if values}
    if not series:
        return _svg(WIDTH, 80, ['<text x="20" y="50">no latency samples in this run</text>'], title)
    low = max(1.0, min(v[0] for v in series.values()))
    high = max(v[int(len(v) * 0.999) - 1] for v in series.values())
    span = WIDTH - LEFT - RIGHT

    def x(us: float) -> float:
        return LEFT + span * (math.log10(max(us, low)) - math.log10(low)) / max(1e-9, math.log10(high / low))

    def y(fraction: float) -> float:
        return bottom - (bottom - top) * fraction

    body = [_line(LEFT, bottom, WIDTH - RIGHT, bottom, "#333"), _line(LEFT, top, LEFT, bottom, "#333")]
    for fraction in (0.5, 0.9, 0.99):
        body.append(_line(LEFT, y(fraction), WIDTH - RIGHT, y(fraction), "#ddd"))
        body.append(_text(LEFT - 6, y(fraction) + 4, f"p{fraction * 100:g}", anchor="end"))
    decade = 10 ** math.floor(math.log10(low))
    while decade <= high:
        for step in (1, 2, 5):
            tick = decade * step
            if low <= tick <= high:
                body.append(_text(x(tick), bottom + 16, f"{tick / 1000:g} ms", anchor="middle"))
        decade *= 10
    for i, (name, values) in enumerate(series.items()):
        colour = CURVES[i % len(CURVES)]
        count = len(values)
        points = []
        for k in range(0, 501):
            index = min(count - 1, int(k / 500 * (count - 1)))
            points.append(f"{x(values[index]):.1f},{y(index / (count - 1) if count > 1 else 1):.1f}")
        body.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(points)}"/>'
        )
        body.append(_text(WIDTH - RIGHT + 8, top + 16 * i + 10, name, fill=colour))
    return _svg(WIDTH, height, body, title)


def write(directory: Path, plots: Mapping[str, str]) -> list[str]:
    """Write each plot as NAME.svg in ``directory``; the Markdown lines that embed them."""
    lines = []
    for name, svg in plots.items():
        (directory / f"{name}.svg").write_text(svg)
        lines.append(f"![{name}]({name}.svg)")
    return lines
