"""Builders of small on-disk fixtures: fake BUSI and BUS-BRA trees, PNG files of every bad kind."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from busgen_jax.data import convert


def gray(h=40, w=56, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def lesion_mask(h=40, w=56, boxes=((10, 8, 30, 20),)) -> np.ndarray:
  """Pixel boxes (x1, y1, x2, y2) filled with 255."""
  m = np.zeros((h, w), np.uint8)
  for x1, y1, x2, y2 in boxes:
    m[y1:y2, x1:x2] = 255
  return m


def save(path: Path, array_or_image, **kw) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  im.save(path, **kw)
  return path


def bomb_png(path: Path, side: int = 100_000) -> Path:
  """A tiny PNG whose header claims side x side pixels (a decompression bomb if decoded)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                   + chunk(b"IEND", b""))
  return path


def truncated_png(path: Path) -> Path:
  buf = io.BytesIO()
  Image.fromarray(gray(64, 64)).save(buf, format="PNG")
  path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  return path


def make_busi(root: Path) -> Path:
  """benign: 3 images (one with two mask files, one with two lesions in one mask), malignant: 2, normal: 1;
  a same-class duplicate, a cross-class conflicting duplicate, an orphan mask and a stray text file."""
  b = root / "Dataset_BUSI_with_GT"
  save(b / "benign/benign (1).png", np.stack([gray(seed=1)] * 3, -1))  # RGB of gray content, as BUSI ships
  save(b / "benign/benign (1)_mask.png", lesion_mask())
  save(b / "benign/benign (2).png", gray(seed=2))
  save(b / "benign/benign (2)_mask.png", lesion_mask(boxes=((2, 2, 12, 12),)))
  save(b / "benign/benign (2)_mask_1.png", lesion_mask(boxes=((30, 20, 50, 36),)))
  save(b / "benign/benign (3).png", gray(seed=3))
  save(b / "benign/benign (3)_mask.png", lesion_mask(boxes=((2, 2, 12, 12), (30, 20, 50, 36))))
  save(b / "benign/benign (4).png", gray(seed=2))  # byte-identical to benign (2)
  save(b / "benign/benign (4)_mask.png", lesion_mask())
  save(b / "malignant/malignant (1).png", gray(seed=5))
  save(b / "malignant/malignant (1)_mask.png", lesion_mask(boxes=((20, 10, 40, 35),)))
  save(b / "malignant/malignant (2).png", gray(seed=3))  # byte-identical to benign (3): conflicting labels
  save(b / "malignant/malignant (2)_mask.png", lesion_mask())
  save(b / "normal/normal (1).png", gray(seed=7))
  save(b / "normal/normal (1)_mask.png", np.zeros((40, 56), np.uint8))
  save(b / "normal/normal (9)_mask.png", np.zeros((40, 56), np.uint8))  # orphan
  (b / "normal/readme.txt").write_text("not an image")
  return root


BUSBRA_ROWS = [  # ID, case, histology, pathology, birads, device, box xywh (pixels), fold
    ("bus_0001-l", 1, "fibroadenoma", "benign", 3, "GE Logiq 5 @10-12MHz", (10, 8, 20, 12), 1),
    ("bus_0001-r", 1, "fibroadenoma", "benign", 3, "GE Logiq 5 @10-12MHz", (12, 8, 20, 12), 1),
    ("bus_0002-s", 2, "invasive ductal carcinoma", "malignant", 5, "GE Logiq 7 @10-14MHz", (20, 10, 20, 25), 2),
    ("bus_0003-l", 3, "cyst", "benign", 2, "Toshiba Aplio 300 @12-14 MHz", (5, 5, 10, 10), 2),
    ("bus_0003-r", 3, "cyst", "benign", 2, "Toshiba Aplio 300 @12-14 MHz", (5, 5, 10, 10), 2),
    ("bus_0004-s", 4, "invasive lobular carcinoma", "malignant", 4, "U-Systems @10-14MHz", (30, 12, 15, 20), 3),
]


def make_busbra(root: Path, height_mismatch: str = "bus_0002-s") -> Path:
  import csv
  root.mkdir(parents=True, exist_ok=True)
  with open(root / "bus_data.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX"])
    for i, (id_, case, hist, path, birads, dev, (x, y, bw, bh), _) in enumerate(BUSBRA_ROWS):
      h = 40 + (7 if id_ == height_mismatch else 0)
      w.writerow([id_, case, hist, path, birads, dev, 56, h, "left", f"[{x},{y},{bw},{bh}]"])
      save(root / "Images" / f"{id_}.png", gray(seed=10 + i))
      save(root / "Masks" / f"mask_{id_.removeprefix('bus_')}.png", lesion_mask(boxes=((x, y, x + bw, y + bh),)))
  with open(root / "5-fold-cv.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ID", "Pathology", "kFold"])
    for id_, _, _, path, _, _, _, fold in BUSBRA_ROWS:
      w.writerow([id_, path, fold])
  return root


def convert_config(fmt: str, input_path, output, **overrides):
  cfg = convert.default_config()
  cfg.format = fmt
  cfg.input = str(input_path)
  cfg.output = str(output)
  cfg.num_workers = 0
  cfg.update_from_flattened_dict(overrides)
  return cfg


def tiny_diffusion_config(data, num_steps: int, **model):
  """`busgen-jax train` config for a tiny BUSGen (16 px, 16 channels, one resolution with attention) on a converted
  dataset; a checkpoint at the end. `model` overrides model fields. One resolution: its training step compiles in
  a third of the time of two (test_unet and test_train's sharded test keep the down- and upsampling
  paths)."""
  from busgen_jax.train import diffusion
  cfg = diffusion.default_config()
  cfg.num_steps, cfg.log_every, cfg.checkpoint_every = num_steps, min(10, num_steps), num_steps
  cfg.data.sources.real.path = str(data)
  cfg.data.image_size, cfg.data.batch_size = 16, 8
  cfg.model.update(ch=16, ch_mult=(1,), num_res_blocks=1, num_groups=4, attn_levels=(0,), num_pathology=4,
                   num_devices=7, dropout=0.0, **model)
  return cfg


def rejections_by_file(report: dict) -> dict[str, str]:
  return {r["file"]: r["code"] for r in report["rejections"]}


def run_two_processes(mode: str, config_json: str, workdir: Path, out_dir: Path) -> list[dict]:
  """tests/distributed_worker.py `mode` in 2 CPU processes (2 devices each) joined by jax.distributed;
  returns each process's JSON output."""
  import json
  import os
  import socket
  import subprocess
  import sys
  root = Path(__file__).resolve().parents[1]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, BUSGEN_COORDINATOR=f"127.0.0.1:{port}", BUSGEN_NUM_PROCESSES="2",
               BUSGEN_PROCESS_ID=str(i), PYTHONPATH=str(root))
    procs.append(subprocess.Popen(
        [sys.executable, str(root / "tests" / "distributed_worker.py"), mode, config_json, str(workdir),
         str(out_dir / f"out{i}.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  return [json.loads((out_dir / f"out{i}.json").read_text()) for i in range(2)]


def tensorboard(run_dir) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, int, int]]]]:
  """A run directory's TensorBoard events read back with TensorBoard's own reader: scalars {tag: [(step, value)]}
  and images {tag: [(step, width, height)]} (CLU writes both as tensor summaries)."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.TENSORS: 0})
  acc.Reload()
  scalars, images = {}, {}
  for tag in acc.Tags()["tensors"]:
    for e in acc.Tensors(tag):
      a = tensor_util.make_ndarray(e.tensor_proto)
      if a.ndim == 0:
        scalars.setdefault(tag, []).append((e.step, float(a)))
      else:                               # an image summary: [width, height, encoded PNG...]
        images.setdefault(tag, []).append((e.step, int(a[0]), int(a[1])))
  return scalars, images
