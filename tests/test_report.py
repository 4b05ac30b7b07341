"""`python -m jaxcls.report`: the report of a run drawn again from its files."""

from runner import copy_run, run_tool


def test_report_command_redraws(trained_workdir, tmp_path):
  trained_workdir = copy_run(trained_workdir, tmp_path)  # its own: this test deletes the plots
  for png in (trained_workdir / "report").glob("*.png"):
    png.unlink()
  result = run_tool("jaxcls.report", "--workdir", trained_workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (trained_workdir / "report" / "confusion_matrix.png").exists()
