"""Low-rank adapters (LoRA) for the UNet, and new label rows for its condition tables.

`inject(model, cfg)` wraps every `nnx.Linear` and `nnx.Conv` whose path matches `cfg.targets` (regular
expressions over "/"-joined module paths) in place:

  dense / 1x1 projections:  y = base(x) + (alpha / r) * (x A) B,           A (in, r), B (r, out)
  k x k convolutions:       y = base(x) + (alpha / r) * conv_kxk(x, A) B,  A (k, k, in, r), B (r, out)

A is drawn small, B is zero, so an adapted model starts as the pretrained one. Adapter weights are
`nnx.LoRAParam`s: `nnx.split(model, nnx.LoRAParam, ...)` separates them (and new label rows, which are
LoRAParams too) from the frozen base, so the optimizer state holds adapters only and the base passes through
the train step untouched. `merge(model)` folds every adapter into its base kernel (a k x k conv followed by a
1 x 1 conv is one k x k conv with kernel A B), for sampling at base speed. `extend_labels(model, field, n)`
appends n trainable rows to the pathology or device table; existing rows stay frozen, so old labels keep
their meaning; `merge` turns an extended table back into a plain, larger one.

Dropout on the adapter branch's input (`cfg.dropout`, as in PEFT) is active only inside `with lora.dropout(key)`
(the train step); the key reaches the wrapped layers through a context variable at trace time, because the
UNet calls its layers without RNGs.

`cfg.fold` picks how a wrapped layer computes: "branch" runs the rank-r path beside the base (fewer FLOPs: the
base kernel gets no gradient); "kernel" adds the delta to the base kernel and runs one convolution, whose
kernel gradient gives dA and dB by two small products. On XLA:CPU the branch's thin convolutions (r output
channels) and their gradients run far below the matmul rate and cost more than the full kernel gradient they
avoid, so "auto" folds in programs lowered for CPU and keeps the branch elsewhere (lax.platform_dependent, so
an AOT compile for TPU on a CPU host gets the branch). Dropout on the branch input needs the branch.
"""

from __future__ import annotations

import contextlib
import contextvars
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.rank = 8
  c.alpha = 8.0
  # Which layers get adapters (regexes over module paths such as "downblocks/1/block1/conv" or "attn/proj_q").
  c.targets = (r".*",)
  c.exclude = ()               # paths matching these are skipped
  c.dropout = 0.0              # dropout on the adapter branch's input while training
  c.fold = "auto"              # "kernel" | "branch" | "auto" (kernel on CPU): how wrapped layers compute
  c.seed = 0
  return c


_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("busgen_lora_dropout", default=None)


@contextlib.contextmanager
def dropout(key: jax.Array | None):
  """Enables adapter dropout for calls traced inside the block (None: disabled)."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


FOLDS = ("auto", "kernel", "branch")


def _fold_or_branch(fold: str, rate: float, x, folded, branch):
  """A wrapped layer's output: `folded` (the delta added to the base kernel) or `branch` (the rank-r path beside
  it). Branch dropout needs the branch. "auto" stages out both and lowering picks (lax.platform_dependent): the
  folded form in programs lowered for CPU, so an AOT compile for TPU on a CPU host gets the branch."""
  if fold == "branch" or (rate and _DROPOUT_KEY.get() is not None):
    return branch(x)
  if fold == "kernel":
    return folded(x)
  return jax.lax.platform_dependent(x, cpu=folded, default=branch)


def _with_kernel(b, x, delta, op):
  """The base layer `b` with `delta` added to its kernel: op(x, kernel) plus b's bias, in b's dtype rules."""
  bias = b.bias[...] if b.bias is not None else None
  x, kernel, bias = b.promote_dtype((x, b.kernel[...] + delta, bias), dtype=b.dtype)
  y = op(x, kernel)
  return y if bias is None else y + bias


def _drop(x, rate: float, uid: int):
  key = _DROPOUT_KEY.get()
  if key is None or not rate:
    return x
  keep = jax.random.bernoulli(jax.random.fold_in(key, uid), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class LoRADense(nnx.Module):
  def __init__(self, base: nnx.Linear, rank: int, alpha: float, rng: np.random.Generator, rate: float = 0.0,
               uid: int = 0, fold: str = "auto"):
    self.base, self.rate, self.uid, self.fold = base, float(rate), int(uid), fold
    fan_in, out = base.in_features, base.out_features
    self.lora_a = nnx.LoRAParam(jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, rank)), jnp.float32))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out), jnp.float32))
    self.scale = alpha / rank

  def delta(self) -> jax.Array:
    return self.scale * jnp.dot(self.lora_a.value, self.lora_b.value)   # jnp: loaded adapters may be NumPy

  def __call__(self, x):
    b = self.base

    def folded(x):
      return _with_kernel(b, x, self.delta(), lambda x, k: b.dot_general(
          x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=b.precision))

    def branch(x):
      y = b(x)
      h = _drop(x.astype(jnp.float32), self.rate, self.uid)
      return y + (self.scale * (h @ self.lora_a.value) @ self.lora_b.value).astype(y.dtype)
    return _fold_or_branch(self.fold, self.rate, x, folded, branch)


class LoRAConv(nnx.Module):
  def __init__(self, base: nnx.Conv, rank: int, alpha: float, rng: np.random.Generator, rate: float = 0.0,
               uid: int = 0, fold: str = "auto"):
    self.base, self.rate, self.uid, self.fold = base, float(rate), int(uid), fold
    k = tuple(base.kernel_size)
    cin, cout = base.in_features, base.out_features
    fan_in = cin * int(np.prod(k))
    self.lora_a = nnx.LoRAParam(jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), (*k, cin, rank)), jnp.float32))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, cout), jnp.float32))
    self.scale = alpha / rank

  def delta(self) -> jax.Array:
    return self.scale * jnp.einsum("...ir,ro->...io", self.lora_a.value, self.lora_b.value)

  def _conv(self, x, kernel, conv=jax.lax.conv_general_dilated):
    b, n = self.base, len(self.base.kernel_size)
    return conv(x, kernel, _tuple(b.strides, n), _padding(b.padding, n), rhs_dilation=_tuple(b.kernel_dilation, n),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=b.precision)

  def __call__(self, x):
    b = self.base

    def folded(x):
      return _with_kernel(b, x, self.delta(), lambda x, k: self._conv(x, k, b.conv_general_dilated))

    def branch(x):
      y = b(x)
      h = self._conv(_drop(x.astype(jnp.float32), self.rate, self.uid), self.lora_a.value)
      return y + (self.scale * h @ self.lora_b.value).astype(y.dtype)
    return _fold_or_branch(self.fold, self.rate, x, folded, branch)


def _tuple(v, n):
  if v is None:
    return (1,) * n
  return (v,) * n if isinstance(v, int) else tuple(v)


def _padding(p, n):
  if isinstance(p, str):
    return p
  if isinstance(p, int):
    return [(p, p)] * n
  return [tuple(q) if not isinstance(q, int) else (q, q) for q in p]


class ExtendedEmbedding(nnx.Module):
  """A condition table with `n` new, trainable rows after the frozen ones."""

  def __init__(self, base, n: int, rng: np.random.Generator, init=None):
    self.base = base
    dim = base.embedding.value.shape[1]
    start = np.zeros((n, dim)) if init is None else np.broadcast_to(np.asarray(init, np.float64), (n, dim))
    self.extra = nnx.LoRAParam(jnp.asarray(start + rng.standard_normal((n, dim)) * 0.02, jnp.float32))

  def __call__(self, idx):
    return jnp.take(jnp.concatenate([self.base.embedding.value, self.extra.value]), idx, axis=0)


# ------------------------------------------------------------------------------------------------ surgery

def _modules(model):
  """(path string, parent, attribute or index, module) for every submodule."""
  out = []

  def walk(node, prefix):
    for name, child in vars(node).items():
      items = enumerate(child) if isinstance(child, nnx.List) else [(None, child)]
      for i, c in items:
        if isinstance(c, nnx.Module):
          path = "/".join(p for p in (prefix, name, None if i is None else str(i)) if p)
          out.append((path, child if i is not None else node, i if i is not None else name, c))
          walk(c, path)

  walk(model, "")
  return out


def _set(parent, key, value):
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def inject(model: nnx.Module, cfg: ml_collections.ConfigDict) -> list[str]:
  """Wraps the targeted Linear/Conv layers of `model` in place; returns their paths."""
  rng = np.random.default_rng(cfg.seed)
  fold = cfg.get("fold", "auto")   # configs saved before the option lack it
  if fold not in FOLDS:
    raise ValueError(f"lora.fold must be one of {FOLDS}, got {fold!r}")
  targets = [re.compile(t) for t in cfg.targets]
  exclude = [re.compile(t) for t in cfg.exclude]
  done = []
  for path, parent, key, m in _modules(model):
    if not isinstance(m, (nnx.Linear, nnx.Conv)) or isinstance(parent, (LoRADense, LoRAConv)):
      continue
    if not any(t.fullmatch(path) for t in targets) or any(t.fullmatch(path) for t in exclude):
      continue
    if isinstance(m, nnx.Conv) and (m.feature_group_count != 1 or _tuple(m.input_dilation, 2) != (1, 1)):
      continue
    kind = LoRADense if isinstance(m, nnx.Linear) else LoRAConv
    wrap = kind(m, cfg.rank, cfg.alpha, rng, cfg.get("dropout", 0.0), len(done), fold)
    _set(parent, key, wrap)
    done.append(path)
  if not done:
    raise ValueError(f"LoRA targets {tuple(cfg.targets)} match no Linear or Conv layer")
  return done


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and every extended table into one larger table, removing the
  wrappers (in place); returns the model, now a plain UNet with `table_rows(model)` label rows."""
  from busgen_jax.models import unet
  for path, parent, key, m in _modules(model):
    if isinstance(m, (LoRADense, LoRAConv)):
      m.base.kernel.value = m.base.kernel.value + m.delta().astype(m.base.kernel.value.dtype)
      _set(parent, key, m.base)
    elif isinstance(m, ExtendedEmbedding):
      table = jnp.concatenate([m.base.embedding.value, m.extra.value.astype(m.base.embedding.value.dtype)])
      _set(parent, key, unet.Embedding(table.shape[0], table.shape[1], table, None))
  return model


def table_rows(model: nnx.Module) -> dict[str, int]:
  """Rows of the pathology and device tables (extended or not): the merged model config's num_* values."""
  def rows(t):
    return rows(t.base) + t.extra.value.shape[0] if isinstance(t, ExtendedEmbedding) else t.embedding.value.shape[0]
  return {"num_pathology": rows(model.pathology_table), "num_devices": rows(model.device_table)}


def extend_labels(model: nnx.Module, field: str, n: int, seed: int = 0, init=None) -> int:
  """Appends n trainable rows to the model's `field` table ("pathology" or "device"); returns the first new
  row's index. `init` ((n, dim) or (dim,)) starts them near known rows (e.g. a new class at its parent
  pathology's row), which adapts much faster than starting near zero, far from every trained row; a little
  noise tells them apart."""
  attr = {"pathology": "pathology_table", "device": "device_table"}[field]
  base = getattr(model, attr)
  if isinstance(base, ExtendedEmbedding):
    raise ValueError(f"the {field} table has already been extended")
  setattr(model, attr, ExtendedEmbedding(base, n, np.random.default_rng(seed), init))
  return base.embedding.value.shape[0]


def adapter_state(model: nnx.Module) -> dict:
  """The adapters (and new label rows) alone, as a pure dict: what `save_adapters` writes."""
  return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def num_adapter_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter_state(model)))


def save_adapters(directory, model, cfg: ml_collections.ConfigDict, meta: dict | None = None, *,
                  step: int = 0) -> None:
  """Writes the adapters and new label rows alone (a small Orbax checkpoint) with their LoRA config. `model` is
  an injected model or its `adapter_state` (e.g. a train state's params)."""
  from busgen_jax import checkpoint
  state = adapter_state(model) if isinstance(model, nnx.Module) else model
  checkpoint.save_params(directory, state, meta={**(meta or {}), "lora": cfg.to_dict()}, step=step, as_ema=False)


def load_adapters(directory, model: nnx.Module) -> nnx.Module:
  """Loads adapters saved by `save_adapters` into a model already injected (and extended) the same way."""
  from busgen_jax import checkpoint
  state = nnx.state(model, nnx.LoRAParam)
  try:
    nnx.replace_by_pure_dict(state, checkpoint.load_params(directory, which="params"))
  except (KeyError, ValueError) as e:
    raise ValueError(f"{directory}: the adapters do not fit this model (inject with the saved LoRA config "
                     f"and extend the same label tables first): {e}") from e
  nnx.update(model, state)
  return model
