"""Write measured results into BENCHMARKS.md: each producer owns one marked section and replaces only it."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEADER = "# Benchmarks\n\nEvery number here was measured on this repository's code with the command shown next to it.\n"


def command_line(command: str, provenance: str = "") -> str:
    """A results section's "Command:" line; ``provenance`` (markdown, after the command) says where the run came
    from, e.g. which judged run a section was rendered from. Ends in a markdown line break."""
    return f"Command: `{command}`" + (f" {provenance}" if provenance else "") + "  "


def with_artifacts(text: str, raw: Path, image: tuple[str, Path] | None = None) -> str:
    """A results section followed by its plot (``(alt text, path)``) and the raw results file it came from."""
    plot = f"\n\n![{image[0]}]({image[1].as_posix()})" if image else ""
    return f"{text}{plot}\n\nRaw results: `{raw.as_posix()}`"


def replace_section(path: Path, name: str, content: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (appending it if new)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{content.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (creating folders) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def script_command(script: str, argv: Sequence[str] | None) -> str:
    """How a benchmarks/ script was invoked, for its results' "Command:" line."""
    return f"python benchmarks/{script} {shlex.join(argv if argv is not None else sys.argv[1:])}".strip()


def save_results(result: dict[str, Any], raw: Path, text: str, section: str | None = None) -> None:
    """Write a script's raw results as JSON and, given a ``section``, its markdown into BENCHMARKS.md
    (followed by the raw file's path)."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(result, indent=1))
    if section:
        replace_section(Path("BENCHMARKS.md"), section, with_artifacts(text, raw))
