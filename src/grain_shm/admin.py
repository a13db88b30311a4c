"""`python -m grain_shm ls | gc | doctor`: look after /dev/shm by hand.

- ls [--json]: grain_shm's segments with size, session, the session root's
  pid, whether it is alive, whether its reaper runs, and age; the pool's
  arenas (segments carved into blocks) with their size class (the block
  size), and their bytes in use, wasted (blocks beyond their arrays) and free;
  each grain_shm.Queue with its depth and the bytes of its large items.
- gc [--dry-run]: unlink the segments (arenas included) of dead sessions: the
  root is gone and no process holds the session's sockets (its reaper, or a
  member that created or opened a segment; see grain_shm.reaper). A live
  session's segments and persistent ones (session.persistent()) are never
  touched, nor those of a session whose liveness is unknown: one of another
  pid namespace, unless gc runs as root in the initial pid namespace, which
  sees every process (the host of containers run with `--ipc=host`).
- doctor: size and free space of /dev/shm, the largest array that fits, the
  pool's bound (GRAIN_SHM_RECYCLE), the limits that bite (open files,
  vm.max_map_count), and what to do when something is small. Exits non-zero
  when /dev/shm is missing, read-only or refuses a segment.

All three read segment names and /proc (see grain_shm.names and
grain_shm.reaper for what they say) and the headers of arenas and queues
(see _pool.h, _ring.h), read-only; nothing here keeps state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import time
from typing import Literal, TypedDict

from grain_shm import names, reaper

GiB = 1 << 30
MiB = 1 << 20
SMALL_SHM = 1 * GiB  # Docker's default is 64 MiB
SMALL_MAP_COUNT = 65530  # the kernel's default; some distributions lower it
SMALL_NOFILE = 4096
INITIAL_PID_NAMESPACE = 0xEFFFFFFC  # the kernel's PROC_PID_INIT_INO


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


# An arena's header and block table, as _pool.h lays them out (gs_arena,
# gs_block): magic, version, nblocks, block_bytes, data_start, arena_bytes,
# owner_pid, owner_gone, retired, remote_frees, then owner_pidns and 2
# reserved words (not read here); then per block its word (generation |
# linked | references) and nbytes.
ARENA_MAGIC = b"grainshm"
ARENA_VERSION = 1
_ARENA_HEADER = struct.Struct("=8sIIQQQqIIQ24x")
_BLOCK = struct.Struct("=QQ")
_IN_USE = 0xFFFFFFFF  # the linked bit and the reference count
_MAX_BLOCKS = 1 << 20  # far above what the core makes (1024); a header is not trusted


class ArenaRecord(TypedDict):
    """A pool arena's blocks, as its header says (`segments()` reads it)."""

    blocks: int
    block_bytes: int  # its size class
    blocks_in_use: int
    bytes_in_use: int  # the arrays' own bytes, not whole blocks
    bytes_wasted: int  # what the blocks in use hold beyond their arrays' bytes
    blocks_free: int
    bytes_free: int
    owner_pid: int
    owner_gone: bool


def read_arena(path: str) -> ArenaRecord | None:
    """The arena in segment `path`, or None if it is not one this version
    lays out. The header is checked as the core checks it (a segment may
    hold anything): every offset and count must fit in the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < _ARENA_HEADER.size:
            return None
        head = os.pread(fd, _ARENA_HEADER.size, 0)
        if len(head) < _ARENA_HEADER.size:
            return None
        (magic, version, nblocks, block_bytes, data_start, _, owner_pid,
         owner_gone, _, _) = _ARENA_HEADER.unpack(head)
        table_end = _ARENA_HEADER.size + nblocks * _BLOCK.size
        if (magic != ARENA_MAGIC or version != ARENA_VERSION
                or not 0 < nblocks <= _MAX_BLOCKS or block_bytes == 0
                or not table_end <= data_start <= size
                or data_start + nblocks * block_bytes > size):
            return None
        table = os.pread(fd, table_end - _ARENA_HEADER.size, _ARENA_HEADER.size)
        if len(table) < table_end - _ARENA_HEADER.size:
            return None  # shrunk meanwhile
        words = list(_BLOCK.iter_unpack(table))
    except OSError:
        return None
    finally:
        os.close(fd)
    used = [min(nbytes, block_bytes) for word, nbytes in words if word & _IN_USE]
    return {
        "blocks": nblocks,
        "block_bytes": block_bytes,
        "blocks_in_use": len(used),
        "bytes_in_use": sum(used),
        "bytes_wasted": len(used) * block_bytes - sum(used),
        "blocks_free": nblocks - len(used),
        "bytes_free": (nblocks - len(used)) * block_bytes,
        "owner_pid": owner_pid,
        "owner_gone": bool(owner_gone),
    }


def unlink_arenas_of(pid: int, session: str, shm_dir: str = names.SHM_DIR) -> list[str]:
    """Unlink the pool arenas of `session` that process `pid` owned, once it
    was killed: SIGKILL skips the exit hook that would leave each arena to
    whoever frees its last block, so they would stay until the session ends
    (a killed prefetch worker's: up to its pool's bound). Processes that map
    one keep their arrays; no block in it opens again. The names unlinked."""
    prefix = names.segment_prefix(session) + names.ARENA_MARK
    gone = []
    for name in os.listdir(shm_dir):
        if not name.startswith(prefix) or not names.is_arena(name):
            continue
        arena = read_arena(os.path.join(shm_dir, name))
        if arena is not None and arena["owner_pid"] == pid and not arena["owner_gone"]:
            try:
                os.unlink(os.path.join(shm_dir, name))
            except FileNotFoundError:
                continue
            gone.append(name)
    return gone


# A queue's ring, as _ring.h lays it out (gs_ring): magic, version,
# capacity, cell_stride, cell_bytes, data_start, segment_bytes, max_bytes,
# creator_pid, pidns, handles; tail and head at GS_RING_PAD (128) and twice
# that. A cell: state (progress 32 | pid 32), length, kind; a large item's
# payload starts with its byte count.
QUEUE_MAGIC = b"grainshq"
_QUEUE_HEADER = struct.Struct("=8sIIQQQQQqQI")
_QUEUE_PAD = 128
_CELL = struct.Struct("=QIIQ")
_FULL, _KIND_LARGE = 2, 3


class QueueRecord(TypedDict):
    """A grain_shm.Queue's ring, as its header says (`segments()` reads it)."""

    capacity: int
    depth: int
    cell_bytes: int
    handles: int
    large_bytes: int  # bytes of large items waiting (in blocks of their own)


def read_queue(path: str) -> QueueRecord | None:
    """The queue in segment `path`, or None if it is not one this version
    lays out (checked as the core checks it)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(3 * _QUEUE_PAD)
            if len(head) < 3 * _QUEUE_PAD or head[:8] != QUEUE_MAGIC:
                return None
            (_, version, capacity, stride, cell_bytes, data_start, _, _, _, _,
             handles) = _QUEUE_HEADER.unpack_from(head)
            if (version != 1 or capacity == 0 or stride < _CELL.size or stride % 64
                    or data_start + capacity * stride > size):
                return None
            tail, = struct.unpack_from("=Q", head, _QUEUE_PAD)
            first, = struct.unpack_from("=Q", head, 2 * _QUEUE_PAD)
            depth = min(max(tail - first, 0), capacity)
            large = 0
            for pos in range(first, first + depth):
                f.seek(data_start + (pos % capacity) * stride)
                state, _, kind, nbytes = _CELL.unpack(f.read(_CELL.size))
                if (state >> 32) % 4 == _FULL and kind == _KIND_LARGE:
                    large += nbytes
    except (OSError, struct.error):
        return None
    return {"capacity": capacity, "depth": depth, "cell_bytes": cell_bytes,
            "handles": handles, "large_bytes": large}


class SegmentRecord(TypedDict):
    """What `segments()` says about one segment (`ls --json` prints these)."""

    name: str
    size: int
    session: str | None  # None for a persistent segment
    root_pid: int | None
    alive: bool | None  # None: persistent, or liveness unknown
    reaper: bool | None
    persistent: bool
    age_s: float
    arena: ArenaRecord | None  # None: an array's own segment
    queue: QueueRecord | None  # None: not a grain_shm.Queue


def _other_namespace_roots() -> set[tuple[int, int, int]] | None:
    """What would name a session in every other pid namespace: (pid as its
    namespace numbers it, start tag, namespace tag) of each process there.

    Only the initial pid namespace sees every process, so only there can a
    session of another namespace (a container sharing /dev/shm with
    `--ipc=host`) be found dead: no process left with its identity. None
    elsewhere, or when some nested process's namespace is unreadable (not
    root)."""
    ours = reaper.pid_namespace()
    if ours != INITIAL_PID_NAMESPACE:
        return None  # nested: siblings and ancestors are out of sight
    roots: set[tuple[int, int, int]] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                nspids = next(line for line in f if line.startswith("NSpid:")).split()[1:]
            if len(nspids) == 1:
                continue  # of the initial namespace: root_alive() covers it
            ns = os.stat(f"/proc/{entry}/ns/pid").st_ino
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue  # exited meanwhile
        except PermissionError:
            return None
        start = reaper.start_time(int(entry))
        if start is not None:
            roots.add((int(nspids[-1]), start % reaper.TAG, ns % reaper.TAG))
    return roots


class _Liveness:
    """Whether sessions are alive, each worked out once per command."""

    def __init__(self) -> None:
        self.registry = reaper.registry()  # sessions some live process has joined
        self._known: dict[str, bool | None] = {}
        # False: not read yet; None: unreadable (see _other_namespace_roots)
        self._others: set[tuple[int, int, int]] | None | Literal[False] = False

    def __call__(self, session: str) -> bool | None:
        if session not in self._known:
            alive = session in self.registry or reaper.root_alive(session)
            if alive is None:  # another pid namespace's session
                if self._others is False:
                    self._others = _other_namespace_roots()
                if self._others is not None:
                    alive = reaper.root_of(session) in self._others
            self._known[session] = alive
        return self._known[session]


def segments(shm_dir: str = names.SHM_DIR) -> list[SegmentRecord]:
    """One record per grain_shm segment in `shm_dir`, oldest first."""
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    now = time.time()
    alive_of = _Liveness()
    records: list[SegmentRecord] = []
    for name in entries:
        persistent = names.PERSISTENT_RE.fullmatch(name) is not None
        match = names.SEGMENT_RE.fullmatch(name)
        if not match and not persistent:
            continue
        try:
            st = os.stat(os.path.join(shm_dir, name))
        except OSError:
            continue  # unlinked meanwhile
        record: SegmentRecord = {
            "name": name,
            "size": st.st_size,
            "session": None,
            "root_pid": None,
            "alive": None,
            "reaper": None,
            "persistent": persistent,
            # ctime: creation, ftruncate and fallocate happen at once, and
            # writes through a mapping do not touch it.
            "age_s": round(max(0.0, now - st.st_ctime), 1),
            "arena": read_arena(os.path.join(shm_dir, name)),
            "queue": read_queue(os.path.join(shm_dir, name)),
        }
        if match:
            session = match.group(1)
            # A dict, not keywords: the form mypy accepts for a TypedDict.
            record.update({
                "session": session,
                "root_pid": reaper.root_of(session)[0],
                "alive": alive_of(session),
                "reaper": "reaper" in alive_of.registry.get(session, ()),
            })
        records.append(record)
    records.sort(key=lambda r: (-r["age_s"], r["name"]))
    return records


def _alive_text(record: SegmentRecord) -> str:
    if record["persistent"]:
        return "kept"
    return {True: "yes", False: "DEAD", None: "unknown"}[record["alive"]]


def _arena_text(arena: ArenaRecord | None) -> str:
    if arena is None:
        return ""
    return (f"{arena['blocks_in_use']}/{arena['blocks']} blocks of "
            f"{_human(arena['block_bytes'])} in use ({_human(arena['bytes_in_use'])}, "
            f"{_human(arena['bytes_wasted'])} wasted), {_human(arena['bytes_free'])} free")


def _queue_text(queue: QueueRecord | None) -> str:
    if queue is None:
        return ""
    return (f"queue: {queue['depth']}/{queue['capacity']} items, "
            f"{_human(queue['large_bytes'])} in large items")


def cmd_ls(args: argparse.Namespace) -> int:
    records = segments()
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
        return 0
    if not records:
        print(f"no grain_shm segments in {names.SHM_DIR}")
        return 0
    print(f"{'NAME':30} {'SIZE':>10} {'SESSION':13} {'ROOT':>7} {'ALIVE':7} {'REAPER':6} "
          f"{'AGE':>8}  POOL ARENA OR QUEUE")
    for r in records:
        print(
            f"{r['name']:30} {_human(r['size']):>10} {r['session'] or '-':13} "
            f"{r['root_pid'] or '-':>7} {_alive_text(r):7} "
            f"{'-' if r['reaper'] is None else 'yes' if r['reaper'] else 'no':6} "
            f"{r['age_s']:>7.0f}s  {_arena_text(r['arena']) or _queue_text(r['queue'])}".rstrip()
        )
    dead = [r for r in records if r["alive"] is False]
    total = sum(r["size"] for r in records)
    print(f"{len(records)} segments, {_human(total)}", end="")
    arenas = [r["arena"] for r in records if r["arena"] is not None]
    if arenas:
        print(f" ({len(arenas)} pool arenas: {_human(sum(a['bytes_in_use'] for a in arenas))} "
              f"in use, {_human(sum(a['bytes_wasted'] for a in arenas))} wasted, "
              f"{_human(sum(a['bytes_free'] for a in arenas))} free)", end="")
    if dead:
        print(f"; {len(dead)} of dead sessions: `python -m grain_shm gc` frees "
              f"{_human(sum(r['size'] for r in dead))}")
    else:
        print()
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    dead = [r for r in segments() if r["alive"] is False]
    freed = 0
    count = 0
    for r in dead:
        if not args.dry_run:
            try:
                os.unlink(os.path.join(names.SHM_DIR, r["name"]))
            except FileNotFoundError:
                continue  # its reaper or owner was faster
            except OSError as e:
                print(f"cannot remove {r['name']}: {e}", file=sys.stderr)
                continue
        count += 1
        freed += r["size"]
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {r['name']} ({_human(r['size'])}, session {r['session']}, "
              f"root pid {r['root_pid']} and every member gone)")
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {count} segments, {_human(freed)}")
    return 0


def _mount_of(path: str) -> tuple[str, str] | None:
    """(filesystem type, options) of the mount at `path`, from /proc/mounts."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for fields in reversed(mounts):  # the last mount on a path hides the others
        if len(fields) >= 4 and fields[1] == path:
            return fields[2], fields[3]
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_memory_left() -> int | None:
    """Bytes this cgroup (v2) may still charge, if it has a limit: pages of
    /dev/shm count against the cgroup that touches them first."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line[3:].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    limit = None
    while True:  # the tightest limit on the way up to the root
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        try:
            with open(os.path.join(base, "memory.max")) as f:
                raw = f.read().strip()
            with open(os.path.join(base, "memory.current")) as f:
                left = int(raw) - int(f.read()) if raw != "max" else None
        except (OSError, ValueError):
            left = None
        if left is not None:
            limit = max(0, left) if limit is None else min(limit, max(0, left))
        if path in ("", "/"):
            return limit
        path = os.path.dirname(path)


def _remove_ipc_on() -> bool:
    """Whether systemd-logind removes a user's segments at their last logout."""
    if not os.path.isdir("/run/systemd/system") or os.getuid() == 0:
        return False  # no systemd, or root (RemoveIPC spares system users)
    value = "yes"  # logind's default
    for path in ("/etc/systemd/logind.conf",):
        try:
            with open(path) as f:
                for line in f:
                    key, _, v = line.strip().partition("=")
                    if key.strip() == "RemoveIPC":
                        value = v.strip().lower()
        except OSError:
            pass
    return value in ("yes", "true", "1", "on")


def _probe(shm_dir: str) -> str | None:
    """Create and unlink one small segment; None if that works, else why not."""
    from grain_shm import _shm

    try:
        # A persistent name is never a pool block: a segment of its own, even
        # with the pool on (unlinking a block's name would remove its arena).
        segment = _shm.create(4096, names.PERSISTENT_PREFIX.encode())
    except (OSError, MemoryError) as e:
        return f"cannot create a segment: {e}"
    _shm.unlink(segment.name)
    return None


def _pool_lines() -> list[str]:
    """Which parts pool by default, and the bound: what GRAIN_SHM_RECYCLE
    turned on at import, else what enable_recycling() would take."""
    from grain_shm import _shm
    from grain_shm.array import _default_pool_bytes

    value = os.environ.get("GRAIN_SHM_RECYCLE")
    bound = _shm.pool_stats()["max_bytes"]  # set at import from GRAIN_SHM_RECYCLE
    default = f"{_human(_default_pool_bytes())} of arenas per process (a quarter of /dev/shm)"
    by_default = ["  on by default in prefetch()'s workers and in Grain's pipelines under",
                  "  patch_grain() (their arrays are never looked up by name); off for",
                  "  plain SharedMemoryArrays. Off everywhere: GRAIN_SHM_RECYCLE=0, or",
                  "  prefetch(..., recycle=False) for one prefetcher"]
    if value is None or not value.strip():
        return [*by_default,
                "  GRAIN_SHM_RECYCLE not set: plain arrays get fresh segments, unless a",
                f"  program calls SharedMemoryArray.enable_recycling(); default bound: {default}"]
    if bound == 0:
        why = "" if value.strip().lower() in ("0", "false", "no", "off") else (
            " (it takes 1 or a byte count)")
        return [*by_default,
                f"  GRAIN_SHM_RECYCLE={value!r}: off{why}, in the workers too; the default "
                f"bound: {default}"]
    return [*by_default,
            f"  GRAIN_SHM_RECYCLE={value!r}: on in every process that inherits it, "
            f"bound {_human(bound)} of arenas per process"]


def cmd_doctor(args: argparse.Namespace) -> int:
    shm_dir = names.SHM_DIR
    problems: list[str] = []
    advice: list[str] = []
    print(f"{shm_dir}:")
    if not os.path.isdir(shm_dir):
        problems.append(f"{shm_dir} does not exist: POSIX shared memory has nowhere to live")
        advice.append(f"mount a tmpfs there: `mount -t tmpfs -o size=8g tmpfs {shm_dir}`")
    else:
        st = os.statvfs(shm_dir)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        mount = _mount_of(shm_dir)
        fstype = mount[0] if mount else "unknown"
        readonly = bool(st.f_flag & os.ST_RDONLY)
        print(f"  filesystem   {fstype}{' (read-only)' if readonly else ''}")
        print(f"  size         {_human(total)}")
        print(f"  free         {_human(free)}")
        largest = free
        memory = _cgroup_memory_left()
        if memory is not None:
            print(f"  memory left in this cgroup: {_human(memory)} (shared memory counts)")
            largest = min(largest, memory)
        largest -= largest % os.sysconf("SC_PAGE_SIZE")
        print(f"  largest array that fits: {_human(largest)} "
              f"({largest // 4:,} float32 elements)")
        records = segments(shm_dir)
        dead = [r for r in records if r["alive"] is False]
        print(f"  grain_shm segments: {len(records)}, "
              f"{_human(sum(r['size'] for r in records))}")
        queues = [r for r in records if r["queue"] is not None]
        print(f"  queues: {len(queues)}, {_human(sum(r['size'] for r in queues))}")
        if readonly:
            problems.append(f"{shm_dir} is mounted read-only")
            advice.append(f"remount it read-write: `mount -o remount,rw {shm_dir}`")
        else:
            why = _probe(shm_dir)
            if why:
                problems.append(why)
        if fstype not in ("tmpfs", "unknown"):
            advice.append(f"{shm_dir} is {fstype}, not tmpfs: segments go to disk")
        if total < SMALL_SHM:
            advice.append(
                f"{shm_dir} is small ({_human(total)}). In Docker: "
                "`docker run --shm-size=8g` (or `--ipc=host`); in Kubernetes: "
                "mount an `emptyDir: {medium: Memory, sizeLimit: 8Gi}` volume at "
                f"/dev/shm; elsewhere: `mount -o remount,size=8G {shm_dir}`"
            )
        if dead:
            advice.append(
                f"{len(dead)} segments of dead sessions hold "
                f"{_human(sum(r['size'] for r in dead))}: `python -m grain_shm gc`"
            )
    print("pool (recycled shared memory):")
    for line in _pool_lines():
        print(line)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print("limits:")
    print(f"  open files   {soft} (hard {hard}); grain_shm keeps no fd per array")
    if soft != resource.RLIM_INFINITY and soft < SMALL_NOFILE:
        advice.append(f"the open-file limit is {soft}: raise it for many workers (`ulimit -n 65536`)")
    max_map = _read_int("/proc/sys/vm/max_map_count")
    if max_map is not None:
        print(f"  vm.max_map_count {max_map}: at most ~{max_map:,} arrays mapped per process")
        if max_map < SMALL_MAP_COUNT:
            advice.append(
                f"vm.max_map_count is {max_map}: a process that maps more arrays "
                "fails with ENOMEM; `sysctl -w vm.max_map_count=262144`"
            )
    if _remove_ipc_on():
        advice.append(
            "systemd-logind removes this user's shared memory at their last "
            "logout (RemoveIPC=yes): set RemoveIPC=no in /etc/systemd/logind.conf "
            "or run jobs under a system user or as a systemd service"
        )
    for line in problems:
        print(f"PROBLEM: {line}")
    for line in advice:
        print(f"advice: {line}")
    if not problems and not advice:
        print("ok")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m grain_shm {argv[0]}")
    if argv[0] == "ls":
        parser.add_argument("--json", action="store_true", help="one JSON list of records")
        return cmd_ls(parser.parse_args(argv[1:]))
    if argv[0] == "gc":
        parser.add_argument("--dry-run", action="store_true", help="only say what would go")
        return cmd_gc(parser.parse_args(argv[1:]))
    if argv[0] == "doctor":
        return cmd_doctor(parser.parse_args(argv[1:]))
    raise SystemExit(f"unknown command {argv[0]!r}")
