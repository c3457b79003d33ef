"""Training across several nodes: the train stage as a Kubeflow Trainer v2 `TrainJob`.

`trainjob_documents` builds a ConfigMap holding the resolved params and a TrainJob that
mounts it; each trainer pod fetches and prepares its dataset, then starts the same
`ferflow train` under torchrun as `ferflow.pipeline.distributed` does on one node (the
runtime supplies the rendezvous). The manifests are built and validated with the
`kubeflow` SDK's models; `dump_documents` writes them as YAML for `kubectl apply -f`.
Global batch and learning-rate semantics are those of one node with more ranks: see
`ferflow.pipeline.distributed`.
"""

from __future__ import annotations

import re
import shlex
from typing import Optional, Sequence

import yaml

from ferflow.config import Params, dump_params
from ferflow.errors import ConfigError
from ferflow.pipeline import MLFLOW_OPTIONAL, MLFLOW_REQUIRED, S3_KEYS
from ferflow.pipeline.distributed import train_argv

DEFAULT_RUNTIME = "torch-distributed"
PARAMS_MOUNT = "/etc/ferflow"  # where the params ConfigMap is mounted in each trainer pod
PARAMS_KEY = "params.yaml"
# The image's user home (Dockerfile): writable, unlike the ConfigMap mount; relative paths in
# params (data/, models/) resolve here.
DEFAULT_WORKDIR = "/home/ferflow/work"

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SI = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def default_job_name(dataset: str, model: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", f"ferflow-{dataset}-{model}".lower())
    return slug[:40].strip("-")  # room for the pod-name suffixes JobSet adds


def _check_name(kind: str, value: str, pattern: re.Pattern, limit: int) -> str:
    if not value or len(value) > limit or not pattern.match(value):
        raise ConfigError(f"{kind} {value!r}: not a valid Kubernetes name (lowercase letters, digits and '-', "
                          f"at most {limit} characters)")
    return value


def _check_quantity(kind: str, value: str) -> str:
    value = str(value).strip()
    if not _QUANTITY.match(value) or float(re.sub(r"[A-Za-z]+$", "", value) or 0) <= 0:
        raise ConfigError(f"{kind} {value!r}: expected a positive Kubernetes quantity such as 8, 500m, 32Gi")
    return value


def _whole_cpus(cpu: str) -> int:
    """Whole cores in a CPU quantity (8, 8000m, 7.5 -> 7); 1 when it is not a plain number."""
    match = re.match(r"^\+?(\d+(?:\.\d*)?|\.\d+)(m|k|M|G|T|P|E)?$", cpu)
    return max(1, int(float(match.group(1)) * _SI[match.group(2) or ""])) if match else 1


def params_configmap(name: str, params: Params, namespace: Optional[str] = None) -> dict:
    """A ConfigMap holding the resolved params as `params.yaml` (what trainjob mounts)."""
    from kubeflow_trainer_api import models as k8s

    _check_name("ConfigMap name", name, _DNS1123_SUBDOMAIN, 253)
    text = yaml.safe_dump(dump_params(params), sort_keys=False)
    cm = k8s.IoK8sApiCoreV1ConfigMap(
        apiVersion="v1", kind="ConfigMap",
        metadata=k8s.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=namespace,
                                                              labels={"app.kubernetes.io/name": "ferflow"}),
        data={PARAMS_KEY: text},
    )
    return cm.to_dict()


def trainjob(
    *,
    params: Params,
    image: str,
    dataset: str,
    model: str,
    num_nodes: int,
    gpus_per_node: int,
    params_configmap: str,
    name: Optional[str] = None,
    namespace: Optional[str] = None,
    cpu: str = "8",
    memory: str = "32Gi",
    accelerator: str = "nvidia.com/gpu",
    shm_size: str = "8Gi",
    runtime: str = DEFAULT_RUNTIME,
    mlflow_secret: str = "ferflow-mlflow",
    s3_secret: str = "ferflow-s3",
    workdir: str = DEFAULT_WORKDIR,
) -> dict:
    """A Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) that runs the train
    stage for (dataset, model) on `num_nodes` pods with `gpus_per_node` GPUs each; a plain
    dict (apiVersion, kind, metadata, spec) built and validated with the `kubeflow` SDK's
    models, ready for YAML and `kubectl apply -f`.

    Params: the resolved params.yaml in the ConfigMap `params_configmap` (`params_configmap()`
    builds it from the same `params`), mounted read-only at /etc/ferflow in every pod.
    Each pod runs, in `workdir`: `ferflow fetch` of the dataset's archives (sha256-verified,
    from their URIs in params: they must be reachable from the cluster, e.g. s3:// with the
    `s3_secret` credentials), `ferflow prepare` of the dataset (deterministic, so every node
    holds the same caches), then torchrun. The `runtime` ClusterTrainingRuntime (default
    torch-distributed) injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
    PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads: one torchrun per node starts
    one rank per GPU and all nodes join one process group (NCCL). Global batch:
    train.batch_size x num_nodes x gpus_per_node, lr unscaled (ferflow.pipeline.distributed).
    Global rank 0 writes the run directory inside its pod; with tracking.enabled it is
    logged to MLflow (the `mlflow_secret` server), the only copy that outlives the pods.

    Secrets become env references (secretKeyRef), never values: MLFLOW_TRACKING_URI
    (required) and MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN (optional) from `mlflow_secret`,
    AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY/ENDPOINT_URL (optional) from `s3_secret`; "" = none.
    Bad values raise ConfigError (the SDK models' own checks included).
    """
    from pydantic import ValidationError

    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"number of nodes {num_nodes!r}: expected an integer >= 1")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise ConfigError(f"GPUs per node {gpus_per_node!r}: expected an integer >= 0 (0: train on CPU, gloo)")
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image.strip()):
        raise ConfigError(f"image {image!r}: expected a container image reference such as ghcr.io/org/ferflow:0.1.0")
    if not str(workdir).startswith("/"):
        raise ConfigError(f"workdir {workdir!r}: expected an absolute path inside the image")
    name = _check_name("TrainJob name", name or default_job_name(dataset, model), _DNS1035, 63)
    if namespace is not None:
        _check_name("namespace", namespace, _DNS1123_LABEL, 63)
    _check_name("runtime", runtime, _DNS1123_SUBDOMAIN, 253)
    _check_name("ConfigMap name", params_configmap, _DNS1123_SUBDOMAIN, 253)
    for kind, secret in (("MLflow secret", mlflow_secret), ("S3 secret", s3_secret)):
        if secret:
            _check_name(kind, secret, _DNS1123_SUBDOMAIN, 253)
    cpu, memory = _check_quantity("CPU per node", cpu), _check_quantity("memory per node", memory)
    shm_size = _check_quantity("/dev/shm size", shm_size)
    # Fail here, not in a pod minutes later: unknown dataset or model, no train section.
    params.require_train()
    members = params.data.members(dataset)
    from ferflow.models import zoo

    zoo.resolve(model)

    nproc = max(1, gpus_per_node)
    try:
        return _build_trainjob(
            name=name, namespace=namespace, image=image.strip(), runtime=runtime, dataset=dataset, model=model,
            members=members, num_nodes=num_nodes, nproc=nproc, gpus=gpus_per_node, accelerator=accelerator,
            cpu=cpu, memory=memory, shm_size=shm_size, configmap=params_configmap,
            mlflow_secret=mlflow_secret, s3_secret=s3_secret, workdir=str(workdir),
        )
    except ValidationError as exc:
        raise ConfigError(f"TrainJob {name}: {exc}") from None


def node_script(dataset: str, model: str, members: Sequence[str], workdir: str) -> str:
    """What each trainer pod runs: fetch and prepare the dataset locally, then torchrun."""
    params_file = f"{PARAMS_MOUNT}/{PARAMS_KEY}"
    fetch = ["ferflow", "fetch", "--params", params_file]
    for member in members:
        fetch += ["--dataset", member]
    prepare = ["ferflow", "prepare", "--params", params_file, "--dataset", dataset]
    # No rendezvous flags: torchrun takes them from the runtime's PET_* variables.
    train = train_argv("python", [], params_file, dataset, model)
    return "\n".join([
        "set -eu",
        f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}",
        shlex.join(fetch),
        shlex.join(prepare),
        "exec " + shlex.join(train),
    ])


def _secret_env(secret: str, keys: Sequence[str], optional: bool) -> list:
    from kubeflow_trainer_api import models as k8s

    return [k8s.IoK8sApiCoreV1EnvVar(name=key, valueFrom=k8s.IoK8sApiCoreV1EnvVarSource(
        secretKeyRef=k8s.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=optional)))
        for key in keys]


def _build_trainjob(*, name, namespace, image, runtime, dataset, model, members, num_nodes, nproc, gpus,
                    accelerator, cpu, memory, shm_size, configmap, mlflow_secret, s3_secret, workdir) -> dict:
    import warnings

    from kubeflow_trainer_api import models as k8s

    with warnings.catch_warnings():  # kubeflow.trainer 0.5.0's own pydantic-v1-style configs
        warnings.simplefilter("ignore", DeprecationWarning)
        from kubeflow.trainer.constants import constants as trainer_constants
        from kubeflow.trainer.options.kubernetes import RuntimePatch

    quantity = k8s.IoK8sApimachineryPkgApiResourceQuantity
    resources = {"cpu": quantity(cpu), "memory": quantity(memory)}
    if gpus:
        resources[accelerator] = quantity(str(gpus))
    from ferflow.cpus import CPUS_ENV

    # A pod sees the node's CPUs; prepare's decode workers and each rank's threads must
    # share what it requested.
    env = [k8s.IoK8sApiCoreV1EnvVar(name=CPUS_ENV, value=str(_whole_cpus(cpu))),
           k8s.IoK8sApiCoreV1EnvVar(name="OMP_NUM_THREADS", value=str(max(1, _whole_cpus(cpu) // nproc))),
           k8s.IoK8sApiCoreV1EnvVar(name="PYTHONUNBUFFERED", value="1")]
    if mlflow_secret:
        env += _secret_env(mlflow_secret, MLFLOW_REQUIRED, optional=False)
        env += _secret_env(mlflow_secret, MLFLOW_OPTIONAL, optional=True)
    if s3_secret:
        env += _secret_env(s3_secret, S3_KEYS, optional=True)
    trainer = k8s.TrainerV1alpha1Trainer(
        image=image,
        command=["bash", "-c"],
        args=[node_script(dataset, model, members, workdir)],
        numNodes=num_nodes,
        numProcPerNode=nproc,
        resourcesPerNode=k8s.IoK8sApiCoreV1ResourceRequirements(requests=dict(resources), limits=dict(resources)),
        env=env,
    )
    # The params ConfigMap and a memory-backed /dev/shm (NCCL between a pod's GPUs needs more
    # than the container default of 64 MiB) reach the runtime's `node` container by a patch.
    node = trainer_constants.NODE
    pod = k8s.TrainerV1alpha1PodSpecPatch(
        volumes=[
            k8s.IoK8sApiCoreV1Volume(name="ferflow-params", configMap=k8s.IoK8sApiCoreV1ConfigMapVolumeSource(
                name=configmap, items=[k8s.IoK8sApiCoreV1KeyToPath(key=PARAMS_KEY, path=PARAMS_KEY)])),
            k8s.IoK8sApiCoreV1Volume(name="dshm", emptyDir=k8s.IoK8sApiCoreV1EmptyDirVolumeSource(
                medium="Memory", sizeLimit=quantity(shm_size))),
        ],
        containers=[k8s.TrainerV1alpha1ContainerPatch(name=node, volumeMounts=[
            k8s.IoK8sApiCoreV1VolumeMount(name="ferflow-params", mountPath=PARAMS_MOUNT, readOnly=True),
            k8s.IoK8sApiCoreV1VolumeMount(name="dshm", mountPath="/dev/shm"),
        ])],
    )
    patch = k8s.TrainerV1alpha1RuntimePatch(
        manager=RuntimePatch().manager,  # the SDK's own manager key for client-set patches
        trainingRuntimeSpec=k8s.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=k8s.TrainerV1alpha1JobSetTemplatePatch(spec=k8s.TrainerV1alpha1JobSetSpecPatch(
                replicatedJobs=[k8s.TrainerV1alpha1ReplicatedJobPatch(
                    name=node, template=k8s.TrainerV1alpha1JobTemplatePatch(spec=k8s.TrainerV1alpha1JobSpecPatch(
                        template=k8s.TrainerV1alpha1PodTemplatePatch(spec=pod))))]))),
    )
    job = k8s.TrainerV1alpha1TrainJob(
        apiVersion=trainer_constants.API_VERSION,
        kind=trainer_constants.TRAINJOB_KIND,
        metadata=k8s.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=namespace, labels={"app.kubernetes.io/name": "ferflow"},
            # Annotations, not labels: model names such as timm:<arch> are no label values.
            annotations={"ferflow/dataset": dataset, "ferflow/model": model},
        ),
        spec=k8s.TrainerV1alpha1TrainJobSpec(
            runtimeRef=k8s.TrainerV1alpha1RuntimeRef(name=runtime, apiGroup="trainer.kubeflow.org",
                                                     kind="ClusterTrainingRuntime"),
            trainer=trainer,
            runtimePatches=[patch],
        ),
    )
    manifest = job.to_dict()
    # Round trip through the SDK's parser: what we emit is what it (and so the API) reads.
    k8s.TrainerV1alpha1TrainJob.from_dict(manifest)
    return manifest


def trainjob_documents(params: Params, *, dataset: str, model: str, name: Optional[str] = None,
                       namespace: Optional[str] = None, **options) -> list[dict]:
    """[ConfigMap with the params, TrainJob mounting it]: one `kubectl apply -f` creates both."""
    name = name or default_job_name(dataset, model)
    configmap = f"{name}-params"
    job = trainjob(params=params, dataset=dataset, model=model, name=name, namespace=namespace,
                   params_configmap=configmap, **options)
    return [params_configmap(configmap, params, namespace), job]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (params.yaml, the node script) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str)


def dump_documents(documents: Sequence[dict]) -> str:
    return yaml.dump_all(list(documents), Dumper=_BlockDumper, sort_keys=False)
