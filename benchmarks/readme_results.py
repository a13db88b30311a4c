"""Regenerate the figures in README.md's "## Results" from one fresh full run.

    python benchmarks/readme_results.py [extra bench options]

runs `python -m grain_shm bench --markdown --plot docs/bench.png --json
bench.json` from the repository root and puts its tables between the README's
bench markers, so the published figures are always one command's output and
never edited by hand. Nothing is written if the run fails (a leak, a failed
checksum): its tables are printed instead.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COMMAND = [sys.executable, "-m", "grain_shm", "bench", "--markdown",
           "--plot", "docs/bench.png", "--json", "bench.json"]


def main() -> int:
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
