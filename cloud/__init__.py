"""The AWS side of parkmon: CloudFormation template and the ingest Lambda function."""
