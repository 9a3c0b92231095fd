"""No credential in what a run leaves behind: a real extraction on an s3:// root (moto on
loopback, data on S3 too), then every stored object and every Ray log file of the session is
read whole and searched for the test secret key and access key id."""

from __future__ import annotations

import pytest

from scope_ray.config import load_config
from scope_ray.data.synthetic import write_synthetic
from scope_ray.stages.extract import run_extract
from scope_ray.storage import ResultsRoot
from tests.secrets_scan import dir_files, find_credentials, plant, ray_logs_dir, root_objects, scan_dir, scan_root

pytestmark = pytest.mark.slow


def test_s3_run_stores_and_logs_no_credentials_and_the_scan_would_see_one(ray_local, s3_bucket, capfd, tmp_path):
    bucket, endpoint = s3_bucket
    sources = write_synthetic(f"{bucket}/data", n_train=4, n_val=2, size=112, num_classes=2, seed=3,
                              formats=("parquet",), endpoint_url=endpoint)["imagenet"]
    spec = {"data": {"imagenet": {"train": sources["parquet"]["train"], "val": sources["parquet"]["val"]}},
            "storage": {"root": f"{bucket}/results", "endpoint_url": endpoint}}
    job = load_config(spec, ["extract.batch_size=4"])
    assert not run_extract(job, ResultsRoot(job.storage.root, endpoint), progress=False, log=print).skipped

    whole_bucket = ResultsRoot(bucket, endpoint)  # results and the data the run read
    objects = root_objects(whole_bucket)
    assert any(o.endswith("extract/manifest.json") for o in objects) and any("train_tokens/" in o for o in objects)
    assert scan_root(whole_bucket) == []
    logs = ray_logs_dir(ray_local)
    assert any(p.name.startswith("worker-") for p in dir_files(logs))  # the actors' logs are there
    assert scan_dir(logs) == []
    out, err = capfd.readouterr()
    assert "extract" in out  # the stage's own log lines were captured, and scanned next
    assert find_credentials([("captured stdout/stderr", (out + err).encode())]) == []

    # The scans can fail: a copy of a real part file and of a real worker log, each with the
    # credentials planted, are found, and nothing else is.
    part = next(o for o in objects if o.endswith(".parquet") and "train_tokens/" in o)
    whole_bucket.fs.pipe_file(f"{whole_bucket.path}/planted/copy.parquet", plant(whole_bucket.fs.cat_file(part)))
    copy = f"{whole_bucket.path}/planted/copy.parquet"
    assert scan_root(ResultsRoot(f"{bucket}/planted", endpoint)) == [
        f"{copy}: AWS_SECRET_ACCESS_KEY", f"{copy}: AWS_ACCESS_KEY_ID"]
    log = next(p for p in dir_files(logs) if p.name.startswith("worker-") and p.stat().st_size > 0)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / log.name).write_bytes(plant(log.read_bytes()))
    assert len(scan_dir(tmp_path / "logs")) == 2
