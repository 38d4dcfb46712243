"""The hybrid (multi-slice) mesh: `mesh.data/fsdp/tensor` inside a slice (ICI), `mesh.dcn_data` slices (DCN)
along the data axis, slice-major; clear errors naming the numbers. (2 slices x 4 devices training the tiny
setup with the losses of 1 x 8: tests/test_launch.py.)"""

import dataclasses
import json

import numpy as np
import pytest

from alm_jax.errors import ConfigError
from alm_jax.sharding import MESH_AXES, hybrid_device_array, make_mesh
from multidevice import run_with_devices


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What the mesh helpers read of a device (a real jax.Device is needed only to build a Mesh)."""
    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def fake_devices(n, per_process, slices=None, order=None):
    devs = [FakeDevice(i, i // per_process) if slices is None else
            FakeDevice(i, i // per_process, slice_index=i * slices // n) for i in range(n)]
    if slices is None:   # a dataclass field set to None still "has" the attribute: drop it
        devs = [_NoSlice(d.id, d.process_index) for d in devs]
    return [devs[i] for i in order] if order is not None else devs


@dataclasses.dataclass(frozen=True)
class _NoSlice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def ids(arr):
    return np.vectorize(lambda d: d.id)(arr)


def test_devices_without_slice_index_are_cut_into_contiguous_slices():
    devs = fake_devices(8, per_process=4)
    arr = hybrid_device_array((4, 1, 1), 2, devs)
    assert arr.shape == (8, 1, 1)
    assert ids(arr).ravel().tolist() == list(range(8))          # slice s = data rows [4s, 4s+4)
    arr = hybrid_device_array((2, 2, 1), 2, devs)
    assert arr.shape == (4, 2, 1)
    assert ids(arr[:2]).ravel().tolist() == [0, 1, 2, 3] and ids(arr[2:]).ravel().tolist() == [4, 5, 6, 7]
    arr = hybrid_device_array((1, 2, 2), 2, devs)               # a slice may be all fsdp/tensor
    assert arr.shape == (2, 2, 2) and set(ids(arr[0]).ravel()) == {0, 1, 2, 3}


def test_devices_are_grouped_by_slice_index():
    # 16 devices on 4 hosts (4 devices each), 2 slices of 2 hosts; listed in a shuffled order
    order = np.random.default_rng(0).permutation(16).tolist()
    devs = fake_devices(16, per_process=4, slices=2, order=order)
    arr = hybrid_device_array((4, 2, 1), 2, devs)
    assert arr.shape == (8, 2, 1)
    for s in range(2):        # data rows [4s, 4s+4) are slice s, whatever order the devices came in
        assert {d.slice_index for d in arr[4 * s:4 * (s + 1)].ravel()} == {s}
    # every host's devices are adjacent along the batch axes (what process_rows needs)
    rows = arr.reshape(16, 1)
    for p in range(4):
        where = [r for r in range(16) if rows[r, 0].process_index == p]
        assert where == list(range(where[0], where[0] + 4)), p


def test_errors_name_the_numbers():
    devs = fake_devices(16, per_process=4, slices=2)
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=4 but the 16 devices belong to 2 slices"):
        hybrid_device_array((2, 2, 1), 4, devs)
    with pytest.raises(ConfigError, match=r"each slice must have data\*fsdp\*tensor = 4 devices.*\[8\]"):
        hybrid_device_array((4, 1, 1), 2, devs)
    with pytest.raises(ConfigError, match=r"2\*4 = 8 but there are 16 devices"):
        hybrid_device_array((4, 1, 1), 2, fake_devices(16, per_process=4))


MESH_SCRIPT = """
import jax
from alm_jax.config import MeshConfig
from alm_jax.errors import ConfigError
from alm_jax.sharding import make_mesh, mesh_from_config
out = {}
m = mesh_from_config(MeshConfig(data=4, fsdp=1, tensor=1, dcn_data=2))
out["2x4"] = [dict(m.shape), [d.id for d in m.devices.ravel()]]
m = mesh_from_config(MeshConfig(data=-1, fsdp=2, tensor=1, dcn_data=2))
out["fill"] = [dict(m.shape), [d.id for d in m.devices[:2].ravel()]]
m = mesh_from_config(MeshConfig(data=8))
out["1x8"] = [dict(m.shape), [d.id for d in m.devices.ravel()]]
for kw in [dict(data=4, fsdp=2, dcn_data=2), dict(data=-1, dcn_data=3), dict(data=1, dcn_data=0),
           dict(data=-1, fsdp=3, dcn_data=2)]:
    try:
        mesh_from_config(MeshConfig(**kw))
        out[str(kw)] = None
    except ConfigError as e:
        out[str(kw)] = str(e)
print("RESULT" + __import__("json").dumps(out))
"""


def test_hybrid_mesh_on_8_cpu_devices():
    out = json.loads(run_with_devices(MESH_SCRIPT, n_devices=8, timeout=120).split("RESULT")[1])
    assert out["2x4"][0] == {"data": 8, "fsdp": 1, "tensor": 1}             # same axis names: the rule table works
    assert out["2x4"][1] == list(range(8))
    assert out["fill"][0] == {"data": 4, "fsdp": 2, "tensor": 1}            # data=-1 fills each slice: 2 x 2
    assert out["fill"][1] == [0, 1, 2, 3]                                   # slice 0 = data rows 0, 1
    assert out["1x8"][0] == {"data": 8, "fsdp": 1, "tensor": 1}
    errors = {k: v for k, v in out.items() if k.startswith("{")}
    assert "dcn_data*data*fsdp*tensor = 2*4*2*1 = 16 but there are 8 devices" in errors[str(
        dict(data=4, fsdp=2, dcn_data=2))]
    assert "mesh.dcn_data=3 slices do not divide the 8 devices" in errors[str(dict(data=-1, dcn_data=3))]
    assert "mesh.dcn_data=0" in errors[str(dict(data=1, dcn_data=0))]
    assert "4 devices per slice" in errors[str(dict(data=-1, fsdp=3, dcn_data=2))]


def test_single_slice_mesh_is_unchanged():
    import jax
    mesh = make_mesh(-1, 1, 1)
    assert mesh.axis_names == MESH_AXES and mesh.devices.ravel().tolist() == jax.devices()
    with pytest.raises(ConfigError, match="1 devices"):
        make_mesh(2, 1, 1)


# Training on 2 slices x 4 devices equals 1 x 8 step by step: tests/test_launch.py::
# test_local_multihost_trains_like_one_process (each of the two processes is a slice: mesh.dcn_data=2, mesh.data=4).
