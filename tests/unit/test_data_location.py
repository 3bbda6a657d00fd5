"""Data locations (data/location.py) without a store: how a URI resolves (endpoint and region from the URI's
query or the environment, errors naming the field), and the upload of a prepared folder (data/upload.py):
the manifest goes last, so an upload cut off half-way leaves nothing that looks prepared."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from data.location import Location, LocationError, child_uri, is_uri, resolve, s3_options
from data.upload import check_out_dir, local_files, upload_prepared

_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture()
def clean_env(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _s3_settings(loc: Location) -> dict:
    """The options an S3FileSystem was built with (what Ray pickles to the workers: no credentials)."""
    return loc.filesystem.__reduce__()[1][0]


def test_s3_endpoint_and_region_from_the_environment(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    loc = resolve("s3://bucket/data/pydoc/")
    assert loc.remote and loc.path == "bucket/data/pydoc" and loc.uri == "s3://bucket/data/pydoc"
    settings = _s3_settings(loc)
    assert settings["endpoint_override"] == "http://generic:1" and settings["region"] == "eu-west-3"
    assert settings["access_key"] is None and settings["secret_key"] is None
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")  # the S3-specific name wins
    clean_env.setenv("AWS_REGION", "ap-south-1")
    settings = _s3_settings(resolve("s3://bucket/data/pydoc"))
    assert settings["endpoint_override"] == "http://s3-only:2" and settings["region"] == "ap-south-1"


def test_s3_endpoint_from_the_query_travels_with_every_file(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://env:1")
    folder = "s3://bucket/prep?region=us-east-1&endpoint_override=http://minio:9000"
    loc = resolve(folder)
    assert _s3_settings(loc)["endpoint_override"] == "http://minio:9000"  # the URI wins over the environment
    assert loc.shown == "s3://bucket/prep"  # messages name the folder without its options
    shard = child_uri(folder, "train/part-00000.parquet")
    assert shard == "s3://bucket/prep/train/part-00000.parquet?endpoint_override=http://minio:9000&region=us-east-1"
    again = resolve(shard)  # what a worker does with the URI it gets
    assert again.path == "bucket/prep/train/part-00000.parquet" and again.filesystem == loc.filesystem
    assert s3_options({"allow_bucket_creation": "true", "connect_timeout": "2"}) == {
        "allow_bucket_creation": True, "connect_timeout": 2.0, "endpoint_override": "http://env:1"}


def test_local_paths_are_absolute_and_keep_their_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("data/pydoc")
    assert not loc.remote and isinstance(loc.filesystem, pafs.LocalFileSystem)
    assert loc.path == loc.uri == str(tmp_path / "data/pydoc") and loc.shown == "data/pydoc"
    assert loc.join("train", "part-00000.parquet").shown == str(Path("data/pydoc/train/part-00000.parquet"))
    assert resolve(f"file://{tmp_path}/x").path == str(tmp_path / "x")
    assert not is_uri("data/pydoc") and not is_uri("file:///x") and is_uri("s3://b/x") and is_uri("gs://b/x")


@pytest.mark.parametrize(("spec", "match"), [
    ("s3:///prefix", r"data\.path='s3:///prefix': no bucket; expected s3://BUCKET/PREFIX"),
    ("nosuch://bucket/x", r"data\.path='nosuch://bucket/x': .*Unrecognized filesystem.*Give a local path, s3://"),
    ("s3://bucket/x?aws_secret_access_key=k", r"data\.path='s3://bucket/x': option 'aws_secret_access_key' is not "
                                             r"supported.*Credentials never go into a URI"),
    ("s3://bucket/x?allow_bucket_creation=maybe", r"allow_bucket_creation='maybe': expected true or false"),
])
def test_bad_uris_name_the_field_and_the_fix(clean_env, spec, match):
    with pytest.raises(LocationError, match=match):
        resolve(spec, what="data.path")


# ---- upload of a prepared folder ----------------------------------------------------------------------------


class _FailingStore(pafs.FileSystemHandler):
    """The local filesystem, except that the ``fail_at``-th file written fails (a connection lost mid-upload)."""

    def __init__(self, fail_at: int):
        self.fs, self.fail_at, self.writes = pafs.LocalFileSystem(), fail_at, 0

    def open_output_stream(self, path, metadata):
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError("connection reset by peer")
        return self.fs.open_output_stream(path)

    def get_type_name(self):
        return "failing"

    def normalize_path(self, path):
        return path

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def _prepared(folder: Path, shards: int, tag: str) -> Path:
    for i in range(shards):
        (folder / "train").mkdir(parents=True, exist_ok=True)
        (folder / "train" / f"part-{i:05d}.parquet").write_text(f"{tag} shard {i}")
    (folder / "tokenizer.json").write_text(f"{tag} tokenizer")
    (folder / "manifest.json").write_text(f"{tag} manifest")
    return folder


def _store(root: Path, fail_at: int = 0) -> Location:
    fs = pafs.PyFileSystem(_FailingStore(fail_at)) if fail_at else pafs.LocalFileSystem()
    return Location(fs, str(root), remote=False, shown=str(root))


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_is_uploaded_last(tmp_path):
    src = _prepared(tmp_path / "src", 3, "new")
    assert local_files(src)[-1] == "manifest.json" and len(local_files(src)) == 5
    upload_prepared(src, _store(tmp_path / "out"), overwrite=False)
    assert _tree(tmp_path / "out") == _tree(src)


@pytest.mark.parametrize("fail_at", [1, 3, 5])  # the first shard, a later one, the manifest itself
def test_an_interrupted_upload_leaves_no_manifest(tmp_path, fail_at):
    src = _prepared(tmp_path / "src", 3, "new")
    out = tmp_path / "out"
    with pytest.raises(OSError, match="connection reset"):
        upload_prepared(src, _store(out, fail_at), overwrite=False)
    written = _tree(out) if out.exists() else {}
    assert "manifest.json" not in written and len(written) == fail_at - 1


def test_an_interrupted_overwrite_leaves_no_manifest_old_or_new(tmp_path):
    out = _prepared(tmp_path / "out", 2, "old")
    src = _prepared(tmp_path / "src", 2, "new")
    with pytest.raises(OSError):
        upload_prepared(src, _store(out, 3), overwrite=True)  # tokenizer.json, part-00000, then part-00001 fails
    tree = _tree(out)
    assert "manifest.json" not in tree, "the old manifest would describe shards that were replaced"
    assert tree["train/part-00000.parquet"] == "new shard 0" and tree["train/part-00001.parquet"] == "old shard 1"


def test_overwrite_replaces_a_prepared_folder_and_drops_its_stale_shards(tmp_path):
    out = _prepared(tmp_path / "out", 4, "old")
    src = _prepared(tmp_path / "src", 2, "new")
    upload_prepared(src, _store(out), overwrite=True)
    assert _tree(out) == _tree(src)  # part-00002/3 of the larger old preparation are gone


def test_a_folder_of_the_users_is_never_replaced(tmp_path):
    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "a.txt").write_text("mine")
    src = _prepared(tmp_path / "src", 1, "new")
    with pytest.raises(FileExistsError, match="no manifest.json.*nothing was deleted"):
        upload_prepared(src, _store(user), overwrite=True)
    with pytest.raises(FileExistsError, match="not empty; choose another out_dir or set overwrite=True"):
        check_out_dir(_store(_prepared(tmp_path / "prep", 1, "old")), overwrite=False)
    assert _tree(user) == {"notes/a.txt": "mine"}


def test_submit_accepts_data_on_an_object_store():
    from cluster.cli_ops import check_train_config

    repo = Path(__file__).resolve().parents[2]
    problems = check_train_config(str(repo / "configs/debug-lm.yaml"), ["data.path=s3://bucket/data/pydoc-64"])
    assert not [p for p in problems if "data.path" in p], problems
    problems = check_train_config(str(repo / "configs/debug-lm.yaml"), ["data.path=data/pydoc-64"])
    assert any(p.startswith("data.path='data/pydoc-64' is relative") for p in problems), problems


def test_a_shard_the_store_cannot_serve_is_named_as_a_store_problem(clean_env, monkeypatch):
    """Inside a Ray Data task: a shard URI whose endpoint does not answer is a store problem (endpoint, credentials on
    every node, then --resume), not a damaged file."""
    import pyarrow as pa

    from data.stream import _ReadPieces

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    uri = ("s3://bucket/train/part-00000.parquet?endpoint_override=http://127.0.0.1:9&region=us-east-1"
           "&connect_timeout=0.5&request_timeout=0.5")  # port 9: nothing listens
    pieces = pa.table({"path": [uri], "lo": [0], "hi": [4], "first_row_id": [0]})
    with pytest.raises(ValueError) as e:
        _ReadPieces(["tokens", "row_id"])(pieces)
    msg = str(e.value)
    assert "cannot be read from its store" in msg and "AWS_ENDPOINT_URL" in msg and "--resume" in msg
    assert "damaged" not in msg
