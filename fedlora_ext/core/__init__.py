"""What strategies and the runtime share: the run configuration, adapters seen as named tensors, the
state types and the checks on an upload. Imports only ops and dp below it."""
