"""The DynamoDB table of rebuilt records: partition key device_id, sort key timestamp."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from cloud.ingest.rebuild import StoredRecord, sort_key

PARTITION_KEY = "device_id"
SORT_KEY = "timestamp"


def _number(value: float | int) -> Decimal:
    """A float as the Decimal DynamoDB wants, exactly as Python prints it."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def record_item(record: StoredRecord) -> dict[str, Any]:
    """The item written for one record."""
    item: dict[str, Any] = {
        PARTITION_KEY: record.device_id,
        SORT_KEY: record.sort_key,
        "camera_id": record.camera_id,
        "captured_at": _number(record.captured_at),
        "idempotency_key": record.key,
        "batch_key": record.batch_key,
        "kind": record.kind,
        "zones": record.zones,
        "occupied_count": record.occupied_count,
        "spaces": record.spaces,
        "received_at": _number(record.received_at),
    }
    if record.vehicles is not None:
        item["vehicles"] = record.vehicles
    return item


class DynamoRecordStore:
    """Records in one DynamoDB table, written with a condition so a key is stored once."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get_zones(self, device_id: str, camera_id: str, captured_at: float) -> dict[str, bool] | None:
        """The stored full state of one record, read consistently."""
        response = self.table.get_item(
            Key={PARTITION_KEY: device_id, SORT_KEY: sort_key(captured_at, camera_id)}, ConsistentRead=True
        )
        item = response.get("Item")
        return None if item is None else {str(zone): bool(value) for zone, value in item["zones"].items()}

    def put_record(self, record: StoredRecord) -> bool:
        """Put the item unless one with the same keys exists; False for a duplicate."""
        try:
            self.table.put_item(
                Item=record_item(record),
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": PARTITION_KEY},
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise
        return True
