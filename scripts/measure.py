"""What every benchmark shares: timing a call, and printing a table with the machine's load beside it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def load_average() -> str:
    """The one-minute load average and the cores: other work on them inflates every figure."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def samples_ms(call: Callable[[], object], runs: int, warmups: int = 1) -> list[float]:
    """Wall time of `runs` calls in milliseconds, after `warmups` calls that are not timed."""
    for _ in range(warmups):
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print `rows` under `header` in aligned columns, the title and the load average above."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}   ({load_average()})")
    print("  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
