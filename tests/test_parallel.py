"""Meshes, logical-axis rules, and process-local batches -> global sharded arrays (8 simulated devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from busgen_jax import parallel


def test_make_mesh_fills_minus_one_with_auto_axes():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(ValueError, match="uses 4 devices"):
    parallel.make_mesh({"data": 2, "fsdp": 2})
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh({"data": -1, "fsdp": -1})


def test_rules_drop_axes_that_do_not_divide():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  rules = parallel.Rules()
  assert rules.spec((None, None, "conv_in", "channels"), mesh, (3, 3, 8, 64)) == jax.sharding.PartitionSpec(
      None, None, None, "fsdp")
  assert rules.spec((None, None, "conv_in", "channels"), mesh, (3, 3, 8, 3)) == jax.sharding.PartitionSpec(
      None, None, None, None)
  assert rules.spec(("batch",), mesh, (16,)) == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert rules.spec(("batch",), mesh, (2,)) == jax.sharding.PartitionSpec("data")
  assert parallel.data_parallel_size(mesh, rules) == 8


def test_global_batch_is_sharded_over_the_data_axes():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  rules = parallel.Rules()
  local = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
           "pathology": np.arange(16, dtype=np.int32)}
  out = parallel.global_batch(local, mesh, rules)
  assert out["image"].shape == (16, 2, 2, 3)
  assert out["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
  assert len({s.index[0].start for s in out["pathology"].addressable_shards}) == 8   # 8 distinct row blocks
  np.testing.assert_array_equal(np.asarray(out["pathology"]), local["pathology"])
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
    parallel.global_batch({"pathology": np.arange(12, dtype=np.int32)}, mesh, rules)


def test_distributed_initialisation_is_discovered_on_tpu_vms_and_gke_pods(monkeypatch):
  """A Cloud TPU VM names its workers in instance metadata, not in the environment (only GKE sets
  TPU_WORKER_HOSTNAMES): JAX's own finding at import must be enough to start the distributed client, which the
  preemption sync needs. Explicit coordinates win; JAX_PLATFORMS=cpu (tests on a TPU VM) and a plain machine
  start none. jax.distributed.initialize is recorded, not run: discovery itself needs a TPU slice."""
  from jax._src import cloud_tpu_init
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for var in ("BUSGEN_COORDINATOR", "BUSGEN_NUM_PROCESSES", "BUSGEN_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)

  def started(*, tpu_vm: bool, platforms: str | None, **env) -> list:
    calls.clear()
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", tpu_vm)
    if platforms is None:
      monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
      monkeypatch.setenv("JAX_PLATFORMS", platforms)
    for k, v in env.items():
      monkeypatch.setenv(k, v)
    parallel.maybe_initialize_distributed()
    for k in env:
      monkeypatch.delenv(k)
    return list(calls)

  assert started(tpu_vm=True, platforms=None) == [{}]              # discovered by JAX from the VM's metadata
  assert started(tpu_vm=True, platforms="tpu") == [{}]
  assert started(tpu_vm=True, platforms="cpu") == []
  assert started(tpu_vm=False, platforms=None) == []
  assert started(tpu_vm=False, platforms=None, TPU_WORKER_HOSTNAMES="w-0,w-1") == [{}]   # GKE
  assert started(tpu_vm=False, platforms="cpu", BUSGEN_COORDINATOR="localhost:1234", BUSGEN_NUM_PROCESSES="2",
                 BUSGEN_PROCESS_ID="1") == [{"coordinator_address": "localhost:1234", "num_processes": 2,
                                             "process_id": 1}]
