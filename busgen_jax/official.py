"""Official BUSGen (PyTorch) checkpoints: name mapping, importer, and a parity API in the official conventions.

    eps = busgen_jax.official.load("busgen.pt", ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
                                   num_groups=32, T=500, dev_num=20)
    eps_nchw = eps(x_nchw, t, box, pathology, device)   # box: (B, n, 5) = x1, y1, x2, y2 (normalised), valid

`load` accepts a PyTorch checkpoint (read with torch.load(weights_only=True): no code is ever unpickled), an
.npz of state-dict arrays, or a directory written by `busgen-jax import-official`. Every official parameter
name must map to exactly one of ours and back: an unknown or missing name is an error naming it.

`busgen-jax import-official --checkpoint ckpt.pt --output DIR [--config.model.ch=...]` writes DIR as an Orbax
checkpoint (params and EMA = the official weights) plus model_config.json, which `train`, `sample` and `load`
read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from busgen_jax.models import card, unet

MODEL_CONFIG = card.OFFICIAL_CONFIG   # the architecture file beside an import
_WRAPPERS = ("ema_model", "ema", "net_model", "model", "state_dict")  # common checkpoint dict layouts


def model_config(*, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, num_groups=32, T=500, dev_num=20,
                 dropout=0.0, **overrides) -> ml_collections.ConfigDict:
  """Our model config for the official constructor arguments (official attention placement and conditions)."""
  c = unet.default_config()
  c.update(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, num_groups=num_groups, T=T,
           num_devices=dev_num, num_pathology=3, dropout=dropout, attn_levels=(-1,), mid_attn=True,
           conditions=("pathology", "device", "box"))
  c.update(overrides)
  return c


# ------------------------------------------------------------------------------------------------ name mapping

_RES = {"norm1": "block1.0", "conv1": "block1.2", "temb_proj": "temb_proj.1", "cond_proj": "cond_proj.1",
        "norm2": "block2.0", "conv2": "block2.3", "shortcut": "shortcut", "attn": "attn"}
_TOP = {"time_table": "time_embedding.timembedding.0", "time_1": "time_embedding.timembedding.1",
        "time_2": "time_embedding.timembedding.3", "pathology_table": "cond_embedding.cls_condEmbedding",
        "device_table": "cond_embedding.dev_condEmbedding", "cond_1": "cond_embedding.condEmbedding.0",
        "cond_2": "cond_embedding.condEmbedding.2", "head": "head", "tail_norm": "tail.0", "tail_conv": "tail.2"}
_LISTS = {"down": "downblocks", "middle": "middleblocks", "up": "upblocks"}
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def official_name(path: tuple) -> str:
  """Our parameter path (as in nnx.to_pure_dict) -> the official state_dict name."""
  path = [str(p) for p in path]
  *mods, leaf = path
  if mods[0] in _TOP:
    out = [_TOP[mods[0]]]
  else:
    out = [_LISTS[mods[0]], mods[1]]
    rest = mods[2:]
    if rest and rest[0] in _RES:
      out.append(_RES[rest[0]])
      rest = rest[1:]
    out += rest
  return ".".join(out + [_LEAF[leaf]])


def _to_ours(name: str, value: np.ndarray, target_shape: tuple) -> np.ndarray:
  """Official layout -> ours: conv (O,I,kh,kw)->(kh,kw,I,O); linear (O,I)->(I,O); transposed conv
  (I,O,kh,kw) -> the equivalent forward conv (kh,kw,I,O), spatially flipped."""
  v = np.asarray(value, np.float32)
  if re.search(r"upblocks\.\d+\.t\.weight$", name):
    v = v[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
  elif v.ndim == 4:
    v = v.transpose(2, 3, 1, 0)
  elif v.ndim == 2 and not name.endswith(("timembedding.0.weight", "condEmbedding.weight")):
    v = v.T
  if v.shape != tuple(target_shape):
    raise ValueError(f"official parameter {name}: shape {np.shape(value)} does not fit the model "
                     f"(expects {tuple(target_shape)} after layout conversion); check ch/ch_mult/dev_num")
  return np.ascontiguousarray(v)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict) -> dict:
  """Official state dict -> our params (pure dict). Every name on both sides must be matched."""
  ours = nnx.to_pure_dict(nnx.state(unet.abstract(cfg), nnx.Param))
  flat = traverse_util.flatten_dict(ours)
  names = {official_name(p): p for p in flat}
  missing = sorted(set(names) - set(state_dict))
  unknown = sorted(set(state_dict) - set(names))
  if missing or unknown:
    raise ValueError(f"official checkpoint does not match the model ({len(state_dict)} names in the checkpoint, "
                     f"{len(names)} in the model): missing {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                     f"unknown {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
  return traverse_util.unflatten_dict(
      {path: _to_ours(name, state_dict[name], flat[path].shape) for name, path in names.items()})


# ------------------------------------------------------------------------------------------------ reading

def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, np.ndarray]:
  """Official weights as {name: float32 array} from .pt/.pth/.ckpt (torch, weights_only) or .npz."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      raw = {k: z[k] for k in z.files}
    if any(k.startswith("param/") for k in raw):  # the reference file layout: param/<name>, input/..., output/...
      raw = {k[len("param/"):]: v for k, v in raw.items() if k.startswith("param/")}
    return {k: np.asarray(v, np.float32) for k, v in raw.items()}
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path}: reading PyTorch checkpoints needs torch: pip install 'busgen-jax[torch]'") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - any failure here is the file's
    raise ValueError(f"{path}: not a weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from e
  if key:
    if key not in obj:
      raise KeyError(f"{path}: no entry {key!r}; top-level keys: {sorted(obj)[:20]}")
    obj = obj[key]
  elif isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
    found = [k for k in _WRAPPERS if k in obj]
    if not found:
      raise ValueError(f"{path}: cannot find the state dict; top-level keys {sorted(obj)[:20]} "
                       f"(pass key=... / --key)")
    obj = obj[found[0]]
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k.removeprefix("module.")] = v.detach().float().numpy()
  return out


def import_checkpoint(checkpoint: str | Path, output: str | Path, cfg: ml_collections.ConfigDict,
                      key: str | None = None, image_size: int = 0) -> Path:
  """Official checkpoint -> Orbax checkpoint (step 0; params and EMA are the official weights) with its model
  card: the official pathology rows, no device names (`sample --config.device_names` gives them), `image_size`
  when known. model_config.json beside it is what the parity API (`load`) checks."""
  from busgen_jax import checkpoint as ckpt
  params = convert_state_dict(read_state_dict(checkpoint, key), cfg)
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  (output / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
  model_card = card.Card(model=cfg.to_dict(), image_size=int(image_size), vocab={},
                         source={"format": "official-busgen", "source": str(checkpoint)})
  ckpt.save_params(output, params, meta=model_card.to_meta())
  return output


# ------------------------------------------------------------------------------------------------ parity API

def rasterize_boxes(box: jax.Array, height: int, width: int) -> jax.Array:
  """Official box channel: (B, n, 5) boxes (x1, y1, x2, y2 normalised, valid flag) -> (B, H, W, 1); rows
  int(y1*H):int(y2*H), columns int(x1*W):int(x2*W) (truncation) set to one for every valid box."""
  box = jnp.asarray(box, jnp.float32).reshape(box.shape[0], -1, 5)
  r0, r1 = jnp.floor(box[..., 1] * height), jnp.floor(box[..., 3] * height)
  c0, c1 = jnp.floor(box[..., 0] * width), jnp.floor(box[..., 2] * width)
  rows, cols = jnp.arange(height), jnp.arange(width)
  inr = (rows[None, None] >= r0[..., None]) & (rows[None, None] < r1[..., None])        # (B, n, H)
  inc = (cols[None, None] >= c0[..., None]) & (cols[None, None] < c1[..., None])        # (B, n, W)
  on = inr[..., :, None] & inc[..., None, :] & (box[..., 4] > 0)[..., None, None]
  return jnp.any(on, axis=1)[..., None].astype(jnp.float32)


def eps_function(params, cfg: ml_collections.ConfigDict) -> Callable:
  """eps(x_nchw, t, box, pathology, device) -> eps_nchw with our model and these params, jitted."""
  graphdef, state = nnx.split(unet.abstract(cfg), nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))

  @jax.jit
  def eps(state, x_nchw, t, box, pathology, device):
    x = jnp.transpose(jnp.asarray(x_nchw, jnp.float32), (0, 2, 3, 1))
    cond = {"pathology": jnp.asarray(pathology, jnp.int32), "device": jnp.asarray(device, jnp.int32),
            "box": rasterize_boxes(jnp.asarray(box), x.shape[1], x.shape[2])}
    out = nnx.merge(graphdef, state)(x, jnp.asarray(t, jnp.int32), cond)
    return jnp.transpose(out, (0, 3, 1, 2))

  return lambda x_nchw, t, box, pathology, device: eps(state, x_nchw, t, box, pathology, device)


def load(path_or_dir: str | Path, *, ch: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2,
         num_groups: int = 32, T: int = 500, dev_num: int = 20, key: str | None = None) -> Callable:
  """An official checkpoint (or our import of one) as `eps(x_nchw, t, box, pathology, device) -> eps_nchw`.

  Arguments are the official constructor's; for an imported directory they are checked against its
  model_config.json."""
  cfg = model_config(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, num_groups=num_groups, T=T,
                     dev_num=dev_num)
  path = Path(path_or_dir)
  if path.is_dir():
    from busgen_jax import checkpoint as ckpt
    saved = json.loads((path / MODEL_CONFIG).read_text())
    for k in ("ch", "ch_mult", "num_res_blocks", "num_groups", "T", "num_devices"):
      if tuple(np.atleast_1d(saved[k])) != tuple(np.atleast_1d(cfg[k])):
        raise ValueError(f"{path}: the checkpoint has {k}={saved[k]}, the call asked for {cfg[k]}")
    params = ckpt.load_params(path, cfg)
  else:
    params = convert_state_dict(read_state_dict(path, key), cfg)
  return eps_function(params, cfg)
