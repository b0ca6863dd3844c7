#!/usr/bin/env python
"""Run a command as N processes of one multi-host JAX job on this machine.

    python tools/launch_local.py --processes 2 --devices-per-process 4 -- rtlib train SPEC

Each process gets D fake CPU devices and the environment `jax.distributed` reads
(JAX_COORDINATOR_ADDRESS on 127.0.0.1, JAX_NUM_PROCESSES, JAX_PROCESS_ID), so `rtlib train`
starts as one host of an N-host job, exactly as on a TPU pod slice or a GPU cluster. Process 0
writes to this terminal; the others' lines are prefixed with `[process i]`.

If a process fails, the others are stopped (SIGTERM, then SIGKILL after --grace seconds) and the
launcher exits with the failed process's code; SIGINT/SIGTERM to the launcher are passed on to
every process. With --wait-for-all the others are left to notice by themselves (jax's heartbeat
stops them within `distributed.heartbeat_timeout_s`).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(i: int, n: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(n),
        "JAX_PROCESS_ID": str(i),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(devices),
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _relay(stream, prefix: str, out) -> None:
    """Copy a child's lines with a prefix; if our output is gone, keep draining so the child
    never blocks on a full pipe."""
    broken = False
    for line in iter(stream.readline, b""):
        if broken:
            continue
        try:
            out.buffer.write(prefix.encode() + line)
            out.flush()
        except (OSError, ValueError):
            broken = True


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s --processes N --devices-per-process D [options] -- COMMAND ...")
    parser.add_argument("--processes", type=int, required=True, help="processes (hosts)")
    parser.add_argument("--devices-per-process", type=int, required=True,
                        help="fake CPU devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a "
                        "free one)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds a process has to "
                        "exit after SIGTERM (e.g. to write its checkpoint) before SIGKILL")
    parser.add_argument("--wait-for-all", action="store_true", help="when one process fails, "
                        "do not stop the others")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: put it after `--`")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    port = args.port or free_port()
    procs: list[subprocess.Popen] = []
    relays = []
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum, frame):
        received.append((signum, time.monotonic()))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Before any child exists, so a signal while starting them is not lost.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    for i in range(args.processes):
        piped = i > 0
        try:
            # Own sessions: Ctrl-C in the terminal reaches the launcher only, which passes it
            # on once (a second SIGINT would make rtlib give up without its checkpoint).
            p = subprocess.Popen(command, env=child_env(i, args.processes,
                                                        args.devices_per_process, port),
                                 stdout=subprocess.PIPE if piped else None,
                                 stderr=subprocess.STDOUT if piped else None,
                                 start_new_session=True)
        except OSError as e:
            print(f"launch_local: cannot start {command[0]!r}: {e}", file=sys.stderr)
            _stop(procs, args.grace)
            return 127
        procs.append(p)
        if received:  # a signal arrived while starting: this child has not seen it
            p.send_signal(received[0][0])
        if piped:
            t = threading.Thread(target=_relay, args=(p.stdout, f"[process {i}] ", sys.stdout),
                                 daemon=True)
            t.start()
            relays.append(t)

    failed: tuple[int, int] | None = None
    while any(p.poll() is None for p in procs):
        if received and time.monotonic() - received[0][1] > args.grace:
            print(f"launch_local: processes still running {args.grace:.0f} s after the signal; "
                  "killing them", file=sys.stderr, flush=True)
            _stop(procs, 0)
        for i, p in enumerate(procs):
            code = p.poll()
            if code not in (None, 0) and failed is None and not received:
                failed = (i, code)
                print(f"launch_local: process {i} exited with code {code}"
                      + ("" if args.wait_for_all else "; stopping the others"),
                      file=sys.stderr, flush=True)
                if not args.wait_for_all:
                    _stop(procs, args.grace)
        time.sleep(0.1)
    for t in relays:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if received:
        return 128 + received[0][0]
    if failed is not None:
        print(f"launch_local: exit codes {codes}", file=sys.stderr)
        return failed[1] if failed[1] > 0 else 128 - failed[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
