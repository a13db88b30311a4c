"""Regenerate the figures in README.md's "## Results" from one fresh full run.

    python benchmarks/readme_results.py [extra bench options]
    python benchmarks/readme_results.py --tiny   # CI: a quick run, nothing written

runs `python -m grain_shm bench --markdown --plot docs/bench.png --json
bench.json` from the repository root and puts its tables between the README's
bench markers, so the published figures are always one command's output and
never edited by hand. Nothing is written if the run fails (a leak, a failed
checksum): its tables are printed instead.
"""

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COMMAND = [sys.executable, "-m", "grain_shm", "bench", "--markdown",
           "--plot", "docs/bench.png", "--json", "bench.json"]


def tiny() -> int:
    """The same command, quick, on one size, into a scratch directory (and
    without the plot where matplotlib is missing): that it runs and renders
    the tables, without touching README.md or docs/."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "grain_shm", "bench", "--markdown", "--quick",
                   "--sizes", "64K", "--json", f"{scratch}/bench.json"]
        if importlib.util.find_spec("matplotlib"):
            command += ["--plot", f"{scratch}/bench.png"]
        run = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(run.stdout)
    if run.returncode == 0 and "| size |" not in run.stdout:
        print("no markdown table in the output", file=sys.stderr)
        return 1
    return run.returncode


def main() -> int:
    if sys.argv[1:] == ["--tiny"]:
        return tiny()
    run = subprocess.run(COMMAND + sys.argv[1:], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if run.returncode != 0:
        print(run.stdout)
        print(f"bench failed (exit status {run.returncode}); README.md left as it was",
              file=sys.stderr)
        return run.returncode
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{BEGIN}\n{run.stdout}{END}{tail}")
    print(f"README.md and docs/bench.png updated; every figure is in {ROOT / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
