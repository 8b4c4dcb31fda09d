"""Downstream classifiers in Flax NNX: ResNet-18/34/50 (v1.5, BatchNorm) and ViT (Ti/S), NHWC, any input size.

`create(cfg, num_classes, seed)` builds one from a registry by name; `tiny` variants are for tests and the CPU
demo. BatchNorm statistics are `nnx.BatchStat` state: the trainer splits them from the parameters and the
pure train step returns them updated (batch statistics over the global, sharded batch).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "resnet18"          # one of ARCHS
  c.dtype = "float32"          # compute dtype (bfloat16 on accelerators)
  c.dropout = 0.0              # before the head
  return c


# ------------------------------------------------------------------------------------------------ ResNet

class Projection(nnx.Module):
  """1x1 strided conv + BatchNorm on the shortcut when the shape changes."""

  def __init__(self, cin, cout, stride, dtype, rngs):
    self.conv = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


def _projection(cin, cout, stride, dtype, rngs):
  return Projection(cin, cout, stride, dtype, rngs) if stride != 1 or cin != cout else None


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin, width, stride, dtype, rngs):
    cout = width
    self.conv1 = nnx.Conv(cin, width, (3, 3), strides=stride, padding=1, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(width, cout, (3, 3), padding=1, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, dtype=dtype, scale_init=nnx.initializers.zeros, rngs=rngs)  # zero-init residual
    self.proj = _projection(cin, cout, stride, dtype, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.proj is not None:
      x = self.proj(x)
    return nnx.relu(x + y)


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, cin, width, stride, dtype, rngs):
    cout = width * 4
    self.conv1 = nnx.Conv(cin, width, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, (3, 3), strides=stride, padding=1, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn2 = nnx.BatchNorm(width, dtype=dtype, rngs=rngs)
    self.conv3 = nnx.Conv(width, cout, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
    self.bn3 = nnx.BatchNorm(cout, dtype=dtype, scale_init=nnx.initializers.zeros, rngs=rngs)
    self.proj = _projection(cin, cout, stride, dtype, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.proj is not None:
      x = self.proj(x)
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  def __init__(self, block, depths, widths, num_classes, *, stem_width=64, in_channels=3, dropout=0.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.stem = nnx.Conv(in_channels, stem_width, (7, 7), strides=2, padding=3, use_bias=False, dtype=dtype,
                         rngs=rngs)
    self.stem_bn = nnx.BatchNorm(stem_width, dtype=dtype, rngs=rngs)
    blocks, cin = [], stem_width
    for i, (d, w) in enumerate(zip(depths, widths)):
      for j in range(d):
        blocks.append(block(cin, w, 2 if (j == 0 and i > 0) else 1, dtype, rngs))
        cin = w * block.expansion
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(dropout)   # its key comes with each call (pure train steps)
    self.head = nnx.Linear(cin, num_classes, dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.features_dim = cin

  def features(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for b in self.blocks:
      x = b(x)
    return x.mean(axis=(1, 2))

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    return self.head(self.dropout(self.features(x), rngs=rngs)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ ViT

class EncoderBlock(nnx.Module):
  def __init__(self, dim, heads, mlp_ratio, dropout, dtype, rngs):
    self.ln1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, dtype=dtype, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(dim, dim * mlp_ratio, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(dim * mlp_ratio, dim, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, rngs=None):
    x = x + self.drop(self.attn(self.ln1(x)), rngs=rngs)
    return x + self.drop(self.fc2(nnx.gelu(self.fc1(self.ln2(x)))), rngs=rngs)


class ViT(nnx.Module):
  def __init__(self, num_classes, *, image_size, patch=16, dim=192, depth=12, heads=3, mlp_ratio=4,
               in_channels=3, dropout=0.0, dtype=jnp.float32, rngs: nnx.Rngs):
    if image_size % patch:
      raise ValueError(f"ViT: image_size {image_size} is not a multiple of the patch size {patch}")
    n = (image_size // patch) ** 2
    self.embed = nnx.Conv(in_channels, dim, (patch, patch), strides=patch, padding="VALID", dtype=dtype, rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, n + 1, dim)) * 0.02)
    self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_ratio, dropout, dtype, rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.features_dim = dim

  def features(self, x, rngs=None):
    x = self.embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = jnp.concatenate([jnp.broadcast_to(self.cls.value, (x.shape[0], 1, x.shape[-1])).astype(x.dtype), x], 1)
    x = x + self.pos.value.astype(x.dtype)
    for b in self.blocks:
      x = b(x, rngs)
    return self.ln(x[:, 0])

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    return self.head(self.features(x, rngs)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ registry

@dataclasses.dataclass(frozen=True)
class Arch:
  build: Callable[..., nnx.Module]
  help: str


def _resnet(block, depths, widths, stem=64):
  return lambda num_classes, image_size, dropout, dtype, rngs: ResNet(
      block, depths, widths, num_classes, stem_width=stem, dropout=dropout, dtype=dtype, rngs=rngs)


def _vit(**kw):
  return lambda num_classes, image_size, dropout, dtype, rngs: ViT(
      num_classes, image_size=image_size, dropout=dropout, dtype=dtype, rngs=rngs, **kw)


ARCHS: dict[str, Arch] = {
    "resnet18": Arch(_resnet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)), "ResNet-18 (11.2 M)"),
    "resnet34": Arch(_resnet(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512)), "ResNet-34"),
    "resnet50": Arch(_resnet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512)), "ResNet-50 (23.5 M)"),
    "resnet_tiny": Arch(_resnet(BasicBlock, (1, 1, 1), (16, 32, 64), stem=16), "a 3-stage ResNet for CPU tests"),
    "vit_ti16": Arch(_vit(patch=16, dim=192, depth=12, heads=3), "ViT-Ti/16"),
    "vit_s16": Arch(_vit(patch=16, dim=384, depth=12, heads=6), "ViT-S/16"),
    "vit_tiny": Arch(_vit(patch=8, dim=64, depth=2, heads=2, mlp_ratio=2), "a 2-layer ViT for CPU tests"),
}


def create(cfg: ml_collections.ConfigDict, num_classes: int, image_size: int, seed: int = 0) -> nnx.Module:
  if cfg.name not in ARCHS:
    raise ValueError(f"classifier {cfg.name!r} unknown; choose from {sorted(ARCHS)}")
  return ARCHS[cfg.name].build(num_classes, image_size, cfg.dropout, jnp.dtype(cfg.dtype),
                               nnx.Rngs(params=seed))
