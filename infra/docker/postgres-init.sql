-- Run once by the postgres image on an empty volume: POSTGRES_DB creates `prefect`; MLflow gets its own.
CREATE DATABASE mlflow;
