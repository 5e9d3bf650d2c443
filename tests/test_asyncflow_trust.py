"""What an async GRPO run exposes to the network, seen from another network namespace (an "attacker" host joined to
this machine by a veth pair).

* A real run (``ds-ext``, trainer + rollout worker, our decoders): while it lives, ``ss -ltnp`` lists every socket
  its processes listen on; none is on 0.0.0.0 / :: / *, and a connection from the other namespace to each of those
  ports, at this machine's address on the shared link, is refused. After it ends: no process, port or secret file is
  left.
* The hub bound to the shared link's address (as across nodes): from the other namespace, a connection without the
  secret that sends a pickle frame whose unpickling would create a marker file is refused, and the file never
  appears.

Root only (network namespaces); skipped with the reason otherwise.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NS = f"dsxaf{os.getpid() % 100000}"
HOST, PEER = "10.213.77.1", "10.213.77.2"

PROBE = r"""
import json, pickle, socket, struct, sys
host, ports, marker = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]

class Boom:
    def __reduce__(self):
        import os
        return os.system, ("touch " + marker,)

frame = pickle.dumps(Boom())
frame = struct.pack("!i", len(frame)) + frame
out = {}
for port in ports:
    try:
        s = socket.create_connection((host, port), timeout=3)
    except OSError as exc:
        out[port] = "refused: " + type(exc).__name__
        continue
    try:
        s.settimeout(3)
        s.sendall(frame * 3)  # before, instead of and after the handshake's answer
        s.recv(64)
        rest = s.recv(64)
        out[port] = "closed" if rest == b"" else "answered"
    except OSError as exc:
        out[port] = "closed: " + type(exc).__name__
print(json.dumps(out))
"""


def _can_netns():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("ss") is None:
        return "needs root, ip and ss"
    return None


@pytest.fixture()
def attacker():
    why = _can_netns()
    if why:
        pytest.skip(why)
    veth = f"{NS}r"
    cmds = [["ip", "netns", "add", NS], ["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{NS}p"],
            ["ip", "link", "set", f"{NS}p", "netns", NS], ["ip", "addr", "add", f"{HOST}/24", "dev", veth],
            ["ip", "link", "set", veth, "up"], ["ip", "-n", NS, "addr", "add", f"{PEER}/24", "dev", f"{NS}p"],
            ["ip", "-n", NS, "link", "set", f"{NS}p", "up"], ["ip", "-n", NS, "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield NS
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def probe(ports, marker, host=HOST) -> dict:
    out = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", PROBE, host, json.dumps(ports),
                          str(marker)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {int(k): v for k, v in json.loads(out.stdout).items()}


def session_pids(sid: int) -> set:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return {int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid}


def listening(pids: set) -> list:
    """(local address, port) of every TCP listener of ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[3]
            addr, port = local.rsplit(":", 1)
            found.append((addr, int(port)))
    return found


def test_a_run_listens_on_loopback_only_and_refuses_the_other_namespace(attacker, tmp_path):
    config = json.loads((ROOT / "configs" / "grpo_async.json").read_text())
    config.pop("csv_monitor")
    config["train_micro_batch_size_per_gpu"] = 16
    config["ds_ext"]["asyncflow"].update(max_staleness=1, group_size=4, groups_per_step=4, max_new_tokens=4)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the run's secret file lands here, and must be gone after
    env.pop("DS_EXT_RUN_SECRET_FILE", None)
    cmd = [sys.executable, "-m", "ds_ext.launch", "--num_procs", "2", "--master_port", str(port),
           "--config", str(tmp_path / "cfg.json"), str(ROOT / "examples" / "grpo.py"), "--steps", "40",
           "--sft_steps", "0", "--hidden", "32", "--layers", "1", "--plot", str(tmp_path / "reward.png")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen, pids = [], set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            pids = session_pids(proc.pid)
            seen = listening(pids)
            if any(p == port + 3 for _, p in seen):  # the hub (MASTER_PORT + 3): the run is training and generating
                break
            time.sleep(0.2)
        assert any(p == port + 3 for _, p in seen), (seen, (tmp_path / "log").read_text()[-3000:])
        assert list(tmp_path.glob("ds_ext_run_*/secret")), "ds-ext made no secret file"
        print("listening:", seen)
        wildcard = [(a, p) for a, p in seen if a in ("0.0.0.0", "*", "[::]", "::")]
        assert not wildcard, f"listening on all interfaces: {wildcard}"
        marker = tmp_path / "unpickled"
        answers = probe(sorted({p for _, p in seen}), marker)
        assert all(v.startswith("refused") for v in answers.values()), answers
        assert not marker.exists()
        assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(1)
    assert not session_pids(proc.pid), "a process of the run outlived it"
    assert not listening(pids), "a port of the run is still open"
    assert not list(tmp_path.glob("ds_ext_run_*")), "the secret file was left behind"


def test_the_hub_on_a_shared_link_refuses_a_forged_frame_without_unpickling(attacker, tmp_path, monkeypatch):
    from ds_ext.asyncflow import transport
    from ds_ext.asyncflow.config import AsyncFlowConfig
    from ds_ext.asyncflow.queue import TransferQueue
    from ds_ext.asyncflow.remote import RolloutHub
    monkeypatch.setenv(transport.SECRET_FILE_ENV, transport.make_secret_file(str(tmp_path)))
    cfg = AsyncFlowConfig(group_size=2, groups_per_step=1)
    hub = RolloutHub(TransferQueue(2, 1), cfg, ["rollout1"], HOST, 0, transport.run_secret())
    marker = tmp_path / "unpickled"
    try:
        answers = probe([hub.listener.port], marker)
        assert answers[hub.listener.port].startswith("closed"), answers  # reachable, then cut off
        time.sleep(0.3)
        assert hub.listener.refused == 1 and not marker.exists()
        assert not hub.workers["rollout1"].connected.is_set()
    finally:
        hub.close()
