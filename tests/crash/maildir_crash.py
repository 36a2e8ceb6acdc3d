#!/usr/bin/env python3
"""Crash test: maildir delivery while the server is killed with SIGKILL and restarted.

Goal: every message whose delivery was acknowledged (fsync of the file, rename into new/,
fsync of new/ all returned) is present and intact after any number of server crashes, and the
writers see only a stall, never an error.

Method: WRITERS processes deliver messages into one maildir on a braid mount. After each
acknowledged delivery a writer appends the name, length and SHA-256 to its oracle file on
local disk. Meanwhile the server is killed with SIGKILL KILLS times at random moments and
restarted on the same port, data and state directories. Then the writers stop and every oracle
entry is checked through the mount and in the export directory.

usage: maildir_crash.py BRAID_BINARY WORKDIR
env: WRITERS (4), KILLS (5), SEED (random; printed for replay)
"""
import hashlib
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

from crashlib import is_mount, start_server, wait_for


def body_for(name, rng):
    size = rng.randint(2048, 32768)
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def writer(index, maildir, oracle_path, stop, errors):
    rng = random.Random(index)
    tmp, new = os.path.join(maildir, "tmp"), os.path.join(maildir, "new")
    new_fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    with open(oracle_path, "a") as oracle:
        n = 0
        while not stop.is_set():
            name = f"{index}-{n}"
            body = body_for(name, rng)
            try:
                fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, body)
                os.fsync(fd)
                os.close(fd)
                os.rename(os.path.join(tmp, name), os.path.join(new, name))
                os.fsync(new_fd)
            except OSError as e:
                errors.put(f"writer {index} message {name}: {e}")
                return
            oracle.write(f"{name} {len(body)} {hashlib.sha256(body).hexdigest()}\n")
            oracle.flush()
            n += 1


def check(root, oracle_lines):
    bad = []
    for line in oracle_lines:
        name, size, digest = line.split()
        path = os.path.join(root, "Maildir", "new", name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            bad.append(f"{path}: {e}")
            continue
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != digest:
            bad.append(f"{path}: {len(data)} bytes, content differs from what was acknowledged")
    return bad


def main():
    braid, work = sys.argv[1], os.path.abspath(sys.argv[2])
    writers = int(os.environ.get("WRITERS", "4"))
    kills = int(os.environ.get("KILLS", "5"))
    seed = int(os.environ.get("SEED", str(random.randrange(1 << 30))))
    print(f"crash test: {writers} writers, {kills} kills, SEED={seed}", flush=True)
    rng = random.Random(seed)
    export, state, mnt = (os.path.join(work, d) for d in ("export", "state", "mnt"))
    for d in (export, mnt):
        os.makedirs(d, exist_ok=True)
    serve = [braid, "serve", "--data", export, "--state", state, "--insecure", "--no-root-squash", "--lease", "1"]
    server_log = os.path.join(work, "server.log")
    server, port = start_server(serve, server_log)
    addr = f"127.0.0.1:{port}"

    def restart_server():
        return start_server(serve, server_log, port)[0]

    client = subprocess.Popen([braid, "mount", addr, mnt, "--foreground", "--insecure", "--log-file", os.path.join(work, "client.log")])
    mounted = False
    try:
        wait_for("mount", lambda: is_mount(mnt))
        mounted = True
        maildir = os.path.join(mnt, "Maildir")
        for d in ("tmp", "new"):
            os.makedirs(os.path.join(maildir, d))
        stop, errors = mp.Event(), mp.Queue()
        oracles = [os.path.join(work, f"oracle.{i}") for i in range(writers)]
        procs = [mp.Process(target=writer, args=(i, maildir, oracles[i], stop, errors)) for i in range(writers)]
        for p in procs:
            p.start()
        for k in range(kills):
            time.sleep(rng.uniform(0.5, 2.0))
            server.send_signal(signal.SIGKILL)
            server.wait()
            time.sleep(rng.uniform(0.0, 0.5))
            server = restart_server()
            print(f"  kill {k + 1}: server killed and restarted", flush=True)
        time.sleep(1.0)
        stop.set()
        for p in procs:
            p.join(timeout=60)
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        failures += [f"writer {i} exit code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
        lines = [line for o in oracles if os.path.exists(o) for line in open(o)]
        # Kill once more after the last acknowledgement, so that what is checked is what
        # survived a crash, not what a live server still had in memory.
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = restart_server()
        failures += check(mnt, lines)
        failures += check(export, lines)
        print(f"  {len(lines)} acknowledged messages checked through the mount and in the export", flush=True)
        if len(lines) < writers * kills:
            failures.append(f"only {len(lines)} messages delivered: the writers were mostly stalled")
        if failures:
            print("FAIL:\n  " + "\n  ".join(failures[:20]), flush=True)
            return 1
        print("PASS: every acknowledged message is present and intact; writers saw no error", flush=True)
        return 0
    finally:
        if mounted:
            subprocess.run(["fusermount3", "-u", mnt], check=False)
        client.kill()
        server.kill()


if __name__ == "__main__":
    sys.exit(main())
