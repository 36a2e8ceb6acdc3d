"""Helpers shared by the crash tests: waiting for a server and a mount to come up."""
import subprocess
import time


def wait_for(what, predicate, deadline_s=20.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise SystemExit(f"FAIL: timed out waiting for {what}")


def is_mount(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def start_server(argv, log_path, port=0):
    """Starts `braid serve` (argv without --listen) on 127.0.0.1:port, port 0 for a free one,
    appending its output to log_path; returns the process and the port it listens on.

    Ready is when its own log says "serving ... listen=ADDR": a connect to the port could reach
    another process's server, and a port picked by binding 0 and closing can be taken by
    another test before this server binds it."""
    with open(log_path, "ab") as log:
        start = log.tell()
        proc = subprocess.Popen(argv + ["--listen", f"127.0.0.1:{port}"], stdout=log, stderr=log)
    listening = []

    def serving():
        with open(log_path, "rb") as f:
            f.seek(start)
            fields = f.read().decode(errors="replace").split()
        listening[:] = [f.split("=", 1)[1] for f in fields if f.startswith("listen=")]
        if not listening and proc.poll() is not None:
            raise SystemExit(f"FAIL: braid serve exited ({proc.returncode}) before listening; see {log_path}")
        return bool(listening)

    wait_for("braid serve to listen", serving)
    bound = int(listening[0].rsplit(":", 1)[1])
    assert port in (0, bound), f"braid serve listens on {listening[0]}, not on port {port}"
    return proc, bound
