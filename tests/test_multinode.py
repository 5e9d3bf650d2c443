"""Multi-node launches on 2 emulated hosts x 1 process (``benchmarks/wan_hosts.py``): network namespaces joined by a
bridge, each host with its own hostname, hosts file and core (``taskset``: the 2 emulated hosts do not oversubscribe
the 2 cores, and each node's launcher must take its thread budget from its own core).

* ``ds-ext --no_ssh --node_rank R`` per host, elastic, NoLoCo + journal: host 1's worker is SIGKILLed, relaunched,
  resumes from the journal and ends with the weights of a run that never failed, on both replicas;
* the same with ``--master_addr`` = host 0's second address (its hostname resolves to the first);
* a node whose master is unreachable exits non-zero after ``--rdzv_timeout``, naming address and port;
* ``mpirun`` across the hosts (``launcher/mpirun.sh``; Open MPI's ``plm_rsh_agent`` = an ssh stand-in that enters
  the other namespace), running ``examples/train.py`` under DeepSpeed's MPI discovery;
* DeepSpeed's runner, ``ds-ext --hostfile H --launcher openmpi`` (``launcher/multinode.sh``);
* no emulated-host state survives, after exit, error and SIGTERM; the SLURM script's command, rendered.

Root only (network namespaces); skipped with the reason otherwise.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import wan_hosts  # noqa: E402

from ds_ext.launch import _elastic_argv, split_argv  # noqa: E402

WHY = wan_hosts.unavailable()
needs_hosts = pytest.mark.skipif(WHY is not None, reason=f"emulated hosts unavailable: {WHY}")
TAG = "dsxmn"
# Emulated hosts (network namespaces, subprocess launches): the whole file is out of the fast tier.
pytestmark = pytest.mark.slow
WORKER = str(ROOT / "tests" / "multinode_worker.py")
TRAIN = "examples/train.py"
QUICK = ["--layers", "2", "--hidden", "64", "--seq_len", "64", "--eval_batches", "2", "--eval_interval", "100"]


def root_state():
    """What emulated hosts must not leave behind: root links and qdiscs, our namespaces and /etc/netns entries."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    return (sorted(line.split(":")[1].strip() for line in links.splitlines()), qdiscs, wan_hosts.leftovers(TAG),
            wan_hosts.netns_files(TAG))


@pytest.fixture(scope="module")
def net():
    wan_hosts.sweep_stale(TAG)  # what a SIGKILLed earlier session left
    with wan_hosts.EmulatedHosts(2, tag=f"{TAG}{os.getpid()}", ifname="eth0", second_address=True, pin=True) as n:
        yield n


def host_env(**extra) -> dict:
    """The caller's environment without any launcher's variables and without OMP_NUM_THREADS (each node's
    launcher must pick the thread count from its own cores), this worktree's ds_ext first on the path."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "OMP_NUM_THREADS", "TORCHELASTIC",
            "OMPI_", "PMIX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    env.update(extra)
    return env


def start(net, host, argv, log_path, env=None):
    log = open(log_path, "w")
    return subprocess.Popen(net.exec_prefix(host) + argv, cwd=ROOT, env=env or host_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(net, procs, logs, timeout):
    """Wait for every process; past ``timeout`` kill everything on the hosts. Returns (return codes, outputs)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            net.kill_processes()
            codes.append(None)
    return codes, [Path(p).read_text() for p in logs]


def summary(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def elastic(net, tmp, name, config, master, port, steps, extra=()):
    """``ds-ext --no_ssh --node_rank R`` on each host; returns each rank's dump (weights, host, round, threads)."""
    dump = tmp / name
    procs, logs = [], []
    for host in (0, 1):
        log = tmp / f"{name}.host{host}.log"
        argv = [sys.executable, "-m", "ds_ext.launch", "--no_ssh", "--num_nodes", "2", "--node_rank", str(host),
                "--num_procs", "1", "--master_addr", master, "--master_port", str(port), "--max_restarts", "1",
                "--config", str(config), WORKER, "--dump_dir", str(dump), "--max_steps", str(steps)] + QUICK
        procs.append(start(net, host, argv + list(extra), log))
        logs.append(log)
    codes, outs = finish(net, procs, logs, timeout=300)
    assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    return [torch.load(dump / f"rank{r}.pt") for r in (0, 1)], outs


def noloco_journal_config(tmp, journal) -> Path:
    """configs/noloco.json (2 replicas of 1 rank here, outer step every 3 steps) with the recovery journal."""
    cfg = json.loads((ROOT / "configs" / "noloco.json").read_text())
    for monitor in ("csv_monitor", "tensorboard"):
        cfg.pop(monitor, None)
    cfg["ds_ext"]["noloco"]["inner_steps"] = 3
    cfg["ds_ext"]["recovery"] = {"journal_dir": str(journal), "base_interval": 4, "keep_bases": 4}
    path = tmp / f"noloco_{journal.name}.json"
    path.write_text(json.dumps(cfg))
    return path


# ---------------------------------------------------------------------------------------------- launcher argv


def elastic_ns(*flags):
    _, ns, _ = split_argv(list(flags) + ["train.py"])
    return ns


def test_node_0_hosts_the_rendezvous_whatever_its_hostname_resolves_to():
    """torch guesses ``is_host`` from the hostname, which misses a second NIC's address: ds-ext states it."""
    node0 = _elastic_argv(elastic_ns("--no_ssh", "--num_nodes", "2", "--node_rank", "0", "--master_addr", "10.0.0.9"),
                          1, 1, [])
    node1 = _elastic_argv(elastic_ns("--no_ssh", "--num_nodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.9"),
                          1, 1, [])
    local = _elastic_argv(elastic_ns(), 2, 1, [])
    assert "--rdzv_conf=is_host=1,read_timeout=60" in node0 and "--local_addr=10.0.0.9" in node0
    assert "--rdzv_conf=is_host=0,read_timeout=60" in node1 and not any(a.startswith("--local_addr") for a in node1)
    assert "--nnodes=2" in node0 and "--rdzv_endpoint=10.0.0.9:29500" in node1
    assert "--rdzv_conf=is_host=1,read_timeout=60" in local and "--rdzv_endpoint=127.0.0.1:29500" in local
    assert "--rdzv_conf=is_host=1,read_timeout=15" in _elastic_argv(elastic_ns(), 2, 1, [], rdzv_timeout=15)


@pytest.mark.parametrize("flags, message", [
    (["--num_nodes", "2", "--node_rank", "1"], "needs --master_addr"),
    (["--num_nodes", "2", "--node_rank", "2", "--master_addr", "h0"], "--node_rank 2 is outside 0..1"),
    (["--rdzv_timeout", "0"], "--rdzv_timeout takes an integer >= 1, got '0'")])
def test_bad_node_flags_exit_2_before_anything_starts(flags, message, launch_in_process):
    code, stderr = launch_in_process(["--no_ssh", "--max_restarts", "1"] + flags
                                     + ["--config", ROOT / "configs" / "baseline.json", ROOT / TRAIN])
    assert code == 2 and message in stderr, stderr[-2000:]


def test_slurm_script_runs_the_documented_command(tmp_path):
    """No SLURM here: ``scontrol``, ``srun`` and ``python`` stand-ins record what launcher/slurm.sbatch would run
    (srun starts its command once per task with SLURM's variables), compared with the expected per-task command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'echo node-a; echo node-b',
        "srun": ('echo "srun $*" >> "$RECORD"; while [ "${1#--}" != "$1" ]; do shift; done\n'
                 'i=0; while [ $i -lt $SLURM_NTASKS ]; do\n'
                 '  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@"; i=$((i + 1)); done'),
        "python": (f'[ "$1" = -m ] && exec {sys.executable} "$@"\n'
                   'echo "python $* | $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_SIZE $MASTER_ADDR $MASTER_PORT" '
                   '>> "$RECORD"')}
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"
    env = host_env(RECORD=str(record), SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS="4",
                   SLURM_NTASKS_PER_NODE="2")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    assert subprocess.run(["bash", "-n", "launcher/slurm.sbatch"], cwd=ROOT).returncode == 0
    proc = subprocess.run(["bash", "launcher/slurm.sbatch", "configs/noloco.json", "--max_steps", "5"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = record.read_text().splitlines()
    assert lines[0].startswith("srun --kill-on-bad-exit=1 bash -c")
    expected = [f"python examples/train.py --deepspeed_config configs/noloco.json --max_steps 5 | "
                f"{r} 4 {r % 2} 2 node-a 29500" for r in range(4)]  # RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE MASTER
    assert [line for line in lines if line.startswith("python ")] == expected


def test_launcher_scripts_parse():
    for script in ("mpirun.sh", "multinode.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", f"launcher/{script}"], cwd=ROOT).returncode == 0, script


# ------------------------------------------------------------------------------------------------ emulated hosts


@needs_hosts
def test_emulated_hosts_have_their_names_and_leave_nothing_behind(tmp_path):
    before = root_state()
    with wan_hosts.EmulatedHosts(2, tag=f"{TAG}{os.getpid()}x", ifname="eth0", second_address=True, pin=True) as n:
        probe = ("import socket, os; print(socket.gethostname(), socket.gethostbyname('host1'), "
                 "len(os.sched_getaffinity(0)), flush=True)")
        out = [subprocess.run(n.exec_prefix(h) + [sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True).stdout.split() for h in (0, 1)]
        assert out == [["host0", "169.254.77.2", "1"], ["host1", "169.254.77.2", "1"]]
        ssh = n.write_ssh(str(tmp_path))
        across = subprocess.run(n.exec_prefix(0) + [ssh, "host1", "hostname; hostname -I"], capture_output=True,
                                text=True, check=True).stdout.split()
        assert across == ["host1", "169.254.77.2", "169.254.78.2"]
        # a process still running inside a host must not keep its namespace (and veth) alive
        subprocess.Popen(n.exec_prefix(1) + ["sleep", "600"], start_new_session=True)
        assert len(wan_hosts.leftovers(n.tag)) == 3 and len(wan_hosts.netns_files(n.tag)) == 2  # + the switch
        assert subprocess.run(n.exec_prefix(1) + ["ip", "-o", "addr", "show", "eth1"], capture_output=True,
                              text=True).stdout.count("169.254.78.2/24") == 1  # the second NIC
    assert root_state() == before
    with pytest.raises(RuntimeError, match="boom"):
        with wan_hosts.EmulatedHosts(2, tag=f"{TAG}{os.getpid()}y"):
            raise RuntimeError("boom")
    assert root_state() == before


@needs_hosts
def test_sigterm_and_sigkill_of_the_owner_leave_nothing_behind():
    before = root_state()
    # The owner tags its hosts with its own pid, as EmulatedHosts' callers do: sweep_stale removes a tag only once
    # that pid is gone (a tag derived from the test's pid could name a live process and never be swept).
    code = ("import os, sys, time; sys.path.insert(0, %r)\n"
            "import wan_hosts\n"
            "tag = %r + str(os.getpid())\n"
            "with wan_hosts.EmulatedHosts(2, tag=tag, second_address=True):\n"
            "    print('up', tag, flush=True); time.sleep(60)\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        child = subprocess.Popen([sys.executable, "-c", code % (str(ROOT / "benchmarks"), TAG)],
                                 stdout=subprocess.PIPE, text=True)
        up, tag = child.stdout.readline().split()
        assert up == "up"
        assert len(wan_hosts.leftovers(tag)) == 3 and len(wan_hosts.netns_files(tag)) == 2
        child.send_signal(sig)
        child.wait(timeout=30)
        if sig == signal.SIGKILL:  # no handler ran: the next session sweeps what a dead owner left
            assert wan_hosts.leftovers(tag) and wan_hosts.netns_files(tag)
            wan_hosts.sweep_stale(TAG)
        assert wan_hosts.leftovers(tag) == wan_hosts.netns_files(tag) == [] and root_state() == before, sig


# ------------------------------------------------------------------------------------------------ launch paths


STEPS, KILL_STEP = 11, 7  # outer steps at 3, 6, 9; steps 10-11 keep the two replicas apart


@pytest.fixture(scope="module")
def noloco_reference(net, tmp_path_factory):
    """The never-failed run of the kill test below, with the master given as host 0's SECOND address (a second
    NIC; its hostname resolves to the first): one run serves both that test and the second-address test (~11 s of
    CI that a separate 3-step run cost)."""
    tmp = tmp_path_factory.mktemp("noloco_reference")
    return elastic(net, tmp, "ref", noloco_journal_config(tmp, tmp / "j_ref"), net.second_address(0), 29611, STEPS)


@needs_hosts
def test_elastic_per_node_noloco_journal_kill_9_on_host_1_resumes_bit_identical(net, tmp_path, noloco_reference):
    """Rank 1 (host 1) SIGKILLs itself in step 7. Its agent relaunches it; host 0's agent sees the new rendezvous
    round and restarts rank 0, which had trained on alone (NoLoCo skips a dead partner's mix; paced from step 7 so
    the restart finds it still training). Both resume from the journal at the agreed step 6 (rank 0 drops its solo
    steps) and end with the reference's weights."""
    steps, kill_step = STEPS, KILL_STEP
    reference, _ = noloco_reference
    failed, outs = elastic(net, tmp_path, "kill", noloco_journal_config(tmp_path, tmp_path / "j_kill"), "host0",
                           29612, steps, extra=["--fault_inject", f"1:{kill_step}", "--pace_from", f"{kill_step}:2"])
    assert [d["host"] for d in failed] == ["host0", "host1"]  # rank 1, the victim, ran on host 1
    assert [d["threads"] for d in failed] == [1, 1]  # each node: its 1 core / 1 process
    assert [d["starts"] for d in reference] == [1, 1] and [d["starts"] for d in failed] == [2, 2], outs[1][-3000:]
    resumed = summary(outs[0])
    assert resumed["start_step"] == kill_step - 1 and resumed["recovery/resumed_step"] == kill_step - 1
    for rank in (0, 1):
        assert failed[rank]["global_steps"] == reference[rank]["global_steps"] == steps
        for name, w in reference[rank]["weights"].items():
            assert torch.equal(failed[rank]["weights"][name], w), f"rank {rank}: {name} differs"
    # the two replicas differ (an outer step of 2 replicas makes them equal; the last was step 9): the comparison
    # above covers both, not one copy twice
    assert any(not torch.equal(reference[0]["weights"][n], reference[1]["weights"][n]) for n in reference[0]["weights"])


@needs_hosts
def test_master_on_host_0s_second_address_trains(noloco_reference):
    """Host 0's hostname resolves to its first address; the master is given as the second (a second NIC): the
    shared reference run of the kill test above (``noloco_reference``) trains its steps on both hosts."""
    dumps, outs = noloco_reference
    assert [d["global_steps"] for d in dumps] == [STEPS, STEPS] and {d["host"] for d in dumps} == {"host0", "host1"}
    assert [d["starts"] for d in dumps] == [1, 1]  # one round: the rendezvous at that address held
    assert summary(outs[0] + outs[1])["world_size"] == 2


@needs_hosts
def test_unreachable_master_fails_after_rdzv_timeout_naming_address_and_port(net, tmp_path):
    """Default 60 s (torch's read_timeout); ``--rdzv_timeout 4`` here so the wait costs CI 4 s, not 60."""
    nobody = "169.254.77.99"  # on the hosts' subnet, no host has it
    t0 = time.monotonic()
    proc = start(net, 1, [sys.executable, "-m", "ds_ext.launch", "--no_ssh", "--num_nodes", "2", "--node_rank", "1",
                          "--num_procs", "1", "--master_addr", nobody, "--master_port", "29614", "--max_restarts",
                          "1", "--rdzv_timeout", "4", "--config", "configs/baseline.json", TRAIN, "--max_steps",
                          "3"] + QUICK, tmp_path / "unreachable.log")
    (code,), (out,) = finish(net, [proc], [tmp_path / "unreachable.log"], timeout=150)
    took = time.monotonic() - t0
    assert code not in (0, None), out[-3000:]
    assert took < 60, f"took {took:.0f} s with --rdzv_timeout 4"
    assert f"could not reach the rendezvous store at {nobody}:29614 within 4 s" in out, out[-3000:]


@needs_hosts
def test_mpirun_across_hosts_through_an_rsh_agent(net, tmp_path):
    agent_log = tmp_path / "agent.log"
    ssh = net.write_ssh(str(tmp_path), log=str(agent_log))
    tx = net.tx_bytes(1)
    env = host_env(MPI_ARGS=f"-H host0,host1 --mca plm_rsh_agent {ssh}")
    proc = start(net, 0, ["launcher/mpirun.sh", "2", "configs/baseline.json", "--max_steps", "3"] + QUICK,
                 tmp_path / "mpirun.log", env=env)
    (code,), (out,) = finish(net, [proc], [tmp_path / "mpirun.log"], timeout=300)
    assert code == 0, out[-4000:]
    s = summary(out)
    assert s["steps"] == 3 and s["world_size"] == 2
    assert agent_log.read_text().startswith("host1 "), "Open MPI did not start host 1 through the agent"
    # ZeRO-1 over 2 ranks moves the gradients (~0.4 MB a step here) between the hosts, through host 1's link
    assert net.tx_bytes(1) - tx > 1_000_000


@needs_hosts
def test_deepspeed_runner_openmpi_across_hosts(net, tmp_path):
    ssh = net.write_ssh(str(tmp_path), log=str(tmp_path / "agent.log"))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host0 slots=1\nhost1 slots=1\n")
    # ssh on PATH for the runner's own ssh check; Open MPI's agent for its daemons; root allowed for mpirun
    env = host_env(LAUNCHER="openmpi", OMPI_MCA_plm_rsh_agent=ssh, OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    proc = start(net, 0, ["launcher/multinode.sh", str(hostfile), "host0", "configs/baseline.json", "--max_steps",
                          "3"] + QUICK, tmp_path / "runner.log", env=env)
    (code,), (out,) = finish(net, [proc], [tmp_path / "runner.log"], timeout=300)
    assert code == 0, out[-4000:]
    s = summary(out)
    assert s["steps"] == 3 and s["world_size"] == 2
    assert "host1 " in (tmp_path / "agent.log").read_text()
