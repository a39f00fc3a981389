"""Launching instances as processes, without starting any: the flags ``--role local`` passes
on, which instance a process runs, and the launch scripts' syntax."""

import subprocess
from pathlib import Path

import pytest

from jdisagg.preset import load_preset
from jdisagg.serving.instance import one_instance
from jdisagg.serving.launcher import _passed_on

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def test_local_passes_on_all_but_the_per_process_flags():
    argv = ["--role", "local", "--mesh=cpu-2p2d", "--model", "tiny-llama", "--port", "50051", "--kv_checksum"]
    argv += ["--metrics_port=9090", "--control_port", "5", "--visible_devices_env", "CUDA_VISIBLE_DEVICES"]
    assert _passed_on(argv) == ["--mesh=cpu-2p2d", "--model", "tiny-llama", "--kv_checksum"]


def test_one_instance_of_a_preset():
    preset = load_preset("cpu-2p2d")
    sub = one_instance(preset, "decode", 1)
    [spec] = sub.instances
    assert (spec.role, spec.index, spec.devices, spec.pp) == ("decode", 0, (6, 7), 2)
    assert one_instance(preset, "prefill", 1, devices=(0, 1)).instances[0].devices == (0, 1)
    with pytest.raises(ValueError, match="no decode\\[2\\]"):
        one_instance(preset, "decode", 2)
    with pytest.raises(ValueError, match="needs 2 device"):
        one_instance(preset, "prefill", 0, devices=(0,))
    with pytest.raises(ValueError, match="one prefill or decode instance"):
        one_instance(load_preset("cpu-colocated"), "prefill", 0)


@pytest.mark.parametrize("script", ["one_host.sh", "tpu_slice.sh", "h200_two_processes.sh"])
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True, timeout=30)
