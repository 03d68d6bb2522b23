"""Run a VM and take snapshots at points its console output marks, without
the control API (tests, benchmarks):

    python -m vmm.testing.snapshooter \\
        --step wait:"/ # " --step snap:Full:vm.state:vm.mem --step stop \\
        -- --drive file=root.img --track-dirty-pages

Steps run in order on a helper thread while the machine runs:
  wait:TEXT          until TEXT appears on the console (after the last match)
  type:TEXT          send TEXT to the serial console (\\n = Enter)
  sleep:SECONDS
  snap:TYPE:STATE:MEM  pause, snapshot (Full or Diff), resume; after a
                     `pause` step it stays paused (the console then ends
                     exactly where the snapshot is: a `stop` next prints
                     nothing more)
  pause / resume
  stop               end the VM (exit status 0)
Arguments after `--` are `pyvmm run` options, or `restore` and `pyvmm
restore` options (the VM then starts from a snapshot).  Console output goes to
stdout; a JSON line per snapshot (its figures) goes to stderr, prefixed
"snapshooter:".
"""
import argparse
import json
import os
import sys
import threading
import time


class Tee:
    """The UART's output file: passes bytes on and lets a step wait for text."""

    def __init__(self, out):
        self.out = out
        self.buf = b""
        self.pos = 0
        self.cond = threading.Condition()

    def write(self, data):
        self.out.write(data)
        with self.cond:
            self.buf += data
            if len(self.buf) > (1 << 20):
                cut = len(self.buf) - (1 << 19)
                self.buf, self.pos = self.buf[cut:], max(0, self.pos - cut)
            self.cond.notify_all()
        return len(data)

    def flush(self):
        self.out.flush()

    def close(self):
        pass

    def wait(self, text, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                i = self.buf.find(text, self.pos)
                if i >= 0:
                    self.pos = i + len(text)
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)


def run_steps(machine, tee, steps, timeout):
    from vmm import snapshot
    try:
        for step in steps:
            kind, _, arg = step.partition(":")
            if kind == "wait":
                if not tee.wait(arg.encode(), timeout):
                    raise RuntimeError(f"timed out waiting for {arg!r}")
            elif kind == "type":
                data = arg.replace("\\n", "\r").encode()
                while data:
                    room = machine.serial.rx_space()
                    machine.serial.receive(data[:room])
                    data = data[room:]
                    if data:
                        time.sleep(0.01)
            elif kind == "sleep":
                time.sleep(float(arg))
            elif kind == "snap":
                typ, state, mem = arg.split(":", 2)
                was_paused = machine.paused
                t0 = time.monotonic()
                machine.pause()
                t1 = time.monotonic()
                figures = snapshot.create(machine, state, mem, typ)
                figures["pause_seconds"] = t1 - t0
                if not was_paused:
                    machine.resume()
                print("snapshooter: " + json.dumps(figures), file=sys.stderr, flush=True)
            elif kind == "pause":
                machine.pause()
            elif kind == "resume":
                machine.resume()
            elif kind == "stop":
                machine.stop("quit", "snapshooter done")
                return
            else:
                raise RuntimeError(f"unknown step {step!r}")
    except Exception as e:
        print(f"snapshooter: error: {e}", file=sys.stderr, flush=True)
        machine.stop("error", str(e))


def main(argv=None):
    from vmm import cli
    from vmm.machine import Machine
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        own, run_args = argv[:i], argv[i + 1:]
    else:
        own, run_args = argv, []
    p = argparse.ArgumentParser(prog="snapshooter")
    p.add_argument("--step", action="append", default=[])
    p.add_argument("--step-timeout", type=float, default=600)
    a = p.parse_args(own)
    if run_args[:1] == ["restore"]:     # start from a snapshot instead of booting
        args = cli.build_parser().parse_args(run_args)
        config = cli.restore_config(args)
    else:
        args = cli.build_parser().parse_args(["run", *run_args])
        config = cli.config_from_args(args)
    tee = Tee(os.fdopen(os.dup(1), "wb", buffering=0))
    config.serial_out = tee
    machine = Machine(config)
    try:
        t = threading.Thread(target=run_steps, args=(machine, tee, a.step, a.step_timeout),
                             daemon=True)
        t.start()
        status = machine.run()
    finally:
        machine.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
