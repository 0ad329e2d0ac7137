"""Live news feed: posts stored in PostgreSQL, fanned out through RabbitMQ to open websockets."""
