"""Airlock runner entrypoint: PID 1 of every task container.

Runs the task command with the container's (non-root) user, passes signals on to it, keeps
its exit code, and after it ends hands the files under /workspace/output back to the
orchestrator as one framed line on stdout. Standard library only: the image stays small.
"""

import base64
import json
import os
import signal
import stat
import subprocess
import sys

OUTPUT_DIR = "/workspace/output"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def read_capped(path, budget):
    """Read at most `budget` bytes of a regular file without following links."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, 0
        size = info.st_size
        chunks, left = [], budget
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), size
    finally:
        os.close(fd)


def collect_output(directory, max_bytes):
    """Describe the output files, their contents capped at `max_bytes` in total."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    files, budget = [], max_bytes
    for name in names:
        try:
            data, size = read_capped(os.path.join(directory, name), budget)
        except OSError:
            continue
        if data is None:
            continue
        budget -= len(data)
        files.append(
            {
                "name": name,
                "size": size,
                "truncated": len(data) < size,
                "data": base64.b64encode(data).decode("ascii"),
            }
        )
    return files


def run(argv, env):
    try:
        child = subprocess.Popen(argv, env=env, close_fds=True)
    except FileNotFoundError:
        print(f"airlock-runner: command not found: {argv[0]}", file=sys.stderr, flush=True)
        return 127
    except PermissionError:
        print(f"airlock-runner: permission denied: {argv[0]}", file=sys.stderr, flush=True)
        return 126

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def main(argv):
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("airlock-runner: no command given", file=sys.stderr, flush=True)
        return 2
    env = dict(os.environ)
    marker = env.pop("AIRLOCK_RESULT_MARKER", "")
    max_bytes = int(env.pop("AIRLOCK_OUTPUT_MAX_BYTES", "1048576"))
    try:
        os.makedirs(OUTPUT_DIR, exist_ok=True)
    except OSError:
        pass
    code = run(argv, env)
    if marker:
        frame = {"exit_code": code, "files": collect_output(OUTPUT_DIR, max_bytes)}
        sys.stdout.flush()
        # The frame starts with an ASCII record separator and a per-task nonce, so that the
        # orchestrator can tell it from whatever the command printed.
        os.write(1, f"\x1e{marker} {json.dumps(frame, separators=(',', ':'))}\n".encode())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
