"""ddx.logging: its small formatters, and the metric writer's TensorBoard file."""
import json
import os
import subprocess
import sys

from ddx import logging as log_lib

from testutils import ROOT


def test_hms():
  assert log_lib.hms(0) == "0:00:00"
  assert log_lib.hms(3725.9) == "1:02:05"
  assert log_lib.hms(90061) == "25:01:01"     # hours are not wrapped into days
  assert log_lib.hms(float("nan")) == "?" and log_lib.hms(float("inf")) == "?"


def test_metric_writer_writes_tensorboard_without_importing_torch(tmp_path):
  """tensorboardX imports torch when installed (torch is a test dependency
  here); the writer hides it, and the event file still holds the scalars. In a
  fresh interpreter, so that no other test has imported torch already."""
  code = (
      "import sys, json\n"
      "from ddx import logging as l\n"
      f"w = l.MetricWriter({str(tmp_path)!r})\n"
      "w.write(3, {'loss': 0.25})\n"
      "w.close()\n"
      "from tensorboardX.proto import event_pb2\n"
      "import glob, struct\n"
      "path, = glob.glob(sys.argv[1] + '/tensorboard/events*')\n"
      "buf, tags = open(path, 'rb').read(), []\n"
      "while buf:\n"
      "  n, = struct.unpack('<Q', buf[:8]); e = event_pb2.Event()\n"
      "  e.ParseFromString(buf[12:12 + n]); buf = buf[16 + n:]\n"
      "  tags += [(e.step, v.tag, v.simple_value) for v in e.summary.value]\n"
      "print(json.dumps({'torch': 'torch' in sys.modules, 'tags': tags}))\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out == {"torch": False, "tags": [[3, "loss", 0.25]]}
  assert json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).readline()) == {
      "step": 3, "loss": 0.25}
