"""Pure readiness policy: model -> per-function state and reasons."""
