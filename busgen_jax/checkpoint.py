"""Orbax checkpoints: the train state (params, EMA, optimizer state, step, RNG) and the Grain iterator.

Layout: <dir>/<step>/{state, data, meta}. `state` is one pytree (restored onto whatever shardings the caller
asks for, so a run resumes on a different mesh or process count); `data` is each process's Grain iterator
state (its own file per process); `meta` is JSON (config, vocabularies). Saves are asynchronous and atomic
(Orbax finalises a step only when every item is written), so a crash never leaves a readable-looking half
checkpoint; keep-N prunes old steps.

Preemption: a training loop asks `reached_preemption(step)` after each save and stops when it is true. With
several processes that is JAX's preemption sync service (every host agrees on the step to save at); with one
process, a SIGTERM handler (installed by `catch_sigterm=True`) sets the flag, so `kill -TERM`, a spot VM's
shutdown or a scheduler's notice saves the next step and exits instead of losing the steps since the last save.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import os
import signal
import threading
from pathlib import Path
from typing import Any

import grain
import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils
import tensorstore as ts

from busgen_jax import paths


# Replica-parallel saving splits every replicated array across its replicas with one small jitted slice per
# array and shape: thousands of compilations for a UNet on 8 devices (~4 s per save on CPU). Only arrays with at
# least this many bytes per replica slice are split (the large, replicated tensors where it pays on pods).
_MIN_REPLICA_SLICE_BYTES = 8 << 20
# A bucket that stops answering: tensorstore retries every request of a save 32 times, backing off to 32 s, so a
# save fails only after about a quarter of an hour (right for a transient outage on a pod). BUSGEN_STORAGE_RETRIES=N
# bounds that to N retries (0.2 s doubling to 5 s) for runs that should fail fast, and for the tests. Orbax builds
# its tensorstore context in one function, looked up at every save and restore: the bound is a child context of it.
RETRIES_ENV = "BUSGEN_STORAGE_RETRIES"
_orbax_ts_context = _ts_utils.get_ts_context


def _ts_context(**kwargs) -> ts.Context:
  context = _orbax_ts_context(**kwargs)
  value = os.environ.get(RETRIES_ENV, "")
  if not value:
    return context
  if not value.isdigit():
    raise ValueError(f"{RETRIES_ENV}={value!r}: expected a number of retries (0 or more)")
  return ts.Context({"gcs_request_retries": {"max_retries": int(value), "initial_delay": "0.2s",
                                             "max_delay": "5s"}}, context)


_ts_utils.get_ts_context = _ts_context


class _SameFailure(logging_std.Filter):
  """After a failed save, the save's other tensorstore futures fail with the same cause and nobody awaits them:
  asyncio prints each one's spec at exit (pages of it), burying the error that names the checkpoint directory."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    # asyncio's record: "Future (or Task) exception was never retrieved", then a line per detail.
    return not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")


_SAME_FAILURE = _SameFailure()

ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
    override=True)


class Checkpointer:
  def __init__(self, directory: str | Path, *, keep: int = 3, every: int = 1000, async_save: bool = True,
               catch_sigterm: bool = False):
    self.directory = paths.path(directory)
    self.every = every
    self.signalled = False
    self.data_offset = 0          # the local batch the data iterator started at (see restore_latest)
    self._previous_handler = None
    # Only with one process: with several, JAX's own SIGTERM notifier feeds the sync service that keeps hosts in
    # step, and a Python handler would replace it.
    if catch_sigterm and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    items = {"state": ocp.handlers.StandardCheckpointHandler(), "meta": ocp.handlers.JsonCheckpointHandler(),
             "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=items,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))   # a killed save's leftovers

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _on_sigterm(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint at the next step, then stopping")
    self.signalled = True

  def should_save(self, step: int) -> bool:
    return step % self.every == 0 or self.reached_preemption(step)

  def reached_preemption(self, step: int) -> bool:
    return self.signalled or self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None, *, force=False) -> bool:
    meta = dict(meta or {})
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
      meta["data_offset"] = self.data_offset
    args["meta"] = ocp.args.JsonSave(meta)
    with self._saving():   # an asynchronous save's failure surfaces here, at the next save
      return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  @contextlib.contextmanager
  def _saving(self):
    """A failed save (a full disk, a lost bucket permission, a bucket that stopped answering: tensorstore reports
    that as ValueError) is an OSError naming the directory and the last complete checkpoint; the failed step stays
    a temporary (on GCS: uncommitted) directory, which no reader lists and the next run removes."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - any failure of a save is a failed save; the cause is chained
      cause = (e.strerror or e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
      logging_std.getLogger("asyncio").addFilter(_SAME_FAILURE)   # once; the cause is chained
      raise OSError(getattr(e, "errno", None), f"saving a checkpoint in {self.directory} failed ({cause}); the "
                    f"last complete checkpoint is step {self.manager.latest_step()}") from e

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
    """Restore `step` onto `abstract_state`'s shapes, dtypes and shardings (and the iterator, in place)."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not self._has_my_data_state(step):
        raise FileNotFoundError(f"{self.directory / str(step)}: the checkpoint has no data iterator state for "
                                f"process {jax.process_index()} of {jax.process_count()}")
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - name the checkpoint that failed, keep the cause
      raise RuntimeError(f"cannot restore checkpoint {self.directory / str(step)}: {type(e).__name__}: {e}"
                         f"{_older(self.manager, step)}") from e
    return out["state"], dict(out["meta"] or {})

  def _has_my_data_state(self, step: int) -> bool:
    # Grain writes one state file per process, named by process index and count.
    return (self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists()

  def restore_latest(self, abstract_state: Any, pipeline) -> tuple[Any | None, dict, Any]:
    """(state, meta, data iterator) of the latest checkpoint, the iterator where that run's was; without a
    checkpoint (None, {}, a fresh iterator). `pipeline.iterator(start)` gives the local batches from `start` on.

    Every training step takes one local batch on every process, and global batch k is the same examples however
    many processes split it (data/pipeline.py), so the position is the step. Grain's saved state is per process:
    when the checkpoint was written by a different number of processes it does not apply, and the iterator
    starts at the checkpoint's step instead (`data_offset`, kept in later checkpoints' meta)."""
    latest = self.latest_step()
    if latest is None:
      self.data_offset = 0
      return None, {}, pipeline.iterator(0)
    mine = self._has_my_data_state(latest)
    if mine:
      meta = self.manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
      self.data_offset = int(meta.get("data_offset", 0))
    else:
      self.data_offset = latest
      logging.warning("%s/%d was written by a different number of processes: the data pipeline resumes at "
                      "global batch %d", self.directory, latest, latest)
    it = pipeline.iterator(self.data_offset)
    state, meta = self.restore(latest, abstract_state, it if mine else None)
    logging.info("resumed from %s/%d", self.directory, latest)
    return state, meta, it

  def restore_or_init(self, abstract_state: Any, pipeline, init) -> tuple[Any, Any]:
    """(state, data iterator): the latest checkpoint's (see restore_latest), or init() and a fresh iterator."""
    state, _, it = self.restore_latest(abstract_state, pipeline)
    return (init() if state is None else state), it

  def wait(self):
    with self._saving():
      self.manager.wait_until_finished()

  def close(self):
    try:
      with self._saving():
        self.manager.wait_until_finished()
    except BaseException:
      # The save's own error (named above) is the one to report: closing a manager whose bucket has gone away
      # raises the transport's error again, which must not replace it.
      try:
        self.manager.close()
      except Exception as e:  # noqa: BLE001
        logging.warning("closing the checkpoint manager of %s after a failed save: %s", self.directory, e)
      raise
    else:
      self.manager.close()
    finally:
      if self._previous_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None


# ------------------------------------------------------------------------------------------------ params only

def save_params(directory: str | Path, params: Any, meta: dict | None = None, *, step: int = 0,
                as_ema: bool = True) -> None:
  """A params-only checkpoint (the directory keeps only this step), e.g. an imported model or the best
  classifier so far. "params" holds the weights, and "ema" the same ones unless as_ema=False."""
  ck = Checkpointer(directory, keep=1, async_save=False)
  if step in ck.manager.all_steps():   # a rewrite (a rerun's export, a newer best classifier) replaces it
    ck.manager.delete(step)
  ck.save(step, {"params": params, **({"ema": params} if as_ema else {})}, meta=meta, force=True)
  ck.close()


def load_params(directory: str | Path, model_cfg=None, *, which: str = "ema", step: int | None = None):
  """Params (EMA by default) of a checkpoint directory, as host numpy arrays; no optimizer state is read."""
  directory = paths.path(directory)
  mngr = ocp.CheckpointManager(directory, item_handlers={"state": ocp.handlers.PyTreeCheckpointHandler(),
                                                        "meta": ocp.handlers.JsonCheckpointHandler(),
                                                        "data": _iterator_handler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  out = None
  try:
    meta = mngr.item_metadata(step)["state"]
    if which in meta:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = {which: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta[which])}
      restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                       partial_restore=True)
      out = mngr.restore(step, args=ocp.args.Composite(state=restore))["state"][which]
  except Exception as e:  # noqa: BLE001 - name the checkpoint that failed, keep the cause
    raise RuntimeError(f"cannot restore checkpoint {directory / str(step)}: {type(e).__name__}: {e}"
                       f"{_older(mngr, step)}") from e
  finally:
    mngr.close()
  if out is None:
    raise KeyError(f"{directory}/{step}: no {which!r} in the checkpoint (has {sorted(meta)})")
  return _int_keys(jax.tree.map(np.asarray, out))


def _iterator_handler():
  # A training checkpoint's "data" item (Grain's iterator state). Readers of params or meta alone name its handler
  # so that Orbax does not warn on every load that the item "could not be restored".
  return grain.checkpoint.CheckpointHandler()


def _older(mngr, step: int) -> str:
  older = [s for s in mngr.all_steps() if s < step]
  return f" (older checkpoints: {older}; pass step=, or delete this one to resume from {older[-1]})" if older else ""


def _int_keys(tree):
  """Orbax stores nnx.List indices as "0", "1", ...; nnx.to_pure_dict uses ints. Restore the ints."""
  if not isinstance(tree, dict):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def load_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
  """(step, meta JSON) of a checkpoint directory's latest (or given) step."""
  directory = paths.path(directory)
  mngr = ocp.CheckpointManager(directory, item_handlers={"meta": ocp.handlers.JsonCheckpointHandler(),
                                                        "data": _iterator_handler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return step, dict(meta or {})
