"""`ferflow serve manifest|validate`: KServe InferenceService manifests from the command line
(the manifests themselves: ferflow.serving.kserve). Messages go to stderr: stdout may be
piped into `kubectl apply -f -`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferflow.commandline import params_checked, params_loader, typer_app
from ferflow.config import Params
from ferflow.serving.kserve.manifest import DEFAULT_CPU, DEFAULT_MEMORY, GPU_RESOURCE, ServeOptions, manifest
from ferflow.serving.kserve.validation import KIND, SCALE_METRICS, ManifestError, first_line, validate

serve_app = typer_app("serve", "Serving on Kubernetes: KServe InferenceService manifests for registered models.")

# `serve manifest` reads only the registry's tracking URI from params.
with_tracking_params = params_loader("params file (YAML): the tracking URI",
                                     example="tracking.tracking_uri=http://mlflow:5000")


@serve_app.command("manifest")
@with_tracking_params
def manifest_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/<name>@<alias> or models:/<name>/<version>; "
                                       "an alias is pinned to its current version")],
    name: Annotated[Optional[str], typer.Option(
        "--name", help="InferenceService name (DNS-1035 label; default: the registered model's name, plus -<alias> "
        "unless champion, or -v<version>)")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="Kubernetes namespace")] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs per replica (a limit on --gpu-resource)")] = 0,
    gpu_resource: Annotated[str, typer.Option("--gpu-resource", help="GPU resource name")] = GPU_RESOURCE,
    cpu: Annotated[str, typer.Option("--cpu", help="CPU request and limit per replica (e.g. 2, 500m)")] = DEFAULT_CPU,
    memory: Annotated[str, typer.Option("--memory", help="memory request and limit per replica (e.g. 4Gi)")]
    = DEFAULT_MEMORY,
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="0 scales to zero (Knative mode only)")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas", help="upper bound for the autoscaler")] = 1,
    scale_metric: Annotated[Optional[str], typer.Option(
        "--scale-metric", help=f"autoscaling metric: {', '.join(SCALE_METRICS)}")] = None,
    scale_target: Annotated[Optional[int], typer.Option(
        "--scale-target", help="autoscaling target (cpu/memory: % of the request; concurrency; rps)")] = None,
    service_account: Annotated[Optional[str], typer.Option(
        "--service-account", help="service account whose Secret gives the storage initializer S3/GCS access")] = None,
    runtime: Annotated[Optional[str], typer.Option(
        "--runtime", help="ServingRuntime/ClusterServingRuntime name (default: KServe picks kserve-mlserver)")] = None,
    image: Annotated[Optional[str], typer.Option(
        "--image", help="serving image (MLServer + mlserver-mlflow + torch/timm) over the runtime's")] = None,
    storage_uri: Annotated[Optional[str], typer.Option(
        "--storage-uri", help="use this model folder (s3://, gs://, pvc://, https://; ending in /) instead of the "
        "registry's location")] = None,
    artifacts_destination: Annotated[Optional[str], typer.Option(
        "--artifacts-destination", envvar="FERFLOW_ARTIFACTS_DESTINATION",
        help="the tracking server's --artifacts-destination (e.g. s3://bucket/mlflow): maps proxied "
             "mlflow-artifacts: locations to it")] = None,
    check: Annotated[bool, typer.Option(
        "--check-storage", help="read MLmodel at the storageUri (S3/GCS, this machine's credentials) and check it "
        "is this version")] = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the YAML here (default: stdout)")]
    = None,
    *,
    cfg: Params,
) -> None:
    """Write a KServe InferenceService (MLflow format, V2 protocol) for a registered version."""
    options = ServeOptions(name=name, namespace=namespace, gpus=gpus, gpu_resource=gpu_resource, cpu=cpu,
                           memory=memory, min_replicas=min_replicas, max_replicas=max_replicas,
                           scale_metric=scale_metric, scale_target=scale_target, service_account=service_account,
                           runtime=runtime, image=image, storage_uri=storage_uri,
                           artifacts_destination=artifacts_destination)
    result = manifest(cfg, model, options, check)
    text = result.to_yaml()
    if out_file is None:
        sys.stdout.write(text)  # plain: `| kubectl apply -f -` must get the YAML unwrapped
        sys.stdout.flush()
    else:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text, encoding="utf-8")
    v = result.version
    _say(f"{result.doc['metadata']['name']}: {v.pinned_uri}" + (f" (alias {v.alias})" if v.alias else "")
         + f" from {result.storage_uri}" + (" (checked)" if check else "")
         + (f"; written to {out_file}" if out_file else ""))
    for note in result.notes:
        _say(f"note: {note}")


@serve_app.command("validate")
@params_checked(example="serve.engine=onnx")  # offline checks of the documents alone
def validate_cmd(
    files: Annotated[list[Path], typer.Argument(
        metavar="FILE", help="InferenceService YAML files (several documents each allowed)")],
) -> None:
    """Check InferenceService YAML offline (names, storageUri, protocol, resources, replicas)."""
    import yaml

    count = 0
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            raise ManifestError(f"{path}: cannot read it as YAML ({first_line(exc)})") from None
        for i, doc in enumerate(docs):
            if isinstance(doc, dict) and doc.get("kind") not in (None, KIND):
                continue  # a Secret or ServiceAccount beside it
            try:
                notes = validate(doc)
            except ManifestError as exc:
                raise ManifestError(f"{path} (document {i + 1}): {exc}") from None
            count += 1
            for note in notes:
                _say(f"note: {path} (document {i + 1}): {note}")
    if not count:
        raise ManifestError(f"no InferenceService in {', '.join(map(str, files))}")
    _say(f"{count} InferenceService(s) valid")


def _say(text: str) -> None:
    """Messages on stderr: stdout may be piped into kubectl."""
    typer.echo(text, err=True)
