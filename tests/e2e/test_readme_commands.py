"""Every shell command in README.md's code blocks (```bash, ```sh, ```shell, ```console) is
either run here, as written, in a demo workspace like the one `make demo` leaves (the shared
e2e repro, conftest.py), or named in SKIP with the reason it is not. A README command in
neither list fails the test, so a new one has to be classified (and an entry whose command
left the README has to go).

How the commands run: each in its own `bash -c`, from the directory the README says (`root`:
a stand-in for the repo root, holding `demo/`, `.venv` and the repo's params.yaml; `demo`: the
workspace), in the shell state the quick start leaves (the venv's bin on PATH,
MLFLOW_TRACKING_URI exported as `make demo` prints it). Placeholders the README leaves to the
user (`/path/to/…`, `<hex>`, `photos/`, `face.jpg`) are filled in; ports are made free ones."""

import json
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import start_on_free_port, stop_group, wait_ready
from ferflow.fileio import sha256_file

from .conftest import BIN, REPO, copy_demo_workspace, demo_mlflow_env

pytestmark = pytest.mark.slow
README = REPO / "README.md"
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment: an unquoted `#` at a word's start."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of the README's shell blocks in order, one line each: continuation lines
    joined, comments dropped, blanks collapsed; in console blocks only `$ ` lines (and their
    continuations) are commands, the rest is output."""
    commands = []
    for lang, body in SHELL_BLOCK.findall(text):
        pending = ""
        for raw in body.splitlines():
            if not pending:
                if lang == "console":
                    if not raw.startswith("$ "):
                        continue
                    raw = raw[2:]
                if raw.lstrip().startswith("#"):
                    continue  # a comment line; a trailing backslash in it continues nothing
            line = strip_comment(raw)
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = " ".join((pending + line).split())
            pending = ""
            if command and command not in commands:
                commands.append(command)
    return commands


@dataclass(frozen=True)
class Run:
    where: str = "demo"                      # "demo" (the workspace) or "root" (the repo root)
    expect: tuple[str, ...] = ()             # what the output holds ({root}, {demo} filled in)
    fill: dict = field(default_factory=dict)  # placeholder -> value ({root}, {demo}, {venv}, {sha256}, {port})
    then: str = ""                           # a shell snippet after it, to show its effect
    server: str = ""                         # a server, checked by the README command given here


SERVE = "mlflow models serve -m models:/ferflow-lfw-fer@champion --env-manager local -h 127.0.0.1 -p 5001"
CURL = r'''curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "{\"dataframe_records\": [{\"image\": \"$(base64 -w0 face.jpg)\"}]}"'''
PORT = {"5001": "{port}"}

RUN = {
    # Quick start: the shell the README sets up, and the demo's results and DVC commands.
    "source .venv/bin/activate": Run("root", then='echo "VIRTUAL_ENV=$VIRTUAL_ENV"; command -v ferflow dvc mlflow',
                                     expect=("VIRTUAL_ENV={venv}\n", "{venv}/bin/ferflow", "{venv}/bin/mlflow")),
    "cd demo": Run("root", then="pwd", expect=("{root}/demo",)),
    "export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlruns/mlflow.db": Run(
        then='printf "%s" "$MLFLOW_TRACKING_URI"', expect=("sqlite:///{demo}/mlruns/mlflow.db",)),
    "cat reports/results.md": Run(expect=("| LFW-FER | demo_tiny |",)),
    "dvc metrics show": Run(expect=("val_accuracy",)),
    "dvc exp show": Run(expect=("main",)),
    "dvc params diff": Run(),
    "dvc metrics diff": Run(),
    # Data: a local archive by path and sha256, from the repo root with the repo's params.
    "ferflow fetch --dataset LFW-FER --set data.archives.LFW-FER.uri=/path/to/LFW-FER.zip "
    "--set data.archives.LFW-FER.sha256=<hex>": Run(
        "root", fill={"/path/to/LFW-FER.zip": "{demo}/archives/LFW-FER.zip", "<hex>": "{sha256}"},
        then="ls data/raw", expect=("LFW-FER.zip",)),
    # DVC: the remote is set locally only.
    "dvc remote modify --local storage url s3://my-bucket/ferflow": Run(
        then="cat .dvc/config.local", expect=("s3://my-bucket/ferflow",)),
    "export AWS_ENDPOINT_URL=https://s3.example.com": Run(),
    # MLflow and serving, on the demo's models.
    "ferflow promote --dataset LFW-FER --min-delta 0.005": Run(expect=("champion",)),
    "ferflow registry --dataset LFW-FER": Run(expect=("ferflow-lfw-fer",)),
    "ferflow predict photos/ --model models:/ferflow-lfw-fer@champion --out predictions.csv": Run(
        then="head -2 predictions.csv", expect=("p_positive",)),
    "ferflow export --model models:/ferflow-lfw-fer@champion --format onnx --out fer.onnx": Run(
        then="test -s fer.onnx && echo onnx-written", expect=("onnx-written",)),
    SERVE: Run(fill=PORT, server=CURL),
    CURL: Run(fill=PORT, expect=('"predictions"', '"p_positive"')),
}

SKIP = {
    "make demo": "builds the workspace these commands run in (conftest.demo_repro: the same "
                 "script, dvc.yaml and remote, smaller params); the full demo takes minutes",
    "make test": "the test suite itself",
    "dvc exp run -S train.full_stage.epochs=20": "retrains every model (minutes); "
        "test_dvc_demo.py::test_dvc_experiments_and_diffs_work_in_the_workspace runs `dvc exp run -S` there",
    'mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI"': "a server until stopped; "
        "tests/tracking/test_mlflow_ui.py opens the UI in a browser",
    "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db": "the same UI on the same store",
    "dvc push": "network: the S3 remote; test_dvc_demo.py::test_push_and_pull_through_the_s3_remote "
                "pushes to an S3 server on 127.0.0.1",
    "ferflow prepare --set prepare.face_crop=detect:0.6": "re-prepares every dataset with the face "
        "detector (minutes on the full demo); tests/data/test_faces.py runs detect crops",
    "torchrun --nproc_per_node 4 -m ferflow.cli train --dataset LFW-FER --model enet_b2_8":
        "long training, 4 processes, downloaded weights; tests/pipeline/test_distributed.py runs torchrun",
    "ferflow register --dataset LFW-FER --model enet_b0_8_best_afew": "needs a trained "
        "enet_b0_8_best_afew (downloaded weights, training); the demo's register stage runs it for demo_tiny",
    "ferflow promote --dataset LFW-FER --rollback": "needs a previous champion: "
        "tests/tracking/test_registry.py::test_register_promote_rollback_then_serve_champion",
    "ferflow serve manifest --model models:/ferflow-lfw-fer@champion --service-account ferflow-s3 "
    "--artifacts-destination s3://ml-artifacts/mlflow --runtime ferflow-mlserver --out isvc.yaml":
        "needs artifacts KServe can read (S3); on the demo's local store it refuses, as the README "
        "says; tests/serving/test_kserve.py runs it against an S3 server",
    "kubectl apply -f isvc.yaml": "a Kubernetes cluster with KServe",
    "make image": "Docker; tests/pipeline/test_dockerfile.py checks the Dockerfile",
    "docker push --all-tags ghcr.io/ferflow/ferflow": "Docker and a registry (network)",
    "ferflow pipeline compile": "writes the committed pipelines/ferflow.yaml; "
        "tests/pipeline/test_compile.py compiles it and checks the committed file is current",
    "ferflow pipeline submit --host https://kfp.example.com --namespace my-profile "
    "--set train.full_stage.epochs=8": "a Kubeflow Pipelines cluster (network); tests/pipeline/test_submit.py",
    # Train on your own data: placeholders for the user's data set and model.
    "ferflow fetch --dataset MyFaces": "needs the user's folder added to params.yaml as MyFaces; "
        "tests/data/test_local_sources.py fetches folders",
    "ferflow prepare --dataset MyFaces && ferflow train --dataset MyFaces --model M":
        "the user's data set and a model name M (placeholders), and training",
    "ferflow evaluate --dataset MyFaces --model M": "the user's data set and a model name M (placeholders)",
}

COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    assert len(COMMANDS) > 20, COMMANDS  # the parser found the README's blocks
    assert not RUN.keys() & SKIP.keys()
    unclassified = [c for c in COMMANDS if c not in RUN and c not in SKIP]
    assert not unclassified, ("README commands neither run nor skipped (add each to RUN or SKIP in "
                              f"{Path(__file__).name}):\n" + "\n".join(unclassified))
    gone = [c for c in [*RUN, *SKIP] if c not in COMMANDS]
    assert not gone, "no longer in README.md (remove or update them):\n" + "\n".join(gone)
    assert all(reason.strip() for reason in SKIP.values())


def test_the_parser_reads_continuations_comments_and_consoles():
    text = ("```bash\n# a comment \\\nfoo --a 1 \\\n   --b '#not' # trailing\nbar  # x\n```\n"
            "```console\n$ baz \\\n  --c\noutput line\n```\n```json\n{\"no\": 1}\n```\n")
    assert readme_commands(text) == ["foo --a 1 --b '#not'", "bar", "baz --c"]


@pytest.fixture(scope="module")
def readme_root(demo_repro, tmp_path_factory):
    """(root, values for the placeholders, environment): the repo root's stand-in, its demo/
    a copy of the shared workspace, with the photos the README's commands name."""
    root = tmp_path_factory.mktemp("readme")
    ws = copy_demo_workspace(demo_repro[0], root / "demo")
    (root / ".venv").symlink_to(BIN.parent)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    # The user's photos: faces from the demo's archive.
    with zipfile.ZipFile(ws / "archives" / "LFW-FER.zip") as z:
        faces = [n for n in z.namelist() if n.endswith(".jpg")][:3]
        (ws / "photos").mkdir()
        for i, name in enumerate(faces):
            (ws / "photos" / f"{i}.jpg").write_bytes(z.read(name))
        (ws / "face.jpg").write_bytes(z.read(faces[0]))
    values = {"root": str(root), "demo": str(ws), "venv": str(BIN.parent),
              "sha256": sha256_file(ws / "archives" / "LFW-FER.zip")}
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **demo_mlflow_env(ws)}
    env.pop("VIRTUAL_ENV", None)  # set by `source .venv/bin/activate` only
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"  # curl to the local server, never a proxy
    return root, values, env


def as_run(command: str, values: dict) -> str:
    for placeholder, value in RUN[command].fill.items():
        command = command.replace(placeholder, value.format(**values))
    return command


def run_readme(command: str, readme_root) -> str:
    root, values, env = readme_root
    spec = RUN[command]
    script = as_run(command, values) + (f"\n{spec.then}" if spec.then else "")
    cwd = root if spec.where == "root" else root / "demo"
    result = subprocess.run(["bash", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README command failed ({result.returncode}) in {spec.where}: {command}\n{output[-4000:]}"
    for expected in spec.expect:
        assert expected.format(**values) in output, f"{command}: no {expected!r} in\n{output[-4000:]}"
    return output


PLAIN = [c for c in COMMANDS if c in RUN and not RUN[c].server and c not in {r.server for r in RUN.values()}]


@pytest.mark.parametrize("command", PLAIN)
def test_readme_command_runs(readme_root, command):
    run_readme(command, readme_root)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c in RUN and RUN[c].server])
def test_readme_server_answers(readme_root, command, tmp_path):
    """The server command as written, in the background until it answers; then the README's
    request to it."""
    root, values, env = readme_root
    log = tmp_path / "server.log"

    def start(port: int) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(["bash", "-c", f"exec {as_run(command, {**values, 'port': port})}"],
                                    cwd=root / "demo", env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    port, proc = start_on_free_port(start, lambda port, proc: wait_ready(f"http://127.0.0.1:{port}/ping", proc, log),
                                    log, stop=stop_group)
    try:
        output = run_readme(RUN[command].server, (root, {**values, "port": port}, env))
        body = json.loads(output[output.index("{"):])
        assert body["predictions"][0]["label"] in {"negative", "neutral", "positive"}
    finally:
        stop_group(proc)


def test_skipped_commands_are_still_valid_shell():
    """Skipped is not unchecked: each skipped command at least parses as shell."""
    for command in SKIP:
        shlex.split(command)
        subprocess.run(["bash", "-n", "-c", command], check=True)
