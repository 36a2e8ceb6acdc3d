#!/usr/bin/env python3
"""Power-cut test: what fsync acknowledged survives a crash of the server's machine, and an
fsync of a change the crash undid fails (EIO) instead of succeeding.

Method: the server's export and state live on an ext4 file system on a loop device with direct
I/O, so whatever the file system sent to its device is in the image file at once. A power cut
is emulated by killing the server with SIGKILL and copying the image at that instant: the copy
holds what reached the device and nothing of what was only in the page cache, as after a real
cut. (The file system is mounted with commit=600 and the server runs with a long
--commit-interval, so within the test nothing reaches the device but the server's own flushes
for fsync.) The copy is then mounted in place of the original, the boot id recorded in the
server's state is changed (a real cut reboots the machine, and the boot id is how the server
tells a reboot from a crash of the process alone), and the server is started again on the same
port. The client mount stays up throughout, and the files written but not fsynced stay open.

Checks, after the restart:
  1. every file whose fsync returned before the cut is there with its content, in the export
     and through the mount, and an fsync of it still succeeds;
  2. the files written and applied by the server but not fsynced are gone from the export
     (else the emulation cut nothing and the test says so);
  3. an fsync of each of those fails with EIO: it never succeeds while the data is missing;
  4. the mount lists what the export holds.

usage: power_cut.py BRAID_BINARY WORKDIR   (root: losetup, mount)
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

from crashlib import is_mount, start_server, wait_for

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def run(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def attach_and_mount(image, at):
    device = run("losetup", "-f", "--show", "--direct-io=on", image)
    run("mount", "-o", "commit=600", device, at)
    return device


def unmount_and_detach(at, device):
    subprocess.run(["umount", at], check=False)
    subprocess.run(["losetup", "-d", device], check=False)


def content(name, version):
    return (f"{name} version {version}\n" * 500).encode()


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e


def write_file(path, data, sync):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    if sync:
        os.fsync(fd)
    return fd


def pretend_the_machine_rebooted(state):
    """The server tells a reboot by the boot id it recorded at start: change that record."""
    path = os.path.join(state, "instances")
    boot = open(BOOT_ID).read().strip().encode()
    recorded = open(path, "rb").read()
    if boot not in recorded:
        raise SystemExit(f"FAIL: {path} does not hold this boot's id; the test needs updating")
    other = boot[:-1] + (b"0" if boot[-1:] != b"0" else b"1")
    with open(path, "wb") as f:
        f.write(recorded.replace(boot, other))


def main():
    braid, work = sys.argv[1], os.path.abspath(sys.argv[2])
    image, cut_image = os.path.join(work, "disk.img"), os.path.join(work, "cut.img")
    fs, mnt = os.path.join(work, "fs"), os.path.join(work, "mnt")
    export, state = os.path.join(fs, "export"), os.path.join(fs, "state")
    for d in (fs, mnt):
        os.makedirs(d, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    run("mkfs.ext4", "-q", "-F", image)
    device = attach_and_mount(image, fs)
    os.makedirs(export)
    serve = [braid, "serve", "--data", export, "--state", state, "--insecure", "--no-root-squash",
             "--lease", "1", "--commit-interval", "600"]
    server_log = os.path.join(work, "server.log")
    server, port = start_server(serve, server_log)
    addr = f"127.0.0.1:{port}"
    client = subprocess.Popen([braid, "mount", addr, mnt, "--foreground", "--insecure", "--log-file", os.path.join(work, "client.log")])
    mounted, failures, open_fds = False, [], []
    try:
        wait_for("mount", lambda: is_mount(mnt))
        mounted = True
        # Acknowledged: written and fsynced (files and their directory).
        os.mkdir(os.path.join(mnt, "mail"))
        acked = {f"acked-{i}": content(f"acked-{i}", 1) for i in range(10)}
        acked["overwritten"] = content("overwritten", 1)
        for name, data in acked.items():
            os.close(write_file(os.path.join(mnt, "mail", name), data, sync=True))
        dir_fd = os.open(os.path.join(mnt, "mail"), os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        kept_fd = os.open(os.path.join(mnt, "mail", "acked-0"), os.O_RDONLY)
        open_fds.append(kept_fd)
        # The server syncs its durable mark once no commit follows for a moment; that sync may
        # carry whatever is applied by then to disk. Let it pass, so that what follows is
        # applied and not durable.
        time.sleep(0.3)

        # Not acknowledged: new files, a new directory, an overwrite; kept open for their fsync.
        os.mkdir(os.path.join(mnt, "later"))
        pending = {f"mail/pending-{i}": content(f"pending-{i}", 1) for i in range(5)}
        pending.update({f"later/pending-{i}": content(f"later-{i}", 1) for i in range(5)})
        pending["mail/overwritten"] = content("overwritten", 2)
        pending_fds = {name: write_file(os.path.join(mnt, name), data, sync=False) for name, data in pending.items()}
        open_fds += pending_fds.values()
        # The client ships them in the background; once the export shows them, the server has
        # applied them (and its replies are on their way: give them a moment).
        wait_for("the server to apply the unsynced writes",
                 lambda: all(read(os.path.join(export, n)) == d for n, d in pending.items()), deadline_s=30)
        time.sleep(0.5)

        # The cut.
        server.send_signal(signal.SIGKILL)
        server.wait()
        shutil.copyfile(image, cut_image)
        unmount_and_detach(fs, device)
        os.remove(image)
        device = attach_and_mount(cut_image, fs)
        pretend_the_machine_rebooted(state)
        server = start_server(serve, server_log, port)[0]
        print("  power cut emulated: server restarted on what had reached the disk", flush=True)

        # 1. What fsync acknowledged survived (or what overwrote it, if that survived too).
        for name, data in acked.items():
            later = pending.get(f"mail/{name}")
            for root in (export, mnt):
                if read(os.path.join(root, "mail", name)) not in (data, later):
                    failures.append(f"acknowledged {root}/mail/{name} is missing or differs after the cut")
        try:
            os.fsync(kept_fd)
        except OSError as e:
            failures.append(f"fsync of acknowledged, unchanged mail/acked-0 failed after the cut: {e}")
        # 2. The emulation undid what was not acknowledged.
        survived = [n for n, d in pending.items() if read(os.path.join(export, n)) == d]
        if len(survived) == len(pending):
            failures.append("every unsynced write survived the cut: the emulation cut nothing, the test proves nothing")
        # 3. Their fsync fails rather than acknowledging data that is not on the server.
        for name, fd in pending_fds.items():
            try:
                os.fsync(fd)
                if name not in survived:
                    failures.append(f"fsync of {name} succeeded after the cut, but the server does not have its data")
            except OSError as e:
                if e.errno != errno.EIO:
                    failures.append(f"fsync of {name} after the cut: {e} (expected EIO)")
        # 4. The mount shows what the server has.
        for d in ("mail",):
            seen, there = sorted(os.listdir(os.path.join(mnt, d))), sorted(os.listdir(os.path.join(export, d)))
            if seen != there:
                failures.append(f"{d}: the mount lists {seen}, the export holds {there}")
        print(f"  {len(acked)} acknowledged files checked; {len(pending) - len(survived)} of {len(pending)} unsynced "
              f"writes undone by the cut, their fsync checked", flush=True)
        if failures:
            print("FAIL:\n  " + "\n  ".join(failures), flush=True)
            return 1
        print("PASS: acknowledged data survived the power cut; fsync of undone changes failed with EIO", flush=True)
        return 0
    finally:
        for fd in open_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if mounted and subprocess.run(["fusermount3", "-u", mnt], check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)
        client.kill()
        server.kill()
        server.wait()
        unmount_and_detach(fs, device)


if __name__ == "__main__":
    sys.exit(main())
