"""zimage-stream: a Kafka-native image worker built on Z-Image-Turbo."""

__version__ = "0.1.0"
