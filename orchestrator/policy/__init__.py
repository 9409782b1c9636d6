"""Policy as code: the agent registry, the Rego bundle, and the grants it produces."""
