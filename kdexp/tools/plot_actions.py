"""The actions of a knowledge-selection run over its phases, as an SVG line chart (one line per kind).

    python -m kdexp.tools.plot_actions <run folder or results.json> --out actions.svg

Reads `method_info.phase_actions` of the final training (or, with `--episode k`, the agent
stage's episode k). Plain SVG, no plotting library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kdexp.selection.agent import KNOWLEDGE_KINDS

COLOURS = {"fink": "#1f77b4", "resk": "#d62728", "feak": "#2ca02c", "relk": "#9467bd"}
WIDTH, HEIGHT, MARGIN = 640, 320, 48


def phase_weights(results: dict[str, Any], episode: int | None = None) -> list[dict[str, float]]:
    info = results["method_info"]
    if episode is None:
        return [phase["weights"] for phase in info["phase_actions"]]
    return [dict(zip(KNOWLEDGE_KINDS, phase["action"])) for phase in info["agent_stage"]["history"][episode]]


def _point(phase: int, weight: float, phases: int, top: float) -> tuple[float, float]:
    x = MARGIN + (WIDTH - 2 * MARGIN) * (phase / max(phases - 1, 1))
    y = HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (weight / top)
    return round(x, 2), round(y, 2)


def actions_svg(weights: list[dict[str, float]], title: str) -> str:
    phases = len(weights)
    top = max(1.0, max(w for phase in weights for w in phase.values()))
    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        'font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle">{title}</text>',
    ]
    x0, y0 = _point(0, 0, phases, top)
    x1, y1 = _point(phases - 1, top, phases, top)
    lines.append(f'<polyline points="{x0},{y1} {x0},{y0} {x1},{y0}" fill="none" stroke="black"/>')
    lines += [
        f'<text x="{x0 - 6}" y="{y}" text-anchor="end">{label}</text>'
        for label, y in ((f"{top:g}", y1 + 4), ("0", y0 + 4))
    ]
    lines.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">phase (0 to {phases - 1})</text>')
    for row, kind in enumerate(KNOWLEDGE_KINDS):
        points = " ".join(f"{x},{y}" for x, y in (_point(p, w[kind], phases, top) for p, w in enumerate(weights)))
        lines.append(
            f'<polyline data-kind="{kind}" points="{points}" fill="none" stroke="{COLOURS[kind]}" stroke-width="2"/>'
        )
        lines.append(f'<text x="{WIDTH - MARGIN + 6}" y="{MARGIN + 16 * row}" fill="{COLOURS[kind]}">{kind}</text>')
    lines.append("</svg>")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdexp.tools.plot_actions", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder or its results.json")
    parser.add_argument("--out", type=Path, required=True, help="the SVG file to write")
    parser.add_argument("--episode", type=int, default=None, help="plot this agent-stage episode instead")
    args = parser.parse_args(argv)
    path = args.run / "results.json" if args.run.is_dir() else args.run
    results = json.loads(path.read_text())
    weights = phase_weights(results, args.episode)
    where = "final training" if args.episode is None else f"agent stage, episode {args.episode}"
    title = f"{results['task']} {results['method']} seed {results['seed']}: knowledge weights per phase ({where})"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(actions_svg(weights, title))
    print(f"{args.out}: {len(weights)} phases")


if __name__ == "__main__":
    main()
