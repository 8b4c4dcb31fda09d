"""Meshes, logical-axis rules, shardings, multi-host init, and process-local -> global arrays.

The only module that knows about devices and hosts. Everything else names logical axes ("batch", "channels",
...) and asks here how they land on the mesh:

    mesh = parallel.make_mesh({"data": -1, "fsdp": 2})       # -1: all the devices the others leave
    rules = parallel.Rules(cfg.sharding_rules)               # logical name -> mesh axes
    shardings = parallel.param_shardings(abstract_params, mesh, rules)
    batch = parallel.global_batch(local_batch, mesh, rules)  # per-host numpy -> one global jax.Array each

Meshes use AxisType.Auto (Explicit axis types break convolutions in jax 0.10).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Default logical -> mesh rules: the batch over every data-parallel axis, parameters' widest dimension over fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("channels", "fsdp"),       # conv / dense output features
    ("vocab", None),
    ("embed", None),
)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """`jax.distributed.initialize` when launched multi-host (TPU pod slices, or explicit arguments/env).

  On a Cloud TPU VM, or a GKE TPU pod (TPU_WORKER_HOSTNAMES), JAX discovers the arguments itself; on one CPU
  machine give them (or set BUSGEN_COORDINATOR, BUSGEN_NUM_PROCESSES, BUSGEN_PROCESS_ID). The distributed
  client is what JAX's preemption sync and Orbax's multi-host commits use, so a TPU VM always gets one (a
  single-host VM: one process)."""
  coordinator = coordinator or os.environ.get("BUSGEN_COORDINATOR")
  if num_processes is None and "BUSGEN_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["BUSGEN_NUM_PROCESSES"])
  if process_id is None and "BUSGEN_PROCESS_ID" in os.environ:
    process_id = int(os.environ["BUSGEN_PROCESS_ID"])
  if jax.distributed.is_initialized():
    return
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif _tpu_pod_worker_count() > 1 or _on_cloud_tpu_vm():
    jax.distributed.initialize()


def _tpu_pod_worker_count() -> int:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")   # GKE sets it; a Cloud TPU VM's workers are in metadata
  return len(hosts.split(",")) if hosts else 0


def _on_cloud_tpu_vm() -> bool:
  """JAX's own finding at `import jax` (libtpu and TPU chips on this machine), unless JAX is told to run on
  other devices (JAX_PLATFORMS=cpu, as the tests do on any machine)."""
  from jax._src import cloud_tpu_init   # the pinned jax's flag; no public equivalent before the backend starts
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm) and (not platforms or "tpu" in platforms)


# ------------------------------------------------------------------------------------------------ meshes

def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes in order; one size may be -1 (the devices the others leave)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = list(axes.keys()), [int(v) for v in axes.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh {dict(axes)} does not divide the {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices, "
                     f"but there are {len(devices)}")
  from jax.experimental import mesh_utils
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) == 1:
    try:   # as jax.make_mesh does: v5e meshes may split physical axes, others first try not to
      grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=devices[0].device_kind in
                                           ("TPU v5 lite", "TPU v5e"))
    except NotImplementedError:
      # A TPU torus whose axes do not factor into the mesh's (fsdp 4 on an 8x8 v6e): split physical axes.
      grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  else:
    # Multi-slice: slices talk over the data-centre network, ~10x slower than ICI, so only the first axis the
    # slice count divides (the data axis in every config) spans slices; the others stay inside each slice.
    n = len(slices)
    i = next((k for k, s in enumerate(sizes) if s % n == 0), None)
    if i is None:
      raise ValueError(f"mesh {dict(zip(names, sizes))}: no axis is divisible by the {n} slices")
    dcn = [n if k == i else 1 for k in range(len(sizes))]
    grid = mesh_utils.create_hybrid_device_mesh([s // d for s, d in zip(sizes, dcn)], dcn, devices=devices)
  return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


class Rules:
  """Logical axis name -> mesh axis (or tuple of axes, or None). Names absent from the rules replicate."""

  def __init__(self, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    # Normalised once: every name maps to a tuple of mesh axes (a single axis or None in the config).
    self.rules = {name: (axes,) if isinstance(axes, str) else tuple(axes or ()) for name, axes in rules}

  def spec(self, logical: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for these logical axes. With `shape`, a mesh axis that does not divide its dimension
    (or is absent from the mesh) is dropped, so tiny models still run on big meshes (replicated there)."""
    out, used = [], set()
    for i, name in enumerate(logical):
      axes = tuple(a for a in self.rules.get(name, ()) if a in mesh.shape and a not in used)
      if shape is not None:  # keep the axes that divide this dimension and do shard it (size > 1)
        kept = []
        for a in axes:
          if mesh.shape[a] > 1 and shape[i] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
            kept.append(a)
        axes = tuple(kept)
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)

  def check(self, mesh: Mesh) -> None:
    """A mesh axis (of size > 1) that no rule names would only replicate the work over its devices: almost
    always a typo in --config.mesh or the rules, so it is an error."""
    named = {a for axes in self.rules.values() for a in axes}
    unused = [a for a, n in mesh.shape.items() if n > 1 and a not in named]
    if unused:
      raise ValueError(f"mesh axes {unused} of mesh {dict(mesh.shape)} are named by no sharding rule (the rules use "
                       f"{sorted(named)}): their devices would all do the same work. Check --config.mesh and "
                       "--config.sharding_rules")

  def data_axes(self, mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in self.rules.get("batch", ()) if a in mesh.shape)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  return math.prod(mesh.shape[a] for a in rules.data_axes(mesh))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  axes = rules.data_axes(mesh)
  return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def rows(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """Leading dimension split over one mesh axis: the examples of a sampling or scoring batch."""
  return NamedSharding(mesh, P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, rules: Rules) -> None:
  n = data_parallel_size(mesh, rules)
  if global_batch % n:
    raise ValueError(f"the global batch size {global_batch} is not divisible by the data-parallel size {n} "
                     f"(mesh {dict(mesh.shape)}, batch over {rules.data_axes(mesh)}); use a multiple of {n}")
  if global_batch % jax.process_count():
    raise ValueError(f"the global batch size {global_batch} is not divisible by the {jax.process_count()} processes")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """This process's share of a batch (its rows, in order) -> global jax.Arrays sharded over the data axes.

  Every process passes its own `global/process_count` rows; the global batch is their concatenation in
  process order (the order the pipeline's per-process slices are taken in)."""
  local = {k: np.asarray(v) for k, v in local.items()}
  rows = {v.shape[0] for v in local.values()}
  if len(rows) != 1:
    raise ValueError(f"the fields of a batch disagree on its size: { {k: v.shape[0] for k, v in local.items()} }")
  n = rows.pop() * jax.process_count()
  check_batch_size(n, mesh, rules)
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v, (n, *v.shape[1:]))
          for k, v in local.items()}


# ------------------------------------------------------------------------------------------------ parameters

def from_host(arrays, shardings_tree):
  """Host arrays (every process holds the whole of each) -> jax.Arrays laid out as `shardings_tree`; each
  device receives only its slice."""
  return jax.tree.map(lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda i: np.asarray(x)[i]),
                      arrays, shardings_tree)


def shardings(arrays, logical, mesh: Mesh, rules: Rules):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) from a matching pytree of logical-axis
  tuples (None: replicated)."""
  return jax.tree.map(
      lambda x, names: NamedSharding(mesh, rules.spec(names or (None,) * np.ndim(x), mesh, np.shape(x))),
      arrays, logical)


def gather_rows(rows: dict) -> dict:
  """Host arrays of a whole batch: global jax.Arrays in full, and every process's local rows in process
  order (the order of the global batch)."""
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in rows.items()}
  from jax.experimental import multihost_utils
  return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in rows.items()}
