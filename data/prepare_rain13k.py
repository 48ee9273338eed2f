"""Check the deraining data (Rain13K and its test sets) before training: every input has a target of the same
size, and every image decodes. Writes nothing.

    python data/prepare_rain13k.py --root data

Expects ``<root>/train/Rain13K/{input,target}`` and ``<root>/test/<set>/{input,target}`` for Test100, Rain100H,
Rain100L, Test1200 and Test2800, pairs sharing a file name (extensions may differ). Rain13K is used
whole (no crops are cut). Lists every problem and exits with status 1 if there is any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kbnet.data.datasets import images_by_stem
from kbnet.data.prepare import run_parallel
from kbnet.imageio import ImageReadError, read_image

DEFAULT_SETS = ("train/Rain13K", "test/Test100", "test/Rain100H", "test/Rain100L", "test/Test1200",
                "test/Test2800")


def check_pair(pair: tuple[Path, Path]) -> str | None:
    """A problem with one (input, target) pair, or None."""
    try:
        inp, target = read_image(pair[0]).pixels, read_image(pair[1]).pixels
    except ImageReadError as err:
        return str(err)
    if inp.shape != target.shape:
        return (f"size mismatch: {pair[0]} is {inp.shape[1]}x{inp.shape[0]}x{inp.shape[2]}, "
                f"{pair[1]} is {target.shape[1]}x{target.shape[0]}x{target.shape[2]}")
    return None


def check_set(folder: Path, workers: int) -> tuple[int, list[str]]:
    """(number of good pairs, problems) of one ``input``/``target`` folder pair."""
    try:
        inputs, targets = images_by_stem(folder / "input"), images_by_stem(folder / "target")
    except (FileNotFoundError, ValueError) as err:
        return 0, [str(err)]
    problems = [f"input without target: {inputs[s]}" for s in sorted(inputs.keys() - targets.keys())]
    problems += [f"target without input: {targets[s]}" for s in sorted(targets.keys() - inputs.keys())]
    pairs = [(inputs[s], targets[s]) for s in inputs if s in targets]
    pair_problems = [p for p in run_parallel(check_pair, pairs, workers) if p is not None]
    return len(pairs) - len(pair_problems), problems + pair_problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="data root, e.g. data")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS),
                        help="folders under the root holding input/ and target/")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    failed = False
    for name in args.sets:
        good, problems = check_set(args.root / name, args.workers)
        print(f"{name}: {good} good pairs, {len(problems)} problem(s)")
        for problem in problems:
            print(f"  {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
