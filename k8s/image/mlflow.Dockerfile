# MLflow tracking server with the PostgreSQL driver and the S3 client (the official image has neither).
#   docker build -f k8s/image/mlflow.Dockerfile -t rpt-mlflow:3.17.2 k8s/image
FROM python:3.11.10-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.10" "boto3==1.40.0" \
 && useradd --uid 1000 --create-home mlflow
USER 1000
EXPOSE 5000
