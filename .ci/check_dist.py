"""Check an sdist and a wheel against the tracked files named on stdin.

The sdist must hold every one of them (so it builds from its own sources,
.pyx/.pxd/.h included) and not the C file cythonize generates; the wheel must
hold every file of the package (src/grain_shm/...), the compiled core, the
license, and grain_shm.pth at its root (installed into site-packages). Usage: git ls-files ... | python3 check_dist.py SDIST WHEEL
"""

import sys
import tarfile
import zipfile

sdist_path, wheel_path = sys.argv[1:3]
tracked = sorted(line.strip() for line in sys.stdin if line.strip())

with tarfile.open(sdist_path) as sdist:
    names = sdist.getnames()
top = names[0].split("/", 1)[0]
in_sdist = {name.split("/", 1)[1] for name in names if "/" in name}
with zipfile.ZipFile(wheel_path) as wheel:
    in_wheel = set(wheel.namelist())

problems = [f"sdist lacks {path}" for path in tracked if path not in in_sdist]
problems += [
    f"wheel lacks {path}"
    for path in tracked
    if path.startswith("src/grain_shm/") and path[len("src/"):] not in in_wheel
]
if "src/grain_shm/_shm.c" in in_sdist:
    problems.append("sdist ships the generated _shm.c")
if not any(n.startswith("grain_shm/_shm.") and n.endswith(".so") for n in in_wheel):
    problems.append("wheel lacks the compiled grain_shm._shm")
if "grain_shm.pth" not in in_wheel:
    problems.append("wheel lacks grain_shm.pth at its root")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in in_wheel):
    problems.append("wheel lacks LICENSE")

for problem in problems:
    print(problem)
if problems:
    sys.exit(1)
print(f"{top}: {len(tracked)} tracked files in the sdist; package files, core, "
      "license and grain_shm.pth in the wheel")
