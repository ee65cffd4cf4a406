"""Runs Synapse in this process and exits when the parent (the test) dies.

Usage: run_synapse.py CONFIG_PATH

The test harness kills Synapse when a test ends; this watchdog also ends it
if the test process itself is killed, so no Synapse outlives its test run.
"""

import os
import sys
import threading
import time


def watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def main() -> None:
    config = sys.argv[1]
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    from synapse.app import homeserver

    sys.argv = ["synapse", "-c", config]
    homeserver.main()


if __name__ == "__main__":
    main()
