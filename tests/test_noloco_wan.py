"""The emulated-host benchmark cleans up after itself: no namespace, link or qdisc is left behind, after a normal
run and after SIGTERM. Runs only as root with iproute2/tc and network namespaces (skipped otherwise, with why)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import wan_hosts  # noqa: E402

WHY = wan_hosts.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"emulated hosts unavailable: {WHY}")


def root_state():
    """What the benchmark must not change in the root namespace: links and qdiscs (and dsx namespaces)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip() for line in links.splitlines()), qdiscs, wan_hosts.leftovers()


# A normal run (2x2 hosts at 100 Mbit/s, every mode) leaving nothing behind is checked by the bench tier's
# test_benchmark_smoke[noloco_wan] (tests/test_benchmarks_smoke.py), which runs this benchmark at its --smoke size.


def test_sigterm_inside_the_hosts_removes_them():
    before = root_state()
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "import wan_hosts\n"
        "with wan_hosts.EmulatedHosts(3, 20, tag='dsxterm'):\n"
        "    print('up', flush=True); time.sleep(60)\n") % str(ROOT / "benchmarks")],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "up"
    assert len(wan_hosts.leftovers("dsxterm")) == 4  # 3 hosts + the switch exist while it runs
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=30)
    time.sleep(0.2)
    assert wan_hosts.leftovers("dsxterm") == [] and root_state() == before
