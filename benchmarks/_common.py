"""Helpers shared by the benchmark scripts: result files and peak-memory sampling."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> Dict[str, str]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count()),
            "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write_results(name: str, result: dict, table: List[List[str]]) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` and print the table."""
    RESULTS.mkdir(exist_ok=True)
    result = {**result, "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(row) + " |" for row in table[1:]]
    text = "\n".join(md) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def _anon_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnonMemory:
    """Samples the process's anonymous resident memory (not file-backed pages such as a memory-
    mapped feature file) every ``interval`` seconds; ``peak - baseline`` is what the work added."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakAnonMemory":
        self.baseline = self.peak = _anon_rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_rss_bytes())

    @property
    def added_gb(self) -> float:
        return (self.peak - self.baseline) / 1024 ** 3


def voc_root() -> Path:
    """The shared VOC subset (``$VPL_VOC_ROOT``, else ``<ancestor>/shared/data/voc2012_subset/VOC2012``)."""
    if os.environ.get("VPL_VOC_ROOT"):
        return Path(os.environ["VPL_VOC_ROOT"])
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        cand = folder / "shared" / "data" / "voc2012_subset" / "VOC2012"
        if cand.is_dir():
            return cand
    raise SystemExit("VOC subset not found: set VPL_VOC_ROOT=/path/to/VOC2012")
