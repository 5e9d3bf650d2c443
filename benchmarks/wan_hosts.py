"""Emulated hosts on one Linux machine: network namespaces joined through a bridge, links optionally shaped (``tc``).

    with EmulatedHosts(hosts=2, rate_mbit=100) as net:
        subprocess.Popen(net.exec_prefix(0) + ["python", ...], env={..., "GLOO_SOCKET_IFNAME": net.ifname})

Each host ``i`` is a namespace ``<tag>h<i>`` with one interface ``ifname`` (address ``169.254.77.<i+1>/24``,
link-local, so nothing is ever routed off the machine) whose veth peer sits on a bridge in the switch namespace
``<tag>sw``. A host has its own hostname (``hostname(i)``, set in a fresh UTS namespace by :meth:`exec_prefix`) and
its own hosts file naming every host (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` bind-mounts over
``/etc/hosts``). ``second_address=True`` gives each host a second NIC (``ifname`` with its digit 1: ``eth1``, on a
second bridge) with address ``169.254.78.<i+1>/24``, which its hostname does not resolve to (a cluster node's fast
network). A second NIC rather than a second address on the first: Open MPI's TCP transport knows one address per
interface and drops connections from the other. ``pin=True`` runs host ``i``'s commands
on core ``i mod cores`` (emulated hosts share the machine's cores; pinned, each host's processes see one core).
:meth:`write_ssh` writes an ``ssh`` stand-in that runs a command on a host's namespace, for launchers that ssh
(Open MPI's ``plm_rsh_agent``, DeepSpeed's runner).

Ranks on the same host talk over the host's own address (the kernel keeps that local, unshaped); with
``rate_mbit``, traffic between hosts crosses two veths, each shaped on egress with a token bucket (``tbf``) at
``rate_mbit``, in both directions. The kernel here has ``tbf`` but not ``netem``, so links are bandwidth-limited
without added latency. Nothing in the root namespace changes except ``/etc/netns/<ns>/``; everything is removed on
exit, including on errors, Ctrl-C and SIGTERM: processes still running in a namespace are killed first (a live
process would keep its namespace, veth and qdisc alive after the name is gone). :func:`sweep_stale` removes what a
SIGKILLed owner left. Needs root, ``ip``, ``unshare`` and ``tc``: :func:`unavailable` says why not.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
from typing import List, Optional

SUBNET = "169.254.77"
SUBNET2 = "169.254.78"  # the second NICs' network
NETNS_ETC = "/etc/netns"
LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> Optional[str]:
    """Why emulated hosts cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2/util-linux) not found"
    probe = f"dsxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        uts = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "hostname", "probe"],
                             capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if uts.returncode != 0:
        return f"cannot set a hostname in a UTS namespace: {uts.stderr.strip()}"
    return None


def _run(*cmd: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def _kill_all(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _kill_and_delete(ns: str) -> None:
    """SIGKILL every process in ``ns``, delete it and its /etc/netns entry."""
    _kill_all(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)


class EmulatedHosts:
    def __init__(self, hosts: int, rate_mbit: Optional[float] = None, tag: Optional[str] = None,
                 ifname: str = "wan0", second_address: bool = False, pin: bool = False):
        self.hosts, self.rate_mbit, self.ifname = hosts, rate_mbit, ifname
        self.second, self.pin = second_address, pin
        self.ifname2 = ifname.rstrip("0123456789") + "1"
        self.tag = tag or f"dsx{os.getpid()}"
        self.switch = f"{self.tag}sw"
        self.made: List[str] = []
        self._made_etc = False
        self._old_term = None

    def namespace(self, host: int) -> str:
        return f"{self.tag}h{host}"

    def hostname(self, host: int) -> str:
        return f"host{host}"

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def second_address(self, host: int) -> str:
        assert self.second, "EmulatedHosts(second_address=True) adds the second addresses"
        return f"{SUBNET2}.{host + 1}"

    def cpus(self, host: int) -> str:
        return str(host % (os.cpu_count() or 1))

    def exec_prefix(self, host: int) -> List[str]:
        """Argv prefix that runs a command on ``host``: its namespace and hosts file, its hostname, its core."""
        pin = f"taskset -c {self.cpus(host)} " if self.pin else ""
        return ["ip", "netns", "exec", self.namespace(host), "unshare", "--uts", "sh", "-c",
                f'hostname "$0" && exec {pin}"$@"', self.hostname(host)]

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost"] + [f"{self.address(h)} {self.hostname(h)}" for h in range(self.hosts)]
        return "\n".join(lines) + "\n"

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
        """Remove everything now, then let SIGTERM do what it did before (by default: end the process). Removing
        here, not by unwinding, because a caller may catch the unwinding exception (pytest fails one test and goes
        on)."""
        old = self._old_term
        self.remove()
        if callable(old):
            old(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        for bridge in ("br0", "br1") if self.second else ("br0",):
            _run("ip", "-n", self.switch, "link", "add", bridge, "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", bridge, "up")
        if not os.path.isdir(NETNS_ETC):
            os.makedirs(NETNS_ETC)
            self._made_etc = True
        for h in range(self.hosts):
            ns, port = self.namespace(h), f"s{h}"
            self._add_ns(ns)
            os.makedirs(os.path.join(NETNS_ETC, ns))
            with open(os.path.join(NETNS_ETC, ns, "hosts"), "w") as f:
                f.write(self.hosts_file())
            _run("ip", "link", "add", self.ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                 self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(h)}/24", "dev", self.ifname)
            _run("ip", "-n", ns, "link", "set", self.ifname, "up")
            if self.second:
                self._add_nic(ns, self.ifname2, f"t{h}", "br1", self.second_address(h))
            if self.rate_mbit:
                self._shape(ns, self.ifname)
                self._shape(self.switch, port)

    def _add_nic(self, ns: str, dev: str, port: str, bridge: str, address: str) -> None:
        _run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch)
        _run("ip", "-n", self.switch, "link", "set", port, "master", bridge)
        _run("ip", "-n", self.switch, "link", "set", port, "up")
        _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
        _run("ip", "-n", ns, "link", "set", dev, "up")

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(32 * 1024, int(rate_bytes / 250))  # at least one timer tick of data at the rate
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
             f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "200ms")

    def tx_bytes(self, host: int) -> int:
        out = subprocess.run(["ip", "netns", "exec", self.namespace(host), "cat",
                              f"/sys/class/net/{self.ifname}/statistics/tx_bytes"], capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    def write_ssh(self, directory: str, log: Optional[str] = None) -> str:
        """Write ``directory/ssh``: ``ssh [options] HOST CMD...`` runs ``sh -c "CMD..."`` on HOST (a hostname or
        address of these hosts) the way ssh would: in HOST's namespace, hostname and core, with a login
        environment (PATH, HOME, USER; nothing of the caller's), the arguments joined by spaces. ``log``: a file
        that gets one line ``HOST CMD...`` per call. Returns the path."""
        cases = []
        for h in range(self.hosts):
            names = [self.hostname(h), self.address(h)] + ([self.second_address(h)] if self.second else [])
            pin = f"taskset -c {self.cpus(h)} " if self.pin else ""
            cases.append(f"  {'|'.join(names)}) exec ip netns exec {self.namespace(h)} unshare --uts env -i "
                         f"PATH={LOGIN_PATH} HOME=\"$HOME\" USER=\"$(id -un)\" sh -c "
                         f"'hostname \"$1\" && exec {pin}sh -c \"$0\"' \"$*\" {self.hostname(h)} ;;")
        script = SSH_TEMPLATE.format(log=f'echo "$host $*" >> {log}' if log else ":", cases="\n".join(cases))
        path = os.path.join(directory, "ssh")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def kill_processes(self) -> None:
        """SIGKILL every process running on the hosts (a launcher's workers may sit in their own sessions)."""
        for ns in self.made:
            _kill_all(ns)

    def remove(self) -> None:
        """Kill what still runs in the namespaces this object made, delete them (their veths and qdiscs go with
        them) and their /etc/netns entries."""
        for ns in reversed(self.made):
            _kill_and_delete(ns)
        self.made.clear()
        if self._made_etc and os.path.isdir(NETNS_ETC) and not os.listdir(NETNS_ETC):
            os.rmdir(NETNS_ETC)
        self._made_etc = False
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None


SSH_TEMPLATE = """#!/bin/sh
# ssh stand-in for emulated hosts (benchmarks/wan_hosts.py): ssh [options] HOST COMMAND...
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host=$1; shift
[ $# -gt 0 ] || {{ echo "ssh stand-in: no command given" >&2; exit 255; }}
{log}
case "$host" in
{cases}
  *) echo "ssh: Could not resolve hostname $host: Name or service not known" >&2; exit 255 ;;
esac
"""


def leftovers(tag_prefix: str = "dsx") -> List[str]:
    """Namespaces whose name starts with ``tag_prefix`` (a test checks none are left; :func:`netns_files` for the
    hosts files)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag_prefix)]


def netns_files(tag_prefix: str = "dsx") -> List[str]:
    """/etc/netns entries whose name starts with ``tag_prefix``."""
    etc = sorted(os.listdir(NETNS_ETC)) if os.path.isdir(NETNS_ETC) else []
    return [os.path.join(NETNS_ETC, e) for e in etc if e.startswith(tag_prefix)]


def sweep_stale(tag_prefix: str) -> List[str]:
    """Remove namespaces named ``<tag_prefix><pid>...`` whose owner ``pid`` is gone (SIGKILLed, so its exit
    handler never ran). Returns what was removed."""
    pattern = re.compile(re.escape(tag_prefix) + r"(\d+)(sw|h\d+)$")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    etc = os.listdir(NETNS_ETC) if os.path.isdir(NETNS_ETC) else []
    removed = []
    for ns in sorted({line.split()[0] for line in out.splitlines() if line.strip()} | set(etc)):
        match = pattern.match(ns)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _kill_and_delete(ns)
            removed.append(ns)
    return removed
