"""Content-aware staleness: a dataset or weights file replaced at the same path changes the
config hash of the stages that read it, and only theirs."""

import os
import time

import pyarrow as pa
import pytest

from scope_ray.config import JobConfig
from scope_ray.identity import MISSING, input_identity
from scope_ray.storage import ResultsRoot


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "data"), None
    bucket, endpoint = request.getfixturevalue("s3_bucket")
    return f"{bucket}/data", endpoint


def _put(uri: str, rel: str, data: bytes, endpoint) -> None:
    from scope_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(uri, endpoint)
    if not uri.startswith("s3://"):
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
    fs.pipe_file(f"{path}/{rel}", data)


def test_identity_changes_when_a_file_is_replaced_added_or_removed(where):
    uri, endpoint = where
    assert input_identity(uri, endpoint) == MISSING
    _put(uri, "n01/a.jpg", b"aaaa", endpoint)
    _put(uri, "n02/b.jpg", b"bbbb", endpoint)
    first = input_identity(uri, endpoint)
    assert first != MISSING and input_identity(uri, endpoint) == first  # stable when nothing changed
    time.sleep(0.01)  # a new modification time locally
    _put(uri, "n01/a.jpg", b"AAAA", endpoint)  # same name, same size, other content
    replaced = input_identity(uri, endpoint)
    assert replaced != first
    _put(uri, "n03/c.jpg", b"c", endpoint)
    assert input_identity(uri, endpoint) != replaced
    # A single file (a weights checkpoint) works the same way.
    assert input_identity(f"{uri}/n03/c.jpg", endpoint) != MISSING


def test_a_replaced_dataset_or_weights_file_reruns_only_the_stages_that_read_it(tmp_path):
    from scope_ray.stages.extract import config_hash as extract_hash

    imagenet, nyud = tmp_path / "imagenet", tmp_path / "nyud"
    for d in (imagenet / "n01", nyud):
        d.mkdir(parents=True)
    (imagenet / "n01" / "a.jpg").write_bytes(b"one")
    (nyud / "x.parquet").write_bytes(b"one")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"w1")

    def job() -> JobConfig:  # a fresh job, as a re-run loads it
        return JobConfig.model_validate({
            "model": {"weights": str(weights)},
            "data": {"imagenet": {"train": {"format": "folder", "path": str(imagenet)}},
                     "nyud": {"train": {"format": "parquet", "path": str(nyud)}}},
            "storage": {"root": str(tmp_path / "results")}})

    root = ResultsRoot(str(tmp_path / "results"))
    stage = root.stage("demo-vit-tiny", "extract")
    stage.write_part("t", "p", pa.table({"x": [1]}))
    stage.commit(extract_hash(job()), {}, {"t": 1})
    assert stage.is_complete(extract_hash(job()))  # unchanged inputs: skipped on a re-run

    (nyud / "x.parquet").write_bytes(b"two")  # extraction does not read nyud
    assert stage.is_complete(extract_hash(job()))
    time.sleep(0.01)
    (imagenet / "n01" / "a.jpg").write_bytes(b"two")  # replaced in place: same path, same size
    changed = job()
    assert not stage.is_complete(extract_hash(changed))

    stage.commit(extract_hash(changed), {}, {"t": 1})
    time.sleep(0.01)
    weights.write_bytes(b"w2")
    assert not stage.is_complete(extract_hash(job()))


def test_an_imported_sae_and_its_input_mean_are_in_the_train_sae_hash(tmp_path):
    """sae.source: the SAE file's content and the content of the input mean folded into it name the
    train-sae result, so replacing either in place re-imports (and redoes what reads the SAE)."""
    from scope_ray.pipeline import train_sae_hash

    sae, mean = tmp_path / "sae.pt", tmp_path / "act_mean.safetensors"
    sae.write_bytes(b"sae-1")
    mean.write_bytes(b"mean-1")

    def job() -> JobConfig:
        return JobConfig.model_validate({
            "sae": {"source": {"format": "saev", "path": str(sae),
                               "input_normalization": {"scale": 0.5, "mean": str(mean)}}},
            "storage": {"root": str(tmp_path / "results")}})

    first = train_sae_hash(job())
    assert train_sae_hash(job()) == first
    time.sleep(0.01)
    mean.write_bytes(b"mean-2")  # same path, same size
    second = train_sae_hash(job())
    assert second != first
    time.sleep(0.01)
    sae.write_bytes(b"sae-2")
    assert train_sae_hash(job()) not in (first, second)
