"""Every bad input a user can give a role ends in ONE line naming the flag, field or file,
and a non-zero exit code; never a traceback. Each test runs the real ``fedphd`` program."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import fedphd, port_overrides

ADDRESS_FORMS = "HOST:PORT or [IPV6]:PORT"
# A data set that is not there: a command that loaded data before checking its flags would
# fail on it instead of naming the flag.
NO_DATA = ["--set", 'data.dataset="cifar10"', "--set", 'data.root="/nonexistent/fedphd-data"',
           "--set", 'model.preset="ddpm-cifar10"']
PLAIN = ["--set", "tls.insecure=true"]  # these clients stop before any link: no certificates
INFEASIBLE = [*PLAIN, "--set", 'partition.method="classes"',
              "--set", "partition.classes_per_client=11"]
INFEASIBLE_LINE = ("partition.classes_per_client=11 must be between 1 and the 10 classes of "
                   "the data set")
WAIT = 120  # seconds: the bound on every process a test starts


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(("value", "reason"), [
    ("garbage", f"has no port; give {ADDRESS_FORMS}, e.g. 127.0.0.1:8080"),
    ("http://[::1", f"a URL scheme (http://) is not an address; give {ADDRESS_FORMS}"),
    ("127.0.0.1:99999", "port 99999 is outside 1..65535"),
])
def test_a_bad_server_address_is_one_line_naming_the_flag_before_anything_loads(value, reason):
    result = fedphd("client", "--client-id", "0", "--server", value, *NO_DATA, timeout=WAIT)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"fedphd client: --server {value!r}: {reason}"]


def test_a_server_list_that_names_no_address_is_refused_not_replaced_by_the_default():
    result = fedphd("client", "--client-id", "0", "--server", ",,,", *NO_DATA, timeout=WAIT)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "fedphd client: --server ',,,' names no address; give HOST:PORT[,HOST:PORT...]"]


def test_a_bad_fallback_in_the_server_list_is_named():
    result = fedphd("client", "--client-id", "0", "--server", "127.0.0.1:8080,[::1",
                    *NO_DATA, timeout=WAIT)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "fedphd client: --server '127.0.0.1:8080,[::1': '[::1' has an unbalanced '['; an IPv6 "
        "address is written [ADDRESS]:PORT"]


def test_the_edge_names_its_bad_cloud_address():
    result = fedphd("edge", "--edge-id", "0", "--cloud", "cloud.example:0", *NO_DATA,
                    timeout=WAIT)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "fedphd edge: --cloud 'cloud.example:0': port 0 is outside 1..65535"]


def test_an_infeasible_partition_stops_a_standalone_client_in_one_line():
    result = fedphd("client", "--client-id", "0", "--server", "127.0.0.1:1", *INFEASIBLE,
                    timeout=WAIT)
    assert result.returncode == 2
    assert error_lines(result.stderr)[-1] == f"fedphd client: {INFEASIBLE_LINE}"
    assert "Traceback" not in result.stderr


def test_an_infeasible_partition_stops_a_launch_in_one_line_before_anything_starts(
        tmp_path, ports):
    out = tmp_path / "run"
    result = fedphd("launch", "--out", str(out), "--timeout", str(WAIT), *port_overrides(ports),
                    *INFEASIBLE, timeout=WAIT + 60)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"fedphd launch: {INFEASIBLE_LINE}"]
    assert "Traceback" not in result.stderr
    assert not (out / "logs").exists()


# --------------------------------------------------------------------------- image files


def image_folder(root: Path, bad: dict[str, bytes] | None = None) -> Path:
    """A two-class ImageFolder of small valid PNGs, plus the files of ``bad`` (name: bytes)."""
    for index, label in enumerate(["a", "a", "a", "b", "b", "b"]):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (40 * index, 20, 200)).save(root / label / f"{index}.png")
    for name, data in (bad or {}).items():
        (root / "b" / name).write_bytes(data)
    return root


def truncated_png(path: Path) -> bytes:
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    data = path.read_bytes()
    path.unlink()
    return data[: len(data) // 2]


def test_a_garbage_image_in_the_data_dir_is_named_at_start(tmp_path):
    data = image_folder(tmp_path / "data", {"bad.png": b"this is not a png"})
    result = fedphd("client", "--client-id", "0", "--data-dir", str(data),
                    "--server", "127.0.0.1:1", *PLAIN, timeout=WAIT)
    bad = data / "b" / "bad.png"
    assert result.returncode == 2
    assert error_lines(result.stderr)[-1] == (
        f"fedphd client: --data-dir {data}: data set 'imagefolder' in {data}: image {bad} "
        f"could not be read (cannot identify image file '{bad}'); remove or replace that file")
    assert "Traceback" not in result.stderr


def test_a_truncated_image_in_the_data_dir_is_named_at_start(tmp_path):
    data = image_folder(tmp_path / "data", {"cut.png": truncated_png(tmp_path / "whole.png")})
    result = fedphd("client", "--client-id", "0", "--data-dir", str(data),
                    "--server", "127.0.0.1:1", *PLAIN, timeout=WAIT)
    assert result.returncode == 2
    line = error_lines(result.stderr)[-1]
    assert line.startswith(f"fedphd client: --data-dir {data}: data set 'imagefolder' in {data}: "
                           f"image {data / 'b' / 'cut.png'} could not be read (")
    assert line.endswith("); remove or replace that file")
    assert "Traceback" not in result.stderr


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "fedphd.common.commands.cli", *args], stdout=sink,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{log.name} never said {text!r}:\n{log.read_text(errors='replace')}")


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only what we started
            process.wait(timeout=10)


def test_the_cloud_names_the_client_whose_data_could_not_be_read(tmp_path, ports):
    """Flat mode, two clients: client 1's folder holds a garbage file, so it stops at start;
    the cloud's bounded wait ends short and names client 1, not a connection id."""
    settings = [*port_overrides(ports), "--set", "topology.edges=0", "--set",
                "topology.clients=2", "--set", "topology.connect_timeout=40", "--set",
                "tls.insecure=true"]
    good = image_folder(tmp_path / "good")
    bad = image_folder(tmp_path / "bad", {"bad.png": b"garbage"})
    logs = {name: tmp_path / f"{name}.log" for name in ("cloud", "client-0", "client-1")}
    processes = []
    try:
        cloud = start(["cloud", *settings, "--out", str(tmp_path / "run")], logs["cloud"])
        processes.append(cloud)
        wait_for_line(logs["cloud"], "waiting for 2 clients", cloud, WAIT)
        processes += [start(["client", *settings, "--client-id", str(client), "--data-dir",
                             str(folder)], logs[f"client-{client}"])
                      for client, folder in ((0, good), (1, bad))]
        assert processes[2].wait(timeout=WAIT) == 2
        assert cloud.wait(timeout=WAIT) == 1
        assert processes[1].wait(timeout=WAIT) == 0  # released when the cloud gave up
    finally:
        stop(processes)
    text = {name: log.read_text(errors="replace") for name, log in logs.items()}
    assert error_lines(text["client-1"])[-1].startswith(
        f"fedphd client: --data-dir {bad}: data set 'imagefolder' in {bad}: image "
        f"{bad / 'b' / 'bad.png'} could not be read")
    assert ("cloud: only 1 of 2 clients connected within topology.connect_timeout = 40.0 s; "
            "missing: client 1 (see their logs: one that failed at start says why)"
            ) in text["cloud"]
    assert not [name for name, body in text.items() if "Traceback" in body]


def test_an_image_unreadable_at_first_use_fails_the_round_in_one_line(tmp_path, caplog):
    """A file spoilt after the folder loaded: the round's answer names the file (the server
    logs it under the client's name) and the client's log has one line, no traceback."""
    import torch

    from fedphd.client.client import DiffusionClient, local_data
    from fedphd.common.settings.config import load_config
    from fedphd.common.wire.keys import RETURN_GROUPS_KEY, SEND_GROUPS_KEY, TRAIN_GROUPS_KEY
    from fedphd.common.wire.transport import Code
    from tests.test_feddiffuse import instruction

    data = image_folder(tmp_path / "data")
    cfg = load_config(None, ["training.batch_size=6"])
    client = DiffusionClient(cfg, 0, local_data(cfg, 0, str(data)), torch.device("cpu"),
                             tmp_path / "state")
    spoilt = data / "b" / "4.png"
    spoilt.write_bytes(b"overwritten")
    full = dict.fromkeys((SEND_GROUPS_KEY, TRAIN_GROUPS_KEY, RETURN_GROUPS_KEY), "down,mid,up")
    with caplog.at_level("ERROR", logger="fedphd.client"):
        answer = client.fit(instruction(full))
    assert answer.status.code != Code.OK and answer.num_examples == 0
    assert str(spoilt) in answer.status.message
    errors = [record for record in caplog.records if record.name == "fedphd.client"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert str(spoilt) in errors[0].getMessage()
