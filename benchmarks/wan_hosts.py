"""Emulated hosts on one Linux machine: network namespaces joined through a bridge, links shaped with ``tc tbf``.

    with EmulatedHosts(hosts=2, rate_mbit=100) as net:
        subprocess.Popen(net.exec_prefix(0) + ["python", ...], env={..., "GLOO_SOCKET_IFNAME": net.ifname})

Each host is a namespace ``<tag>h<i>`` with one interface ``wan0`` (address ``169.254.77.<i+1>/24``, link-local, so
nothing is ever routed off the machine) whose veth peer sits on a bridge in the switch namespace ``<tag>sw``.
Ranks on the same host talk over the host's own address (the kernel keeps that local, unshaped); between hosts
traffic crosses two veths, each shaped on egress with a token bucket (``tbf``) at ``rate_mbit``, in both
directions. The kernel here has ``tbf`` but not ``netem``, so links are bandwidth-limited without added latency.
Everything is created inside fresh namespaces (nothing in the root namespace changes) and removed on exit,
including on errors, Ctrl-C and SIGTERM. Needs root, ``ip`` and ``tc``: :func:`unavailable` says why not.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import List, Optional

SUBNET = "169.254.77"


def unavailable() -> Optional[str]:
    """Why emulated hosts cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) not found"
    probe = f"dsxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


class EmulatedHosts:
    ifname = "wan0"

    def __init__(self, hosts: int, rate_mbit: Optional[float], tag: Optional[str] = None):
        self.hosts, self.rate_mbit = hosts, rate_mbit
        self.tag = tag or f"dsx{os.getpid() % 100000}"
        self.switch = f"{self.tag}sw"
        self.made: List[str] = []
        self._old_term = None

    def namespace(self, host: int) -> str:
        return f"{self.tag}h{host}"

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def exec_prefix(self, host: int) -> List[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def __enter__(self) -> "EmulatedHosts":
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _on_term(self, signum, frame):
        raise SystemExit(128 + signum)  # unwinds through __exit__, which removes everything

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h in range(self.hosts):
            ns, port = self.namespace(h), f"s{h}"
            self._add_ns(ns)
            _run("ip", "link", "add", self.ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                 self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(h)}/24", "dev", self.ifname)
            _run("ip", "-n", ns, "link", "set", self.ifname, "up")
            if self.rate_mbit:
                self._shape(ns, self.ifname)
                self._shape(self.switch, port)

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(32 * 1024, int(rate_bytes / 250))  # at least one timer tick of data at the rate
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
             f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "200ms")

    def tx_bytes(self, host: int) -> int:
        out = subprocess.run(self.exec_prefix(host) + ["cat", f"/sys/class/net/{self.ifname}/statistics/tx_bytes"],
                             capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    def remove(self) -> None:
        """Delete every namespace this object made (their veths and qdiscs go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None


def leftovers(tag_prefix: str = "dsx") -> List[str]:
    """Namespaces whose name starts with ``tag_prefix`` (what a test checks is empty afterwards)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag_prefix)]
