"""Orbax checkpoints: the train state (params, EMA, optimizer state, step, RNG) and the Grain iterator.

Layout: <dir>/<step>/{state, data, meta}. `state` is one pytree (restored onto whatever shardings the caller
asks for, so a run resumes on a different mesh or process count); `data` is each process's Grain iterator
state (its own file per process); `meta` is JSON (config, vocabularies). Saves are asynchronous and atomic
(Orbax finalises a step only when every item is written), so a crash never leaves a readable-looking half
checkpoint; keep-N prunes old steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp

from busgen_jax import paths


# Replica-parallel saving splits every replicated array across its replicas with one small jitted slice per
# array and shape: thousands of compilations for a UNet on 8 devices (~4 s per save on CPU). Only arrays with at
# least this many bytes per replica slice are split (the large, replicated tensors where it pays on pods).
_MIN_REPLICA_SLICE_BYTES = 8 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
    override=True)


class Checkpointer:
  def __init__(self, directory: str | Path, *, keep: int = 3, every: int = 1000, async_save: bool = True):
    self.directory = paths.path(directory)
    self.every = every
    items = {"state": ocp.handlers.StandardCheckpointHandler(), "meta": ocp.handlers.JsonCheckpointHandler(),
             "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.every == 0 or self.manager.reached_preemption(step)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None, *, force=False) -> bool:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
    """Restore `step` onto `abstract_state`'s shapes, dtypes and shardings (and the iterator, in place)."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (self.directory / str(step) / "data").exists():
        raise FileNotFoundError(f"{self.directory / str(step)}: the checkpoint has no data iterator state")
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - name the checkpoint that failed, keep the cause
      raise RuntimeError(f"cannot restore checkpoint {self.directory / str(step)}: {type(e).__name__}: {e}") from e
    return out["state"], out["meta"]

  def restore_or_init(self, abstract_state: Any, data_iterator, init) -> Any:
    """The latest checkpoint's state (and the iterator's position, in place), or `init()` without one."""
    latest = self.latest_step()
    if latest is None:
      return init()
    state, _ = self.restore(latest, abstract_state, data_iterator)
    logging.info("resumed from %s/%d", self.directory, latest)
    return state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ------------------------------------------------------------------------------------------------ params only

def save_params(directory: str | Path, params: Any, meta: dict | None = None, *, step: int = 0,
                as_ema: bool = True) -> None:
  """A params-only checkpoint (the directory keeps only this step), e.g. an imported model or the best
  classifier so far. "params" holds the weights, and "ema" the same ones unless as_ema=False."""
  ck = Checkpointer(directory, keep=1, async_save=False)
  ck.save(step, {"params": params, **({"ema": params} if as_ema else {})}, meta=meta, force=True)
  ck.close()


def load_params(directory: str | Path, model_cfg=None, *, which: str = "ema", step: int | None = None):
  """Params (EMA by default) of a checkpoint directory, as host numpy arrays; no optimizer state is read."""
  directory = paths.path(directory)
  mngr = ocp.CheckpointManager(directory, item_handlers={"state": ocp.handlers.PyTreeCheckpointHandler(),
                                                        "meta": ocp.handlers.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  meta = mngr.item_metadata(step)["state"]
  if which not in meta:
    raise KeyError(f"{directory}/{step}: no {which!r} in the checkpoint (has {sorted(meta)})")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {which: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta[which])}
  restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                   partial_restore=True)
  out = mngr.restore(step, args=ocp.args.Composite(state=restore))["state"][which]
  mngr.close()
  return _int_keys(jax.tree.map(np.asarray, out))


def _int_keys(tree):
  """Orbax stores nnx.List indices as "0", "1", ...; nnx.to_pure_dict uses ints. Restore the ints."""
  if not isinstance(tree, dict):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def load_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
  """(step, meta JSON) of a checkpoint directory's latest (or given) step."""
  directory = paths.path(directory)
  mngr = ocp.CheckpointManager(directory, item_handlers={"meta": ocp.handlers.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return step, dict(meta or {})
