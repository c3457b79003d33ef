import mlflow
def test_server(mlflow_server, s3_env):
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("smoke")
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.0)
        mlflow.log_text("hello", "a.txt")
    client = mlflow.MlflowClient(mlflow_server.uri)
    assert client.get_run(run.info.run_id).data.metrics["x"] == 1.0
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket="ferflow-mlflow").get("Contents", [])]
    assert any(k.endswith("a.txt") for k in keys), keys
