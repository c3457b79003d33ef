"""`ferflow pipeline submit` against a local HTTP server that imitates the part of the KFP
v2beta1 API that kfp.Client uses (healthz, experiments, pipelines and their multipart
uploads, pipeline versions, runs, recurring runs), keeps state between calls as the real
server does, and records what it receives.

Most tests submit from a throwaway git checkout whose `pipelines/ferflow_pipeline.py` is a
one-task stub that writes its CompileOptions into the YAML: the version names then come
from a commit the test made, and every option can be checked without compiling the real
pipeline. One test submits the real pipeline and checks the cluster settings in it."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import typer.main
import yaml

from ferflow.pipeline.spec import CompileOptions

from . import REPO

BIN = Path(sys.executable).parent
TOKEN = "kfp-bearer-T0K3N-do-not-print"
API = "/apis/v2beta1"
UPLOAD_SUFFIXES = (".yaml", ".yml", ".json", ".zip", ".tar.gz", ".tgz")  # the server's ReadPipelineFile

STUB_PIPELINE = '''"""Test stub: one task; the compile options go to the pipeline's description."""
import dataclasses
import json

from kfp import dsl


@dsl.component(base_image="python:3.11-slim")
def echo(text: str) -> str:
    return text


def build(options, defaults):
    @dsl.pipeline(name="ferflow", description=json.dumps(dataclasses.asdict(options), sort_keys=True))
    def ferflow(image: str = options.image, archives: dict = defaults.archives, datasets: list = defaults.datasets,
                models: list = defaults.models, matrix: list = defaults.matrix, experiment: str = defaults.experiment,
                registered_models: dict = defaults.registered_models, overrides: list = []):
        echo(text=experiment)

    return ferflow
'''


class FakeKfp(BaseHTTPRequestHandler):
    requests: list = []
    state: dict = {}

    @classmethod
    def reset(cls):
        cls.requests = []
        cls.state = {"experiments": [], "pipelines": [], "versions": {}}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._reply({"error": message, "code": status, "message": message}, status)

    def _record(self, **fields) -> dict:
        url = urlsplit(self.path)
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                 "auth": self.headers.get("Authorization"), "body": None, "upload": None, **fields}
        self.requests.append(entry)
        return entry

    @staticmethod
    def _matching(items: list, query: dict) -> list:
        """The API's `filter` (JSON predicates, as kfp.Client sends them): only EQUALS on
        display_name, which is all the real server needs here; anything else is a 400."""
        if "filter" not in query:
            return items
        predicates = json.loads(query["filter"][0])["predicates"]
        for p in predicates:
            if p.get("key") != "display_name" or p.get("operation") not in (1, "EQUALS"):
                raise ValueError(f"unsupported filter {p}")
        return [i for i in items if all(i["display_name"] == p["stringValue"] for p in predicates)]

    def do_GET(self):
        entry = self._record()
        path, query = entry["path"], entry["query"]
        try:
            if path == f"{API}/healthz":
                return self._reply({"multi_user": False})
            if path == f"{API}/experiments":
                found = self._matching(self.state["experiments"], query)
                return self._reply({"experiments": found, "total_size": len(found)})
            if path == f"{API}/pipelines":
                found = [p for p in self._matching(self.state["pipelines"], query)
                         if p.get("namespace", "") == query.get("namespace", [""])[0]]
                return self._reply({"pipelines": found, "total_size": len(found)})
            if path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
                pipeline_id = path.split("/")[-2]
                if pipeline_id not in self.state["versions"]:
                    return self._error(404, "pipeline not found")
                found = self._matching(self.state["versions"][pipeline_id], query)
                return self._reply({"pipeline_versions": found, "total_size": len(found)})
        except ValueError as exc:
            return self._error(400, str(exc))
        self._error(404, "not found")

    def _upload(self, entry: dict):
        """A multipart/form-data body holding the file as `uploadfile` (the server's FormFileKey)."""
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        message = BytesParser(policy=policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw)
        files = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        part = files.get("uploadfile")
        if part is None or not part.get_filename() or not part.get_filename().endswith(UPLOAD_SUFFIXES):
            return None
        entry["upload"] = {"filename": part.get_filename(), "content": part.get_payload(decode=True).decode()}
        return entry["upload"]["content"]

    @staticmethod
    def _spec_struct(text: str) -> dict:
        """What the server returns as a version's pipeline_spec (YamlStringToPipelineSpecStruct)."""
        docs = [d for d in yaml.safe_load_all(text) if d]
        return docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}

    def _new_version(self, pipeline_id: str, name: str, description: str, text: str) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"ver-{uuid.uuid4().hex[:8]}", "name": name,
                   "display_name": name, "description": description, "pipeline_spec": self._spec_struct(text)}
        self.state["versions"][pipeline_id].append(version)
        return version

    def do_POST(self):
        path = urlsplit(self.path).path
        if path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
            entry = self._record()
            query = {k: v[0] for k, v in entry["query"].items()}
            text = self._upload(entry)
            if text is None:
                return self._error(400, "Failed to read pipeline from file")
            name, description = query.get("name", ""), query.get("description", "")
            if path.endswith("/upload"):
                namespace = query.get("namespace", "")
                if any(p["display_name"] == name and p.get("namespace", "") == namespace
                       for p in self.state["pipelines"]):
                    return self._error(409, "Failed to create a pipeline and a pipeline version")
                pipeline = {"pipeline_id": f"pipe-{uuid.uuid4().hex[:8]}", "name": name, "display_name": name,
                            "description": description, "namespace": namespace}
                self.state["pipelines"].append(pipeline)
                self.state["versions"][pipeline["pipeline_id"]] = []
                self._new_version(pipeline["pipeline_id"], name, description, text)  # as the server does
                return self._reply(pipeline)
            pipeline_id = query.get("pipelineid", "")
            if pipeline_id not in self.state["versions"]:
                return self._error(400, "Failed to create a pipeline version")
            if any(v["name"] == name for v in self.state["versions"][pipeline_id]):
                return self._error(409, "Failed to create a pipeline version")
            return self._reply(self._new_version(pipeline_id, name, description, text))

        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._record(body=body)
        if path == f"{API}/experiments":
            experiment = {"experiment_id": f"exp-{len(self.state['experiments']) + 1:04d}",
                          "display_name": body.get("display_name"), "namespace": body.get("namespace")}
            self.state["experiments"].append(experiment)
            return self._reply(experiment)
        if path == f"{API}/runs":
            return self._reply({"run_id": "run-abc-123", "display_name": body.get("display_name"),
                                "experiment_id": body.get("experiment_id"), "state": "PENDING"})
        if path == f"{API}/recurringruns":
            return self._reply({"recurring_run_id": "rec-xyz-789", "display_name": body.get("display_name"),
                                "experiment_id": body.get("experiment_id"), "status": "ENABLED",
                                "mode": body.get("mode")})
        self._error(404, "not found")


@pytest.fixture
def kfp_server():
    FakeKfp.reset()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp.requests
    finally:
        server.shutdown()
        server.server_close()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.invalid",
                           "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def stub_checkout(tmp_path_factory) -> tuple[Path, str]:
    """(a committed checkout with the stub pipeline and the project's params.yaml, its commit)."""
    repo = tmp_path_factory.mktemp("checkout")
    (repo / "pipelines").mkdir()
    (repo / "pipelines" / "ferflow_pipeline.py").write_text(STUB_PIPELINE)
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "stub")
    return repo, _git(repo, "rev-parse", "HEAD").strip()


def _ferflow(args, tmp_path, cwd=REPO, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KF_PIPELINES", "KFP_", "FERFLOW_"))}
    full_env.update(HOME=str(tmp_path), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **env)  # no ~/.config/kfp
    done = subprocess.run([str(BIN / "ferflow"), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=180)
    assert TOKEN not in done.stdout + done.stderr
    return done


def _posts(requests, path):
    return [r for r in requests if r["method"] == "POST" and r["path"] == f"{API}{path}"]


def _stub_options(upload: dict) -> dict:
    return json.loads(next(yaml.safe_load_all(upload["content"]))["pipelineInfo"]["description"])


def _expected_arguments(params: Path, overrides: list) -> dict:
    from ferflow.pipeline.submit import run_arguments

    return run_arguments(params, overrides)


# ---------------------------------------------------------------------------- the CLI options

def test_every_compile_option_is_a_flag_of_compile_and_submit():
    """Fails when a CompileOptions field has no option (or no help row in COMPILE_FLAGS)."""
    from ferflow.pipeline.cli import COMPILE_FLAGS, compile_flag, pipeline_app

    group = typer.main.get_command(pipeline_app)
    fields = dataclasses.fields(CompileOptions)
    assert sorted(COMPILE_FLAGS) == sorted(f.name for f in fields), "add a COMPILE_FLAGS row per field"
    for command in ("compile", "submit"):
        options = {opt: p for p in group.commands[command].params for opt in p.opts}
        for field in fields:
            param = options.get(compile_flag(field.name))
            assert param is not None, f"{command} has no {compile_flag(field.name)}"
            if field.default is not dataclasses.MISSING and field.name != "node_selector":
                assert param.default == field.default, f"{command} {param.opts}: default is not CompileOptions'"


def _all_options_args() -> tuple[list, CompileOptions]:
    """CLI arguments giving every compile option a value other than its default, and the
    CompileOptions they must make (scalar fields by type, so a new field is covered)."""
    from ferflow.pipeline.cli import compile_flag

    values = {}
    for field in dataclasses.fields(CompileOptions):
        default = getattr(CompileOptions(), field.name)
        if field.name == "image":
            values[field.name] = "registry.example/ferflow:every-option"
        elif field.name == "node_selector":
            values[field.name] = (("nvidia.com/gpu.product", "H200"), ("zone", "z1"))
        elif isinstance(default, bool):
            values[field.name] = not default
        elif isinstance(default, (int, float)):
            values[field.name] = default + (2 if isinstance(default, int) else 0.5)
        else:
            values[field.name] = f"{default}x" if default else "set-by-test"
    args = []
    for name, value in values.items():
        if name == "node_selector":
            for label, v in value:
                args += [compile_flag(name), f"{label}={v}"]
        elif isinstance(value, bool):
            args.append(compile_flag(name) if value else "--no-" + compile_flag(name)[2:])
        else:
            args += [compile_flag(name), str(value)]
    return args, CompileOptions(**values)


# ---------------------------------------------------------------------------- upload, version, run

def test_submit_uploads_a_version_per_commit_and_reuses_it(kfp_server, stub_checkout, tmp_path):
    host, requests = kfp_server
    repo, commit = stub_checkout
    overrides = ["train.full_stage.epochs=2", "train.models=[demo_tiny]"]
    args = ["pipeline", "submit", "--host", host, "--experiment", "ferflow-ci", "--run-name", "ci-1",
            *[a for o in overrides for a in ("--set", o)]]
    options_args, expected_options = _all_options_args()

    done = _ferflow([*args, *options_args], tmp_path, cwd=repo, KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{host}/#/runs/details/run-abc-123"
    assert f"version {commit[:12]} (uploaded)" in done.stderr

    # The pipeline was looked up by name, then uploaded (multipart, with its name).
    lookups = [r for r in requests if r["method"] == "GET" and r["path"] == f"{API}/pipelines"]
    assert json.loads(lookups[0]["query"]["filter"][0])["predicates"][0]["stringValue"] == "ferflow"
    [pipeline_upload] = _posts(requests, "/pipelines/upload")
    assert pipeline_upload["query"]["name"] == ["ferflow"] and pipeline_upload["upload"]["filename"].endswith(".yaml")
    pipeline_id = FakeKfp.state["pipelines"][0]["pipeline_id"]

    # One version named by the commit, described by commit and image; it carries every option.
    [version_upload] = _posts(requests, "/pipelines/upload_version")
    query = {k: v[0] for k, v in version_upload["query"].items()}
    assert query["name"] == commit[:12] and query["pipelineid"] == pipeline_id
    assert f"commit {commit}" in query["description"] and expected_options.image in query["description"]
    assert _stub_options(version_upload["upload"]) == json.loads(json.dumps(dataclasses.asdict(expected_options)))
    version_id = next(v for v in FakeKfp.state["versions"][pipeline_id] if v["name"] == commit[:12])[
        "pipeline_version_id"]

    # The run starts from that version, in the experiment, with today's arguments.
    [run] = _posts(requests, "/runs")
    body = run["body"]
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id, "pipeline_version_id": version_id}
    assert "pipeline_spec" not in body or body["pipeline_spec"] is None
    assert body["display_name"] == "ci-1" and body["experiment_id"] == "exp-0001"
    assert _posts(requests, "/experiments")[0]["body"]["display_name"] == "ferflow-ci"
    arguments = body["runtime_config"]["parameters"]
    assert arguments == _expected_arguments(repo / "params.yaml", overrides)
    assert arguments["overrides"] == overrides and arguments["models"] == ["demo_tiny"]
    assert {r["auth"] for r in requests} == {f"Bearer {TOKEN}"}

    # The same commit and options again: nothing uploaded, the experiment and version reused.
    requests.clear()
    done = _ferflow([*args, *options_args], tmp_path, cwd=repo, KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert f"version {commit[:12]} (reused)" in done.stderr
    assert not _posts(requests, "/pipelines/upload") and not _posts(requests, "/pipelines/upload_version")
    assert not _posts(requests, "/experiments")
    [run] = _posts(requests, "/runs")
    assert run["body"]["pipeline_version_reference"]["pipeline_version_id"] == version_id
    assert run["body"]["experiment_id"] == "exp-0001"

    # The same commit with other options: a second version, named by its content.
    requests.clear()
    done = _ferflow([*args, "--gpus", "2"], tmp_path, cwd=repo, KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    [version_upload] = _posts(requests, "/pipelines/upload_version")
    name = version_upload["query"]["name"][0]
    digest = hashlib.sha256(version_upload["upload"]["content"].encode()).hexdigest()
    assert name == f"{commit[:12]}-{digest[:8]}" and _stub_options(version_upload["upload"])["gpus"] == 2
    assert not _posts(requests, "/pipelines/upload")


def test_schedule_creates_a_recurring_run_of_the_version(kfp_server, stub_checkout, tmp_path):
    host, requests = kfp_server
    repo, commit = stub_checkout
    done = _ferflow(["pipeline", "submit", "--host", host, "--schedule", "0 0 3 * * *", "--max-concurrency", "2",
                     "--schedule-name", "nightly", "--pipeline-name", "ferflow-nightly"], tmp_path, cwd=repo,
                    KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{host}/#/recurringrun/details/rec-xyz-789"
    assert not _posts(requests, "/runs")
    [recurring] = _posts(requests, "/recurringruns")
    body = recurring["body"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(body["max_concurrency"]) == 2 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-0001"
    [pipeline] = FakeKfp.state["pipelines"]
    assert pipeline["display_name"] == "ferflow-nightly"
    version = next(v for v in FakeKfp.state["versions"][pipeline["pipeline_id"]] if v["name"] == commit[:12])
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                  "pipeline_version_id": version["pipeline_version_id"]}
    assert body["runtime_config"]["parameters"] == _expected_arguments(repo / "params.yaml", [])
    assert _posts(requests, "/experiments")[0]["body"]["display_name"] == body["runtime_config"]["parameters"][
        "experiment"]


@pytest.mark.parametrize("cron", ["0 3 * * *", "0 0 3 * * * *", "0 0 3; * * *"])
def test_a_bad_cron_fails_before_any_request(kfp_server, stub_checkout, tmp_path, cron):
    host, requests = kfp_server
    done = _ferflow(["pipeline", "submit", "--host", host, "--schedule", cron], tmp_path, cwd=stub_checkout[0],
                    KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 2 and "--schedule" in done.stderr and "Traceback" not in done.stderr
    assert requests == []


def test_validate_cron():
    from ferflow.errors import FerflowError
    from ferflow.pipeline.submit import validate_cron

    for good in ("0 0 3 * * *", "0 */15 * * * ?", "30 0 9 ? * MON-FRI", "0 0 0 1,15 JAN-JUN *"):
        assert validate_cron(f"  {good} ") == good
    with pytest.raises(FerflowError, match="6 fields, seconds first"):
        validate_cron("0 3 * * *")
    with pytest.raises(FerflowError, match="hour field 'x'"):
        validate_cron("0 0 x * * *")


def test_an_existing_version_is_the_same_by_hash_or_by_spec():
    """A version this tool uploaded records the content hash in its description; any other
    is compared by the spec the API returns for it (wrapped when the YAML has a platform doc)."""
    from types import SimpleNamespace

    from ferflow.pipeline.submit import same_content

    docs = [{"pipelineInfo": {"name": "ferflow"}, "sdkVersion": "kfp-2.17.3"}, {"platforms": {"kubernetes": {}}}]
    assert same_content(SimpleNamespace(description="ferflow commit c; sha256 abc", pipeline_spec=None), "abc", docs)
    wrapped = {"pipeline_spec": docs[0], "platform_spec": docs[1]}
    assert same_content(SimpleNamespace(description="by hand", pipeline_spec=wrapped), "abc", docs)
    assert not same_content(SimpleNamespace(description="by hand", pipeline_spec=docs[0]), "abc", docs)
    assert same_content(SimpleNamespace(description=None, pipeline_spec=docs[0]), "abc", docs[:1])
    other = {"pipeline_spec": {**docs[0], "sdkVersion": "kfp-2.0.0"}, "platform_spec": docs[1]}
    assert not same_content(SimpleNamespace(description="", pipeline_spec=other), "abc", docs)


def test_package_is_versioned_by_its_content(kfp_server, stub_checkout, tmp_path):
    host, requests = kfp_server
    repo, _ = stub_checkout
    package = tmp_path / "given.yaml"
    done = _ferflow(["pipeline", "compile", "--out", str(package), "--image", "registry.example/ferflow:pkg"],
                    tmp_path, cwd=repo)
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(package.read_bytes()).hexdigest()

    refused = _ferflow(["pipeline", "submit", "--host", host, "--package", str(package), "--gpus", "2"], tmp_path,
                       cwd=repo)
    assert refused.returncode == 1 and "--package" in refused.stderr and requests == []

    done = _ferflow(["pipeline", "submit", "--host", host, "--package", str(package)], tmp_path, cwd=repo,
                    KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    [version_upload] = _posts(requests, "/pipelines/upload_version")
    assert version_upload["query"]["name"] == [f"sha256-{digest[:12]}"]
    assert version_upload["upload"]["content"] == package.read_text()
    assert "registry.example/ferflow:pkg" in version_upload["query"]["description"][0]


def test_version_names_follow_the_checkout(tmp_path):
    from ferflow.pipeline.submit import git_version

    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_version(repo) is None  # not a checkout: the content names the version
    (repo / "a.txt").write_text("one\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "one")
    commit = _git(repo, "rev-parse", "HEAD").strip()
    assert git_version(repo)[0] == commit[:12]
    (repo / "untracked.txt").write_text("not part of the commit or of the diff\n")
    assert git_version(repo)[0] == commit[:12]

    (repo / "a.txt").write_text("two\n")
    dirty_two = git_version(repo)[0]
    (repo / "a.txt").write_text("three\n")
    dirty_three = git_version(repo)[0]
    assert dirty_two.startswith(f"{commit[:12]}-dirty-") and dirty_three.startswith(f"{commit[:12]}-dirty-")
    assert dirty_two != dirty_three  # two different dirty trees never share a name
    (repo / "a.txt").write_text("two\n")
    assert git_version(repo)[0] == dirty_two


# ---------------------------------------------------------------------------- the real pipeline

def _dicts(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dicts(value)


def test_real_pipeline_carries_the_cluster_options(kfp_server, tmp_path):
    """The project's pipeline, compiled by submit with cluster options (the checkout may be
    dirty while it is being worked on: its version is then `<commit>-dirty-<hash>`)."""
    host, requests = kfp_server
    done = _ferflow(["pipeline", "submit", "--host", host, "--image", "registry.example/ferflow:ci", "--gpus", "2",
                     "--gpu-quota", "4", "--task-cpu-request", "3", "--node-selector", "nvidia.com/gpu.product=H200",
                     "--mlflow-secret", "mlflow-ci", "--s3-secret", "s3-ci"], tmp_path, KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    head = _git(REPO, "rev-parse", "HEAD").strip()
    [version_upload] = _posts(requests, "/pipelines/upload_version")
    name = version_upload["query"]["name"][0]
    assert name == head[:12] or name.startswith(f"{head[:12]}-dirty-")

    spec, platform = list(yaml.safe_load_all(version_upload["upload"]["content"]))
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "registry.example/ferflow:ci"
    resources = [d["resources"] for d in _dicts(spec["deploymentSpec"]) if "resources" in d]
    assert {r["accelerator"]["resourceCount"] for r in resources if "accelerator" in r} == {"2"}
    assert "3" in {r.get("resourceCpuRequest") for r in resources if "accelerator" not in r}
    assert [d["parallelismLimit"] for d in _dicts(spec) if "parallelismLimit" in d] == [2]  # 4 GPUs / 2 per task
    assert {"nvidia.com/gpu.product": "H200"} in [d["labels"] for d in _dicts(platform) if "labels" in d]
    assert {d["secretName"] for d in _dicts(platform) if "secretName" in d} == {"mlflow-ci", "s3-ci"}

    [run] = _posts(requests, "/runs")
    assert run["body"]["runtime_config"]["parameters"] == _expected_arguments(REPO / "params.yaml", [])


# ---------------------------------------------------------------------------- errors and auth

def test_submit_fails_before_any_request_on_bad_params(kfp_server, tmp_path):
    host, requests = kfp_server
    done = _ferflow(["pipeline", "submit", "--host", host, "--set", "train.batch_size=many"], tmp_path)
    assert done.returncode == 2 and "train.batch_size" in done.stderr and "Traceback" not in done.stderr
    assert requests == []


def test_submit_names_the_host_when_nothing_answers(stub_checkout, tmp_path):
    done = _ferflow(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--token-env", "MY_KFP_TOKEN"], tmp_path,
                    cwd=stub_checkout[0], MY_KFP_TOKEN=TOKEN)
    assert done.returncode == 1 and "http://127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr


def test_token_sources(monkeypatch, tmp_path):
    from ferflow.errors import FerflowError
    from ferflow.pipeline.submit import auth_kwargs

    for key in ("KFP_EXISTING_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "MY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    assert auth_kwargs() == {}
    token_file = tmp_path / "token"
    token_file.write_text("sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    credentials = auth_kwargs()["credentials"]
    assert credentials._get_token() == "sa-token"
    monkeypatch.setenv("KFP_EXISTING_TOKEN", "from-env")
    assert auth_kwargs() == {"existing_token": "from-env"}
    with pytest.raises(FerflowError, match="MY_TOKEN"):
        auth_kwargs("MY_TOKEN")
    monkeypatch.setenv("MY_TOKEN", "mine")
    assert auth_kwargs("MY_TOKEN") == {"existing_token": "mine"}
