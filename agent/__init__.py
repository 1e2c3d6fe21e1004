"""The guest agent: collectors -> model -> readiness policy -> Report."""
