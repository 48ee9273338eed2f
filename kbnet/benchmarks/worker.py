"""The peak-memory worker process: ``python -m kbnet.benchmarks.worker <benchmark module> <JSON payload>``.

``kbnet.benchmarks.common.run_worker`` starts it in a fresh process, so that the peak resident memory it measures
belongs to the variants of one payload alone; it calls the module's ``worker(payload)`` and prints the result as
JSON on its last line.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> None:
    module, payload = argv
    print(json.dumps(importlib.import_module(module).worker(json.loads(payload))))


if __name__ == "__main__":
    main(sys.argv[1:])
