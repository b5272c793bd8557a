"""The benchmark report's SVG plots are well-formed and show what they say (no numbers judged)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tests.bench import plots

SVG = "{http://www.w3.org/2000/svg}"


def test_bars_against_floors_and_cdfs_are_valid_svg(tmp_path: Path) -> None:
    bar = plots.bars("t <&>", "req/s", {"E2": 3000, "H1": 8000, "X<1>": 3500}, {"E2": 3000, "E2s": 5000})
    root = ET.fromstring(bar)  # noqa: S314
    assert len(root.findall(f"{SVG}rect")) == 1 + 3  # background and one bar per scenario
    assert len(root.findall(f"{SVG}line")) == 2  # one dashed line per floor
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "X<1>" in texts and "t <&>" in texts
    drawn = plots.cdf("latency", {"X1": [float(i) for i in range(100, 5000)], "E2": [300.0] * 10})
    curve = ET.fromstring(drawn)  # noqa: S314
    assert len(curve.findall(f"{SVG}polyline")) == 2
    ET.fromstring(plots.cdf("empty", {}))  # noqa: S314
    lines = plots.write(tmp_path, {"throughput": bar})
    assert lines == ["![throughput](throughput.svg)"] and (tmp_path / "throughput.svg").read_text() == bar
