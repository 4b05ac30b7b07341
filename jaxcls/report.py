"""`python -m jaxcls.report --workdir DIR`: draws the plots and summary.md of a run.

Everything is read back from the run directory (jaxcls.plots), so a report can be drawn at
any time: while training runs, after it was killed, or after it finished.
"""

import argparse
import sys

from jaxcls import plots
from jaxcls import workdir as workdir_lib


def main(argv=None):
  parser = argparse.ArgumentParser(description="Draw the report of a jaxcls run.")
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args(argv)
  try:
    is_run = workdir_lib.is_run_dir(args.workdir)
  except ValueError as e:  # a bucket whose backend is not installed
    sys.exit(f"error: {e}")
  if not is_run:
    sys.exit(f"error: {workdir_lib.metrics_path(args.workdir)} does not exist: is it a run's "
             "--workdir?")
  for path in plots.write_report(args.workdir):
    print(path)


if __name__ == "__main__":
  main()
