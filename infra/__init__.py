"""Local infrastructure (Kafka broker, Redis, Spark jars) and the settings object."""
