"""Procedural breast-ultrasound phantom: the built-in dataset, deterministic from (seed, index), no files.

Physics, cheaply: an echogenicity map of breast layers (skin, subcutaneous fat with Cooper's ligaments,
fibroglandular tissue, retromammary fat, striated pectoral muscle) and a lesion; a complex Gaussian scatterer
field scaled by it, convolved with the device's point-spread function (Gaussian, axial x lateral, baseband);
the envelope, electronic noise, depth attenuation with imperfect time-gain compensation, log compression to the
device's dynamic range.

Lesions follow the BI-RADS ultrasound lexicon, with class-dependent but overlapping descriptor probabilities
(so a classifier is good, not perfect): benign lesions tend to be oval, circumscribed, parallel, homogeneous
hypo/anechoic with posterior enhancement; malignant ones irregular with spiculated or angular margins, taller
than wide, heterogeneous, with posterior shadowing, echogenic halo or calcifications. BI-RADS and histology
labels follow from the drawn descriptors. Each case is imaged in `views_per_case` views (same anatomy and lesion,
new speckle, small probe shifts) on one device, so case-level splitting matters here as it does for patients.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import scipy.fft
from scipy import ndimage

from busgen_jax.data import schema
from busgen_jax.data.sources import base


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  axial: float      # PSF sigma along depth, pixels at 128 px
  lateral: float    # PSF sigma across, pixels at 128 px
  dynamic_range: float  # dB
  gain: float       # dB offset of the display
  atten: float      # attenuation (nepers over the image depth) before TGC
  smooth: float     # speckle-reduction filter sigma (pixels at 128 px)
  noise: float      # electronic noise relative to the mean envelope
  gamma: float      # display curve


DEVICES = (
    Device("Phantom-L14", axial=0.45, lateral=0.9, dynamic_range=42, gain=0, atten=1.2, smooth=0.0, noise=0.02, gamma=1.0),
    Device("Phantom-L9", axial=0.8, lateral=1.6, dynamic_range=36, gain=3, atten=0.8, smooth=0.0, noise=0.03, gamma=1.15),
    Device("Phantom-L12-SRI", axial=0.6, lateral=1.2, dynamic_range=40, gain=-2, atten=1.0, smooth=0.9, noise=0.01, gamma=0.9),
    Device("Phantom-L7", axial=1.0, lateral=2.2, dynamic_range=33, gain=5, atten=0.6, smooth=0.0, noise=0.05, gamma=1.25),
    Device("Phantom-L18", axial=0.35, lateral=0.7, dynamic_range=46, gain=-4, atten=1.6, smooth=0.4, noise=0.015, gamma=1.05),
    Device("Phantom-L10-HC", axial=0.7, lateral=1.1, dynamic_range=30, gain=6, atten=0.9, smooth=0.6, noise=0.04, gamma=1.4),
)


@functools.lru_cache(maxsize=8)
def _grid(size: int):
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return c[:, None], c[None, :]  # yy (depth), xx (lateral), broadcastable


@functools.lru_cache(maxsize=32)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
  """(size, cells) linear-interpolation weights: upsampling becomes two small matmuls."""
  pos = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, cells - 1)
  w = np.zeros((size, cells), np.float32)
  np.add.at(w, (np.arange(size), lo), 1 - (pos - lo))
  np.add.at(w, (np.arange(size), hi), pos - lo)
  return w


_PAD = 8


@functools.lru_cache(maxsize=32)
def _psf_transfer(shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
  """Fourier transform of a unit-gain Gaussian PSF (axial, lateral sigmas in pixels)."""
  fy = np.fft.fftfreq(shape[0])[:, None]
  fx = np.fft.fftfreq(shape[1])[None, :]
  return np.exp(-2 * np.pi ** 2 * ((fy * sigma[0]) ** 2 + (fx * sigma[1]) ** 2)).astype(np.float32)


def _smooth_field(rng, size: int, cells: int) -> np.ndarray:
  """A low-frequency random field of about unit variance."""
  m = _interp_matrix(size, cells)
  return m @ rng.standard_normal((cells, cells), np.float32) @ m.T


def _curve(rng, xx, base, amp):
  k = np.arange(1, 4, dtype=np.float32)[:, None, None]
  a = rng.uniform(0, amp, (3, 1, 1)).astype(np.float32) / k
  ph = rng.uniform(0, 2 * np.pi, (3, 1, 1)).astype(np.float32)
  return base + np.sum(a * np.sin(2 * np.pi * k * xx[None] + ph), axis=0)


def draw_case(rng: np.random.Generator, pathology: str) -> dict:
  """The descriptors of one case's lesion (BI-RADS lexicon), drawn with class-dependent probabilities."""
  mal = pathology == "malignant"
  d = {"pathology": pathology}
  if pathology == "normal":
    return d
  u = rng.uniform
  d["anechoic"] = (not mal) and u() < 0.22
  d["irregular"] = u() < (0.7 if mal else 0.2)
  d["margin"] = rng.choice(["circumscribed", "indistinct", "angular", "microlobulated", "spiculated"],
                           p=[0.2, 0.25, 0.15, 0.1, 0.3] if mal else [0.72, 0.14, 0.04, 0.08, 0.02])
  if d["anechoic"]:
    d["margin"], d["irregular"] = "circumscribed", False
  d["not_parallel"] = u() < (0.5 if mal else 0.12)
  d["heterogeneous"] = u() < (0.65 if mal else 0.25) and not d["anechoic"]
  d["posterior"] = rng.choice(["shadow", "none", "enhancement"],
                              p=[0.5, 0.35, 0.15] if mal else [0.1, 0.4, 0.5])
  if d["anechoic"]:
    d["posterior"] = "enhancement"
  d["halo"] = u() < (0.3 if mal else 0.03)
  d["calcifications"] = int(rng.integers(3, 9)) if u() < (0.3 if mal else 0.05) else 0
  d["size"] = float(u(0.06, 0.16) if mal else u(0.06, 0.17))
  return d


def birads_of(d: dict) -> str:
  if d["pathology"] == "normal":
    return "1"
  if d["anechoic"]:
    return "2"
  score = (d["irregular"] + (d["margin"] != "circumscribed") + d["not_parallel"] + (d["posterior"] == "shadow")
           + bool(d["calcifications"]) + d["heterogeneous"] + (d["margin"] == "spiculated") + d["halo"])
  return ["3", "3", "4A", "4B", "4C", "5", "5", "5", "5", "5"][score]


def histology_of(d: dict) -> str:
  if d["pathology"] == "normal":
    return schema.UNKNOWN
  if d["pathology"] == "benign":
    return "cyst" if d["anechoic"] else "fibroadenoma"
  return "invasive lobular carcinoma" if d["margin"] == "spiculated" and d["not_parallel"] else \
      "invasive ductal carcinoma"


def render(case_rng: np.random.Generator, view_rng: np.random.Generator, size: int, device: Device,
           d: dict) -> tuple[np.ndarray, np.ndarray]:
  """One B-mode view: uint8 image (size, size) and bool lesion mask."""
  yy, xx = _grid(size)
  u = case_rng.uniform
  # Layers: boundaries are smooth random curves across the image.
  skin = _curve(case_rng, xx, u(0.025, 0.045), 0.008)
  fat = _curve(case_rng, xx, skin + u(0.1, 0.25), 0.05)
  gland = _curve(case_rng, xx, fat + u(0.3, 0.45), 0.06)
  retro = gland + u(0.04, 0.09)
  tex = _smooth_field(case_rng, size, 10)
  fat_e = 0.1 * (1 + 0.3 * _smooth_field(case_rng, size, 6))
  gland_e = np.clip(1 + 0.6 * tex, 0.15, None)
  stripes = 0.35 * (1 + 0.8 * np.sin(2 * np.pi * (yy * u(14, 24) + xx * u(-1.5, 1.5))))
  echo = np.where(yy < skin, 4.0, np.where(yy < fat, fat_e, np.where(yy < gland, gland_e,
                                                                     np.where(yy < retro, fat_e, stripes))))
  for _ in range(int(case_rng.integers(1, 4))):  # Cooper's ligaments in the fat
    c = _curve(case_rng, xx, u(0.0, 1.0) * (fat - skin) + skin, 0.04)
    echo = echo + 2.5 * np.exp(-((yy - c) / (0.006 + 0.004 * u())) ** 2) * (yy > skin) * (yy < fat)
  echo = echo.astype(np.float32)

  mask = np.zeros((size, size), bool)
  if d["pathology"] != "normal":
    v = view_rng.uniform
    a = d["size"]
    aspect = u(1.05, 1.5) if d["not_parallel"] else u(0.45, 0.85)
    b = a * aspect
    cx = u(0.3, 0.7) + v(-0.04, 0.04)
    cy = float(np.clip(np.mean(fat) + b + u(0.02, 0.12), 0.2, 0.7))
    theta = u(-0.3, 0.3) + v(-0.08, 0.08)
    dx, dy = xx - cx, yy - cy
    uu = dx * np.cos(theta) + dy * np.sin(theta)
    vv = -dx * np.sin(theta) + dy * np.cos(theta)
    rho = np.sqrt((uu / a) ** 2 + (vv / b) ** 2)
    phi = np.arctan2(vv / b, uu / a)
    # The boundary radius depends on the angle alone: build it on a 1-D table, then look it up per pixel.
    ang = np.linspace(-np.pi, np.pi, 1024, endpoint=False, dtype=np.float32)
    table = np.ones_like(ang)
    amp = (0.12 if d["irregular"] else 0.03) * u(0.6, 1.4)
    for k in range(2, 8):
      table += amp / (1 + 0.3 * (k - 2)) * np.cos(k * ang + u(0, 2 * np.pi))
    if d["margin"] == "microlobulated":
      table += 0.05 * np.cos(int(case_rng.integers(10, 16)) * ang + u(0, 2 * np.pi))
    if d["margin"] == "angular":
      table += 0.12 * np.abs(np.sin(int(case_rng.integers(3, 6)) * ang / 2 + u(0, np.pi))) - 0.06
    if d["margin"] == "spiculated":
      for _ in range(int(case_rng.integers(7, 15))):
        dphi = (ang - u(-np.pi, np.pi) + np.pi) % (2 * np.pi) - np.pi
        table += u(0.3, 0.8) * np.exp(-(dphi / u(0.03, 0.07)) ** 2)
    radius = table[((phi + np.pi) * (1024 / (2 * np.pi))).astype(np.int32) % 1024]
    soft = {"circumscribed": 0.025, "indistinct": 0.14, "angular": 0.05, "microlobulated": 0.04,
            "spiculated": 0.06}[d["margin"]]
    inside = 1 / (1 + np.exp(np.clip((rho - radius) / soft, -30, 30)))
    mask = rho < radius
    level = 0.002 if d["anechoic"] else u(0.01, 0.09)
    lesion = level * np.ones_like(echo)
    if d["heterogeneous"]:
      lesion = lesion * np.clip(1 + 0.8 * _smooth_field(case_rng, size, 18), 0.1, None)
    if d["halo"]:
      lesion_rim = np.exp(-((rho - radius - 0.12) / 0.08) ** 2)
      echo = echo * (1 + 1.2 * lesion_rim)
    echo = echo * (1 - inside) + lesion * inside
    if d["calcifications"]:  # point reflectors: the PSF turns each into a bright echogenic dot
      ys, xs = np.nonzero(mask)
      pick = case_rng.integers(len(ys), size=d["calcifications"])
      echo[ys[pick], xs[pick]] += 40.0
    # Posterior acoustic features: attenuation (or its absence) accumulates along each beam (column).
    strength = {"shadow": -u(0.9, 2.2), "enhancement": u(0.4, 1.0), "none": u(-0.15, 0.15)}[d["posterior"]]
    traversed = np.cumsum(inside, axis=0)
    frac = traversed / max(float(traversed[-1].max()), 1.0)
    echo = echo * np.exp(strength * frac)

  # Speckle: complex scatterers scaled by echogenicity, convolved with the device PSF (baseband), envelope.
  # The convolution is one FFT multiply; reflect padding keeps the skin line from wrapping to the bottom.
  scale = size / 128
  sig = (device.axial * scale, device.lateral * scale)
  amp = np.sqrt(np.maximum(echo, 1e-4)).astype(np.float32)
  amp = np.pad(amp, ((0, _PAD), (0, _PAD)), mode="reflect")
  field = view_rng.standard_normal((2,) + amp.shape, np.float32)
  scat = (field[0] + 1j * field[1]) * amp
  env = np.abs(scipy.fft.ifft2(scipy.fft.fft2(scat) * _psf_transfer(amp.shape, sig)))[:size, :size]
  env = env + device.noise * float(env.mean()) * view_rng.random((size, size), np.float32)
  # Depth attenuation, partly undone by time-gain compensation (mis-set a little differently in every view).
  net = -device.atten + device.atten * view_rng.uniform(0.6, 1.25)
  env = env * np.exp(net * yy)
  db = 20 * np.log10(env + 1e-6)
  # Display: bright tissue (90th percentile) near 0.8 of full scale, the device's dynamic range below it.
  sub = db[::2, ::2].ravel()
  ref = np.partition(sub, int(0.9 * sub.size))[int(0.9 * sub.size)]
  x = np.clip(0.8 + (db - ref + device.gain + view_rng.uniform(-2, 2)) / device.dynamic_range, 0, 1)
  if device.smooth:
    x = ndimage.gaussian_filter(x, device.smooth * scale, truncate=2.5)
  img = (255 * x ** device.gamma + 0.5).astype(np.uint8)
  return img, mask


@dataclasses.dataclass
class PhantomSource:
  num_examples: int = 1000
  size: int = 128
  seed: int = 0
  num_devices: int = 3
  first_device: int = 0          # devices DEVICES[first_device:first_device + num_devices]: another site's scanners
  views_per_case: int = 2
  malignant_fraction: float = 0.4
  normal_fraction: float = 0.0
  name: str = "phantom"

  def __post_init__(self):
    if self.num_devices < 1 or self.first_device < 0 or self.first_device + self.num_devices > len(DEVICES):
      raise ValueError(f"phantom.num_devices >= 1 devices from phantom.first_device must lie within the "
                       f"{len(DEVICES)} phantom devices, got num_devices={self.num_devices}, "
                       f"first_device={self.first_device}")
    if self.views_per_case < 1 or self.num_examples < 0 or self.size < 16:
      raise ValueError("phantom needs views_per_case >= 1, num_examples >= 0 and size >= 16")
    if not 0 <= self.malignant_fraction + self.normal_fraction <= 1:
      raise ValueError("phantom.malignant_fraction + phantom.normal_fraction must lie in [0, 1]")

  @property
  def devices(self) -> tuple[Device, ...]:
    return DEVICES[self.first_device:self.first_device + self.num_devices]

  def case_labels(self, case: int) -> tuple[str, int]:
    """(pathology, device index): a cheap draw, so plans (and splits) need no rendering."""
    r = np.random.default_rng([self.seed, case, 0]).uniform()
    pathology = "normal" if r < self.normal_fraction else \
        "malignant" if r < self.normal_fraction + self.malignant_fraction else "benign"
    return pathology, int(np.random.default_rng([self.seed, case, 1]).integers(self.num_devices))

  def plan(self) -> base.Plan:
    items = []
    for i in range(self.num_examples):
      case = i // self.views_per_case
      pathology, dev = self.case_labels(case)
      key = f"phantom-{self.seed}-{i:08d}"
      items.append(base.Item(key=key, source_file="", case_id=f"phantom-{self.seed}-case{case:07d}",
                             pathology=pathology, payload={"index": i, "case": case, "device": dev}))
    return base.Plan(items=items, vocab=schema.Vocab.from_values(
        devices=[d.name for d in self.devices],
        histologies=["cyst", "fibroadenoma", "invasive ductal carcinoma", "invasive lobular carcinoma"]))

  def example(self, index: int) -> schema.Example:
    case = index // self.views_per_case
    pathology, dev = self.case_labels(case)
    case_rng = np.random.default_rng([self.seed, case, 2])
    d = draw_case(case_rng, pathology)
    image, mask = render(case_rng, np.random.default_rng([self.seed, index, 3]), self.size, self.devices[dev], d)
    boxes = base.boxes_from_mask(mask, per_component=False)
    if pathology != "normal" and not len(boxes):
      raise base.Reject("empty_mask", f"phantom example {index}: lesion fell outside the image")
    return schema.Example(
        id=f"phantom-{self.seed}-{index:08d}", image=image, mask=mask, boxes=boxes, pathology=pathology,
        device=self.devices[dev].name, birads=birads_of(d), histology=histology_of(d),
        case_id=f"phantom-{self.seed}-case{case:07d}", source_dataset=self.name)

  def load(self, item: base.Item):
    ex = self.example(item.payload["index"])
    ex.sha256 = hashlib.sha256(ex.image.tobytes()).hexdigest()
    return ex, []
