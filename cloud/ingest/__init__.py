"""The ingest Lambda function: validate a batch, rebuild full zone state, store it once per record."""
