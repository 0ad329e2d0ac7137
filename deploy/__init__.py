"""Running several instances: HAProxy in front, a local RabbitMQ cluster (scripts/cluster)."""
