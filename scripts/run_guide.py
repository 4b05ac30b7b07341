"""Runs every command block of docs/guide.md as written, in a scratch copy of this checkout.

    python scripts/run_guide.py [--guide docs/guide.md] [--only 3,7] [--list] [--keep DIR]

Each ```bash block runs in a fresh `bash -e` shell, each ```python block in a fresh
interpreter, in order (later blocks use what earlier ones wrote: data/, runs/), from the root
of a copy of the checkout's files (git's tracked and untracked, not ignored ones), with this
interpreter's folder first on PATH. A block right under a `<!-- not run here: why -->` line
is skipped and listed with the reason. Prints a Markdown table: block, first line, exit
status, seconds; each block's output is in <scratch>/guide_logs/<n>.log.
"""

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*not run here:\s*(.*?)\s*-->\s*$")


def blocks(markdown: str) -> list[dict]:
  """[{"language", "code", "skip" (reason or None), "section", "line"}] in document order."""
  found, section, skip = [], "", None
  lines = markdown.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("#"):
      section = line.lstrip("#").strip()
    if _SKIP.match(line):
      skip = _SKIP.match(line).group(1)
    fence = _FENCE.match(line)
    if fence and fence.group(1):
      end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
      if fence.group(1) in ("bash", "python"):
        found.append({"language": fence.group(1), "code": "\n".join(lines[i + 1:end]) + "\n",
                      "skip": skip, "section": section, "line": i + 1})
      skip = None
      i = end
    elif line.strip() and not _SKIP.match(line):
      skip = None  # the marker applies only to the block right under it
    i += 1
  return found


def copy_checkout(dst: pathlib.Path) -> None:
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                          cwd=REPO, capture_output=True, check=True).stdout
  for name in filter(None, listed.decode().split("\0")):
    source = REPO / name
    if source.is_file():
      (dst / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, dst / name)


def run_block(block: dict, cwd: pathlib.Path, log: pathlib.Path, timeout: float) -> tuple:
  env = dict(os.environ)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  if block["language"] == "bash":
    command = ["bash", "-e", "-c", block["code"]]
  else:
    command = [sys.executable, "-c", block["code"]]
  start = time.time()
  with open(log, "w", encoding="utf-8") as out:
    out.write(block["code"] + "\n----\n")
    out.flush()
    try:
      status = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      status = "timeout"
  return status, time.time() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--guide", default=str(REPO / "docs" / "guide.md"))
  parser.add_argument("--only", default="", help="comma-separated block numbers to run")
  parser.add_argument("--list", action="store_true", help="print the blocks, run nothing")
  parser.add_argument("--keep", default="", help="scratch folder to use and keep")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per block")
  args = parser.parse_args()
  found = blocks(pathlib.Path(args.guide).read_text(encoding="utf-8"))
  only = {int(n) for n in args.only.split(",") if n}
  if args.list:
    for n, block in enumerate(found, 1):
      state = f"skip: {block['skip']}" if block["skip"] else block["language"]
      print(f"{n:3d}  line {block['line']:4d}  [{state}]  {block['code'].splitlines()[0]}")
    return 0

  scratch = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="jaxcls_guide_"))
  scratch.mkdir(parents=True, exist_ok=True)
  copy_checkout(scratch)
  (scratch / "guide_logs").mkdir(exist_ok=True)
  print(f"Running the blocks of {args.guide} in {scratch}\n")
  print("| block | section | first line | exit status | seconds |")
  print("| --- | --- | --- | --- | --- |")
  failed = 0
  for n, block in enumerate(found, 1):
    first = block["code"].splitlines()[0]
    if len(first) > 70:
      first = first[:67] + "..."
    if block["skip"] or (only and n not in only):
      reason = f"not run: {block['skip']}" if block["skip"] else "not selected"
      print(f"| {n} | {block['section']} | `{first}` | {reason} | |", flush=True)
      continue
    status, seconds = run_block(block, scratch, scratch / "guide_logs" / f"{n}.log",
                                args.timeout)
    failed += status != 0
    print(f"| {n} | {block['section']} | `{first}` | {status} | {seconds:.0f} |", flush=True)
  print(f"\n{failed} block(s) failed; logs in {scratch / 'guide_logs'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
