-- The user/permission store of MLflow's basic-auth app (infra/base/mlflow), next to the tracking database
-- `mlflow` (POSTGRES_DB). The official image runs this once, when it initialises an empty data volume; on a
-- volume initialised before, create it by hand (infra/README.md, "Authentication").
CREATE DATABASE mlflow_auth;
