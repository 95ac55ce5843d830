"""Compare runs: ``python experiments/compare.py RUN_DIR [RUN_DIR ...]`` prints mean ± std over seeds per
(dataset, method) of the last round's and the last-5-rounds' mean per-client accuracy."""

import argparse
import sys

from fedlit.reporting import comparison_table, load_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", help="run directories (searched recursively for results.json)")
    args = parser.parse_args(argv)
    results = [r for r in load_results(args.run_dirs) if r.get("final")]
    if not results:
        print("error: no results.json with final numbers under the given directories", file=sys.stderr)
        return 2
    print(comparison_table(results, "last_round"))
    print()
    print(comparison_table(results, "mean_last_5"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
