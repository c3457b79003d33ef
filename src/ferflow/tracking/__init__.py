"""MLflow, one owner per concern:

    service       connection: URIs, the experiment, bounded HTTP, MLflow errors as FerflowError
    lineage       where a model came from, as tags (git, data digests, KFP run, DVC trial)
    payload       params, tags, metrics and dataset inputs shaped to MLflow's limits
    rundir        the run directory's files: run.json, weights, mlflow_run.json
    runs          training runs (the MLflow train callback)
    eval_logging  evaluations logged into their training run
    parent_runs   the parent run of one DAG invocation
    packaging     the logged model (pyfunc from code, ONNX, signature, requirements)
    versioning    registering versions (idempotent, locked) with the challenger alias
    card          the model card of a version
    promotion     the promotion policy: `decide`, pure
    aliases       promote / rollback: moving the aliases by that policy
    history       the promotion log: every decision, appended to the registered model
    queries       reading the registry back: versions, evaluations, the report's results
    overview      what `ferflow registry` shows: versions, aliases, metrics, the log

Everything here imports mlflow lazily or is imported only when `tracking.enabled` is true,
so training and evaluation run without MLflow at all."""

import os as _os

# ferflow never needs the internet at run time: keep MLflow's telemetry thread from trying
# (offline it also raced with our reads of os.environ). A user's explicit setting wins.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
